"""The ``"integer_bf16"`` path: the integer dot run on bfloat16 codes with a float32 accumulator.

It must be the integer path's result bit for bit while the float32 partial sums stay below 2^24
(always for contractions of at most 1032 values, 1040 with symmetric weights), match a float64 NumPy reference of the integer
arithmetic, keep bf16 in the HLO (no s8 / s32 dot), and be chosen per site by the policies
(dots only: a conv site runs its integer op and says so)."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.execute import quantized_dot_general as _dot
from jaxcompress.execute import tune
from jaxcompress.execute.policy import PATHS, ExecutionPolicy
from jaxcompress.execute.transform import compressed
from tests.execute.reference import activation_codes, count_s8_contractions, dense_w8a8, weight_parts

DENSE = (((1,), (0,)), ((), ()))


def _pair(x, q, dims, **options):
    """(integer result, bf16-carrier result) of the same quantized dot, each under one jit."""
    integer = jax.jit(functools.partial(_dot, dimension_numbers=dims, **options))(x, q)
    carried = jax.jit(functools.partial(_dot, dimension_numbers=dims, carrier=jnp.bfloat16, **options))(x, q)
    return np.asarray(integer), np.asarray(carried)


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


@pytest.mark.parametrize("spec", [
    dict(bits=8, channel_axes=(-1,), symmetric=True),
    dict(bits=8, channel_axes=(-1,), symmetric=False),
    dict(bits=4, channel_axes=(-1,), group_size=8),
    dict(bits=4, channel_axes=(-1,), group_size=8, symmetric=False),
    dict(bits=8, symmetric=True),
], ids=["int8", "int8-asym", "int4-g8", "int4-g8-asym", "per-tensor"])
@pytest.mark.parametrize("rows", [1, 12, 40])  # 1: the padded s8 matrix-vector dot either way
def test_carrier_is_the_integer_result_bit_for_bit(spec, rows):
    x = _normal(0, (rows, 96))
    q = jc.quantize(_normal(1, (96, 24)), **spec)
    integer, carried = _pair(x, q, DENSE, activation="dynamic")
    np.testing.assert_array_equal(carried, integer)
    np.testing.assert_allclose(carried.astype(np.float64), dense_w8a8(x, q), rtol=2e-5, atol=2e-5)


def test_static_scale_out_in_layout_and_weight_on_the_left():
    x = _normal(0, (9, 64), 3.0)
    q = jc.quantize(_normal(1, (64, 16)), channel_axes=(-1,), symmetric=False)
    q = jc.QArray(**{**q.__dict__, "activation": "static", "activation_scale": jnp.float32(0.01)})
    integer, carried = _pair(x, q, DENSE)
    np.testing.assert_array_equal(carried, integer)
    np.testing.assert_allclose(carried, dense_w8a8(x, q, static_scale=0.01), rtol=2e-5, atol=2e-5)
    assert np.abs(np.asarray(x) / 0.01).max() > 127  # saturation is exercised

    # a torch-layout (out, in) weight, and the weight as the left operand with batch dims
    w = jc.quantize(_normal(2, (16, 64)), channel_axes=(0,))
    integer, carried = _pair(x, w, (((1,), (1,)), ((), ())), activation="dynamic")
    np.testing.assert_array_equal(carried, integer)
    xb = _normal(3, (3, 10, 32))
    wb = jc.quantize(_normal(4, (3, 32, 6)), channel_axes=(0, 2))
    left = jax.jit(lambda q, x: _dot(q, x, (((1,), (2,)), ((0,), (0,))), activation="dynamic", carrier=jnp.bfloat16))
    right = jax.jit(lambda x, q: _dot(x, q, (((2,), (1,)), ((0,), (0,))), activation="dynamic"))
    np.testing.assert_array_equal(np.asarray(left(wb, xb)), np.asarray(right(xb, wb)).transpose(0, 2, 1))


def test_the_largest_exact_contraction_is_exact():
    """1040 products of 127 x 127 sum to 16,774,160 < 2^24: exact in a float32 accumulator,
    not in a bfloat16 one (which would round it to 8 significant bits)."""
    k = 1040
    x = jnp.full((8, k), 0.5, jnp.float32)  # every code 127
    q = jc.quantize(jnp.full((k, 4), 0.25, jnp.float32), channel_axes=(-1,), symmetric=True)
    codes, x_scale = activation_codes(x, (-1,))
    w_codes, w_scale, _ = weight_parts(q)
    assert codes.min() == 127 and w_codes.min() == 127
    integer, carried = _pair(x, q, DENSE, activation="dynamic")
    expected = (codes @ w_codes) * x_scale * w_scale  # float64 reference of the integer sums
    assert (codes @ w_codes).max() == 127 * 127 * k < 2**24
    np.testing.assert_array_equal(carried, integer)
    np.testing.assert_allclose(carried, expected, rtol=1e-7)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(8, 33), k=st.integers(1, 1032), n=st.integers(1, 17),
    symmetric=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_carrier_equals_integer(rows, k, n, symmetric, seed):
    x = _normal(seed, (rows, k), 2.0)
    q = jc.quantize(_normal(seed + 1, (k, n)), channel_axes=(-1,), symmetric=symmetric)
    integer, carried = _pair(x, q, DENSE, activation="dynamic")
    np.testing.assert_array_equal(carried, integer)


def test_hlo_is_a_bf16_dot_and_vmap_agrees():
    x = _normal(0, (16, 64))
    q = jc.quantize(_normal(1, (64, 32)), channel_axes=(-1,))
    fn = jax.jit(lambda x, q: _dot(x, q, DENSE, activation="dynamic", carrier=jnp.bfloat16))
    assert count_s8_contractions(fn.lower(x, q).compile().as_text()) == 0
    dots = [line for line in fn.lower(x, q).as_text().splitlines() if "dot_general" in line]
    assert dots and all("(tensor<16x64xbf16>, tensor<64x32xbf16>) -> tensor<16x32xf32>" in line for line in dots)
    batched = jax.vmap(lambda x: _dot(x, q, DENSE, activation="dynamic", carrier=jnp.bfloat16))(x.reshape(2, 8, 64))
    np.testing.assert_array_equal(np.asarray(batched).reshape(16, 32), np.asarray(fn(x, q)))
    with pytest.raises(ValueError, match="carrier must be None or jnp.bfloat16"):
        _dot(x, q, DENSE, activation="dynamic", carrier=jnp.float16)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), name="conv")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10, name="head")(x)


@pytest.fixture(scope="module")
def convnet():
    model = ConvNet()
    x = jax.random.normal(jax.random.key(0), (12, 8, 8, 4))
    params = model.init(jax.random.key(1), x)
    rules = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]
    return model, jc.quantize_params(params, rules)[0], x


def test_policy_runs_dots_on_the_carrier_and_convs_integer(convnet):
    model, qparams, x = convnet
    apply = compressed(model.apply, policy="integer_bf16")
    sites = {s.path: s for s in apply.sites(qparams, x)}
    assert sites["params/head/kernel"].chosen == "integer_bf16"
    assert sites["params/conv/kernel"].chosen == "integer"
    assert "runs dots only" in sites["params/conv/kernel"].reason
    out = jax.jit(apply)(qparams, x)
    # the head contracts 8 * 8 * 16 = 1024 <= 1040 values: the same numbers as the integer program
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(compressed(model.apply, policy="integer"))(qparams, x)))
    hlo = jax.jit(apply).lower(qparams, x).compile().as_text()
    assert count_s8_contractions(hlo) == 1  # the conv's; the head's dot is bf16

    forced = compressed(model.apply, policy=ExecutionPolicy("weight_only", overrides={r".*/head/kernel": "integer_bf16"}))
    chosen = {s.path: s.chosen for s in forced.sites(qparams, x)}
    assert chosen == {"params/conv/kernel": "weight_only", "params/head/kernel": "integer_bf16"}

    # a matrix-vector product (fewer than 8 rows) runs the padded s8 dot either way, and says so
    [head] = [s for s in apply.sites(qparams, x[:2]) if s.path == "params/head/kernel"]
    assert head.chosen == "integer" and "matrix-vector" in head.reason
    hlo = jax.jit(apply).lower(qparams, x[:2]).compile().as_text()
    assert count_s8_contractions(hlo) == 2


def test_measure_times_the_carrier_at_dot_sites_only(convnet, tmp_path):
    model, qparams, x = convnet
    policy = ExecutionPolicy("measure", cache_dir=str(tmp_path), rounds=1)
    sites = {s.path: s for s in compressed(model.apply, policy=policy).sites(qparams, x)}
    assert "integer-bf16" in sites["params/head/kernel"].reason
    assert "integer-bf16" not in sites["params/conv/kernel"].reason
    entries = json.loads((tmp_path / "site_timings.json").read_text())
    by_primitive = {json.loads(key)["primitive"]: entry for key, entry in entries.items()}
    assert set(by_primitive["dot_general"]) == {"integer_s", "weight_only_s", "integer_bf16_s"}
    assert set(by_primitive["conv_general_dilated"]) == {"integer_s", "weight_only_s"}
    chosen = sites["params/head/kernel"].chosen
    timings = by_primitive["dot_general"]
    assert timings[f"{chosen}_s"] == min(timings.values())


def test_matrix_vector_sites_do_not_time_the_carrier(convnet, tmp_path):
    # at 2 rows the head is a matrix-vector dot: its integer_bf16 program IS the padded s8 one,
    # so neither measure nor tune compiles it (nor can a cached tuning choose it)
    model, qparams, x = convnet
    x = x[:2]
    policy = ExecutionPolicy("measure", cache_dir=str(tmp_path), rounds=1)
    sites = {s.path: s for s in compressed(model.apply, policy=policy).sites(qparams, x)}
    assert "integer-bf16" not in sites["params/head/kernel"].reason
    entries = json.loads((tmp_path / "site_timings.json").read_text())
    by_primitive = {json.loads(key)["primitive"]: entry for key, entry in entries.items()}
    assert set(by_primitive["dot_general"]) == {"integer_s", "weight_only_s"}

    tuned = ExecutionPolicy("tune", cache_dir=str(tmp_path), rounds=1)
    sites = {s.path: s for s in compressed(model.apply, policy=tuned).sites(qparams, x)}
    assert "integer-bf16" not in sites["params/head/kernel"].reason
    assert {s.chosen for s in sites.values()} <= {"integer", "weight_only"}
    [(key, entry)] = json.loads((tmp_path / tune.TUNE_FILE).read_text()).items()
    assert set(entry["starts"]) == {"weight_only", "integer", "integer_bf16", "integer_im2col", "auto", "measure"}
    assert entry["starts"]["integer_bf16"] == entry["starts"]["integer"]  # the same program, timed once
    assert set(entry["evidence"]["params/head/kernel"]) <= {"integer", "weight_only"}
    paths = tuple(entry["choice"])
    options = {path: PATHS[:2] for path in paths}
    assert tune.Tuning.from_json(entry, paths, options) is not None
    entry["choice"]["params/head/kernel"] = "integer_bf16"  # a tampered file: the head cannot take it
    entry["evidence"]["params/head/kernel"]["integer_bf16"] = 1e-3
    assert tune.Tuning.from_json(entry, paths, options) is None
    assert tune.Tuning.from_json(entry, paths) is not None  # on a weight that can, it would be valid
