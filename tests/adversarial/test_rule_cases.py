"""Bad rules and specs, and leaves that do not fit them: errors name the argument or leaf."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from tests.adversarial.support import expect_clear, expect_ok

SPECS = {
    "bits-99": (dict(bits=99), ValueError, ("bits", "2..8")),
    "bits-1": (dict(bits=1), ValueError, ("bits", "2..8")),
    "bits-float": (dict(bits=4.5), ValueError, ("bits",)),
    "qtype": (dict(qtype="int4"), ValueError, ("qtype", "int4")),
    "group-size-0": (dict(group_size=0), ValueError, ("group_size",)),
    "group-size-float": (dict(group_size=2.5), ValueError, ("group_size",)),
    "scale-dtype": (dict(scale_dtype="float16"), ValueError, ("scale_dtype", "float16")),
    "calibration": (dict(calibration="best"), ValueError, ("calibration", "best")),
    "activation": (dict(activation="int4"), ValueError, ("activation", "int4")),
    "fp8-asymmetric": (dict(qtype="float8_e5m2", symmetric=False), ValueError, ("symmetric",)),
    "nf4-asymmetric": (dict(qtype="nf4", symmetric=False), ValueError, ("nf4", "symmetric")),
    "nf4-bits-3": (dict(qtype="nf4", bits=3), ValueError, ("nf4", "4-bit")),
    "nf4-dynamic": (dict(qtype="nf4", activation="dynamic"), ValueError, ("activation", "nf4")),
    "channel-axes-str": (dict(channel_axes="x"), TypeError, ("channel_axes",)),
    "channel-axes-float": (dict(channel_axes=(1.5,)), TypeError, ("channel_axes",)),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_bad_spec(case):
    kwargs, kind, needles = SPECS[case]
    expect_clear(lambda: jc.QuantSpec(**kwargs), kind, *needles)


def test_channel_axes_int_is_accepted():
    # issue 18: `channel_axes=-1` failed with "'int' object is not iterable"
    spec = expect_ok(lambda: jc.QuantSpec(channel_axes=-1))
    assert spec.channel_axes == (-1,)
    rule = expect_ok(lambda: jc.QuantRule(pattern=".*", channel_axes=-1))
    q, _ = jc.quantize_params({"w": jnp.ones((4, 3))}, [rule])
    assert q["w"].scale.shape == (1, 3)


LEAF_MISFITS = {
    "group-axis-out-of-range": (dict(bits=4, group_size=5, group_axis=2), ("['dense']['kernel']", "group axis 2")),
    "axis-out-of-range": (dict(channel_axes=(3,)), ("['dense']['kernel']", "channel axis 3")),
    "group-axis-is-channel": (dict(channel_axes=(0,), group_size=4, group_axis=0), ("['dense']['kernel']", "group axis 0")),
    "channel-axes-repeat": (dict(channel_axes=(1, -1)), ("['dense']['kernel']", "repeat")),
}


def test_ragged_group_fits_every_width():
    # issue 19: a group size that does not divide its axis is a shorter last group, not an error
    params = {"params": {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}}
    q, _ = expect_ok(lambda: jc.quantize_params(params, [jc.QuantRule(pattern=".*kernel", bits=4, group_size=5)]))
    assert q["params"]["dense"]["kernel"].scale.shape == (4, 1)


@pytest.mark.parametrize("case", sorted(LEAF_MISFITS))
def test_rule_that_does_not_fit_the_leaf(case):
    kwargs, needles = LEAF_MISFITS[case]
    params = {"params": {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}}
    expect_clear(lambda: jc.quantize_params(params, [jc.QuantRule(pattern=".*kernel", **kwargs)]), ValueError, *needles)


def test_zero_size_leaf_is_skipped_with_a_reason():
    # issue 18: "zero-size array to reduction operation max" from deep inside
    params = {"empty": jnp.ones((0, 4)), "w": jnp.ones((4, 4))}
    q, report = expect_ok(lambda: jc.quantize_params(params, [jc.QuantRule(pattern=".*", channel_axes=(-1,))]))
    (decision,) = [d for d in report.leaves if d.path == "empty"]
    assert decision.action == "skipped" and "zero-size" in decision.reason
    assert q["empty"].shape == (0, 4) and isinstance(q["w"], jc.QArray)


def test_zero_size_array_to_quantize():
    expect_clear(lambda: jc.quantize(jnp.ones((0, 4)), bits=8, name="params['emb']"), ValueError, "params['emb']", "zero-size")


def test_nan_weight_names_the_leaf():
    params = {"layer": {"kernel": jnp.array([[1.0, jnp.nan], [0.5, 2.0]])}}
    expect_clear(lambda: jc.quantize_params(params, [jc.QuantRule(pattern=".*")]), ValueError, "layer", "nan")


def test_rules_that_are_not_quant_rules():
    expect_clear(lambda: jc.quantize_params({"w": jnp.ones((2, 2))}, [jc.PruneRule(pattern=".*", sparsity=0.5)]), TypeError, "rules[0]", "QuantRule")


def test_bad_regex_names_the_pattern():
    expect_clear(lambda: jc.quantize_params({"w": jnp.ones((2, 2))}, [jc.QuantRule(pattern="(")]), ValueError, "(")


def test_unused_rule_error():
    expect_clear(lambda: jc.quantize_params({"w": jnp.ones((2, 2))}, [jc.QuantRule(pattern="nothing")], on_unused="error"), ValueError, "nothing")


def test_unused_rule_bad_mode():
    expect_clear(lambda: jc.quantize_params({"w": jnp.ones((2, 2))}, [jc.QuantRule(pattern=".*")], on_unused="loud"), ValueError, "on_unused", "loud")


def test_ranges_for_unknown_leaf():
    expect_clear(lambda: jc.quantize_params({"w": jnp.ones((2, 2))}, [jc.QuantRule(pattern=".*")], ranges={"v": (0.0, 1.0)}), ValueError, "'v'")


def test_int_and_bool_leaves_are_skipped():
    params = {"step": jnp.array(3), "mask": jnp.ones((2, 2), bool), "w": jnp.ones((2, 2))}
    _, report = expect_ok(lambda: jc.quantize_params(params, [jc.QuantRule(pattern=".*")]))
    assert report.quantized == ("w",)


def test_dequantize_params_of_a_wrong_dtype():
    q = jc.quantize(jnp.ones((2, 2)))
    expect_clear(lambda: jc.dequantize_params({"w": q}, dtype="float77"), TypeError, "float77")


def test_already_quantized_numpy_roundtrip():
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    q = expect_ok(lambda: jc.quantize(w, bits=8, channel_axes=(-1,)))
    np.testing.assert_allclose(np.asarray(q.dequantize()), w, atol=1.0 / 127)
