"""Calibration: percentile against NumPy, MSE search never worse than absmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxcompress as jc


def _sq_error(x, q):
    return float(np.sum((np.asarray(jc.dequantize(q), np.float64) - np.asarray(x, np.float64)) ** 2))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    tail=st.floats(1.0, 8.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_mse_is_never_worse_than_absmax(bits, symmetric, granularity, tail, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(df=tail, size=(32, 12)) * rng.uniform(0.01, 3)).astype(np.float32)
    options = dict(bits=bits, symmetric=symmetric)
    if granularity == "channel":
        options["channel_axes"] = (-1,)
    elif granularity == "group":
        options.update(channel_axes=(-1,), group_size=8, group_axis=0)
    absmax = jc.quantize(x, calibration="absmax", **options)
    mse = jc.quantize(x, calibration="mse", **options)
    assert _sq_error(x, mse) <= _sq_error(x, absmax) * (1 + 1e-6) + 1e-12


def test_mse_clips_outliers_at_low_bits():
    rng = np.random.default_rng(0)
    x = rng.laplace(size=(512, 4)).astype(np.float32)
    x[0, :] = 40.0  # one outlier per channel
    absmax = jc.quantize(x, bits=4, channel_axes=(-1,))
    mse = jc.quantize(x, bits=4, channel_axes=(-1,), calibration="mse")
    assert _sq_error(x, mse) < 0.9 * _sq_error(x, absmax)
    assert np.all(np.asarray(mse.scale) < np.asarray(absmax.scale))


@pytest.mark.parametrize("percentile", [90.0, 99.0, 100.0])
def test_percentile_matches_numpy(percentile):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 3)).astype(np.float32)
    q = jc.quantize(x, bits=8, channel_axes=(-1,), calibration=jc.Calibration(method="percentile", percentile=percentile))
    expected = np.percentile(np.abs(x.astype(np.float64)), percentile, axis=0, keepdims=True) / 127
    np.testing.assert_allclose(np.asarray(q.scale), expected, rtol=1e-5)


def test_percentile_asymmetric_uses_both_tails():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((400, 2)) + 3.0).astype(np.float32)
    q = jc.quantize(x, bits=8, symmetric=False, channel_axes=(-1,),
                    calibration=jc.Calibration(method="percentile", percentile=99.0))
    lo = np.minimum(np.percentile(x, 1.0, axis=0), 0.0)
    hi = np.percentile(x, 99.0, axis=0)
    np.testing.assert_allclose(np.asarray(q.scale).ravel(), (hi - lo) / 255, rtol=1e-5)


def test_calibration_is_jittable():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((64, 8)), jnp.float32)
    for method in ("absmax", "percentile", "mse"):
        f = jax.jit(lambda a, m=method: jc.quantize(a, bits=4, channel_axes=(-1,), calibration=m).scale)
        assert f(x).shape == (1, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="median"), "not one of"),
    (dict(percentile=0.0), "percentile"),
    (dict(percentile=101.0), "percentile"),
    (dict(grid_size=0), "grid_size"),
    (dict(min_ratio=0.0), "min_ratio"),
])
def test_bad_calibration_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jc.Calibration(**kwargs)
