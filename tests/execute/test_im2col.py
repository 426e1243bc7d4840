"""The ``"integer_im2col"`` path: a conv XLA would run as its native s8 convolution runs as the
s8 dot on int8 im2col patches instead (the same int32 sums, so the same numbers), chosen per
site by `ExecutionPolicy`, ``"measure"`` and ``"tune"``."""

import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.execute import tune
from jaxcompress.execute.policy import PATCHES, ExecutionPolicy
from jaxcompress.execute.transform import compressed
from tests.execute.reference import conv_w8a8, count_s8_contractions


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(24, (3, 3), strides=2, name="native")(x))  # 20 -> 24 channels, NHWC: native
        x = nn.relu(nn.Conv(8, (3, 3), name="small")(x))  # 24 -> 8 channels: native too (> 16 inputs)
        x = nn.Conv(4, (1, 1), feature_group_count=4, name="grouped")(x[..., :8])  # grouped: im2col already
        return nn.Dense(5, name="head")(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def net():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (12, 9, 9, 20))
    params = model.init(jax.random.key(1), x)
    rules = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]
    return model, params, jc.quantize_params(params, rules)[0], x


def test_policy_runs_native_convs_on_patches_and_says_where_it_cannot(net):
    model, _, qparams, x = net
    patched = compressed(model.apply, policy=PATCHES)
    sites = {s.path: s for s in patched.sites(qparams, x)}
    assert sites["params/native/kernel"].chosen == PATCHES
    assert sites["params/small/kernel"].chosen == PATCHES
    assert sites["params/grouped/kernel"].chosen == "integer"
    assert "same program" in sites["params/grouped/kernel"].reason
    assert sites["params/head/kernel"].chosen == "integer" and "runs convs only" in sites["params/head/kernel"].reason

    integer = jax.jit(compressed(model.apply, policy="integer"))
    out = jax.jit(patched)(qparams, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(integer(qparams, x)))  # exact int32 sums both ways
    native_hlo = integer.lower(qparams, x).compile().as_text()
    patched_hlo = jax.jit(patched).lower(qparams, x).compile().as_text()
    assert count_s8_contractions(native_hlo, "convolution") == 2
    assert count_s8_contractions(patched_hlo, "convolution") == 0
    assert count_s8_contractions(patched_hlo, "dot") == count_s8_contractions(native_hlo, "dot") + 2

    forced = ExecutionPolicy("weight_only", overrides={r".*/native/kernel": PATCHES})
    chosen = {s.path: s.chosen for s in compressed(model.apply, policy=forced).sites(qparams, x)}
    assert chosen["params/native/kernel"] == PATCHES and chosen["params/small/kernel"] == "weight_only"


def test_patches_match_the_integer_reference(net):
    model, params, qparams, x = net
    conv = nn.Conv(24, (3, 3), strides=2)
    kernel = qparams["params"]["native"]["kernel"]
    bias = params["params"]["native"]["bias"]
    fn = jax.jit(compressed(lambda k, x: conv.apply({"params": {"kernel": k, "bias": bias}}, x), policy=PATCHES))
    expected = conv_w8a8(x, kernel, (2, 2), ((1, 1), (1, 1))) + np.asarray(bias, np.float64)
    np.testing.assert_allclose(np.asarray(fn(kernel, x), np.float64), expected, rtol=2e-5, atol=2e-5)


def test_measure_and_tune_time_patches_at_native_convs_only(net, tmp_path):
    model, _, qparams, x = net
    policy = ExecutionPolicy("measure", cache_dir=str(tmp_path), rounds=1)
    sites = {s.path: s for s in compressed(model.apply, policy=policy).sites(qparams, x)}
    assert "integer-im2col" in sites["params/native/kernel"].reason
    assert "integer-im2col" not in sites["params/grouped/kernel"].reason
    entries = [(json.loads(key), entry) for key, entry in json.loads((tmp_path / "site_timings.json").read_text()).items()]
    timed = {tuple(key["weight"][0][0]): set(entry) for key, entry in entries}
    assert timed[(3, 3, 20, 24)] == {"integer_s", "weight_only_s", "integer_im2col_s"}
    assert timed[(1, 1, 2, 4)] == {"integer_s", "weight_only_s"}

    tuned = ExecutionPolicy("tune", cache_dir=str(tmp_path), rounds=1)
    sites = {s.path: s for s in compressed(model.apply, policy=tuned).sites(qparams, x)}
    assert "integer-im2col" in sites["params/native/kernel"].reason
    assert "integer-im2col" not in sites["params/grouped/kernel"].reason
    [entry] = json.loads((tmp_path / tune.TUNE_FILE).read_text()).values()
    assert PATCHES in entry["starts"]
    assert PATCHES in entry["evidence"]["params/native/kernel"] or entry["choice"]["params/native/kernel"] == PATCHES
    assert PATCHES not in entry["evidence"]["params/grouped/kernel"]
    # the tuned program runs its choice: forced to the same choice it gives the same numbers
    forced = ExecutionPolicy("weight_only", overrides={re.escape(k): v for k, v in entry["choice"].items()})
    np.testing.assert_array_equal(
        np.asarray(jax.jit(compressed(model.apply, policy=tuned))(qparams, x)),
        np.asarray(jax.jit(compressed(model.apply, policy=forced))(qparams, x)),
    )


def test_grouped_native_conv_runs_on_patches():
    model = nn.Conv(48, (3, 3), feature_group_count=2)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 40))
    params = model.init(jax.random.key(1), x)
    qparams = jc.quantize_params(params, [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")])[0]
    patched = compressed(model.apply, policy=PATCHES)
    [site] = patched.sites(qparams, x)
    assert site.chosen == PATCHES
    integer = jax.jit(compressed(model.apply, policy="integer"))
    np.testing.assert_array_equal(np.asarray(jax.jit(patched)(qparams, x)), np.asarray(integer(qparams, x)))
    assert count_s8_contractions(integer.lower(qparams, x).compile().as_text(), "convolution") == 1
    assert count_s8_contractions(jax.jit(patched).lower(qparams, x).compile().as_text(), "convolution") == 0


def test_a_kernel_that_does_not_flatten_keeps_its_native_conv(tmp_path):
    # ragged groups of 7 along the 24 output channels: the native conv runs it, the patches'
    # (in * window, out) kernel cannot be built, so there is no third program to offer
    x = jax.random.normal(jax.random.key(0), (4, 9, 9, 20))
    w = jax.random.normal(jax.random.key(1), (3, 3, 20, 24))
    params = {"kernel": jc.quantize(w, activation="dynamic", channel_axes=(), group_axis=3, group_size=7)}

    def conv(p, x):
        return jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    reference = np.asarray(jax.jit(compressed(conv, policy="integer"))(params, x))
    for policy in (PATCHES, ExecutionPolicy("measure", cache_dir=str(tmp_path), rounds=1),
                   ExecutionPolicy("tune", cache_dir=str(tmp_path), rounds=1)):
        fn = compressed(conv, policy=policy)
        [site] = fn.sites(params, x)
        assert site.chosen in ("integer", "weight_only") and "integer-im2col" not in site.reason
        if site.chosen == "integer":
            np.testing.assert_array_equal(np.asarray(jax.jit(fn)(params, x)), reference)
