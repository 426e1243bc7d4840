"""Static activation calibration: statistics recomputed by hand in NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import flax.linen as nn
import jax

import jaxcompress as jc
from jaxcompress.execute.transform import compressed
from jaxcompress.execute import attach_activation_scales, calibrate_activations
from tests.execute.reference import dense_w8a8


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.relu(nn.Dense(16, name="first")(x))
        return nn.Dense(4, name="second")(h)


def _setup(activation="static"):
    model = TwoLayer()
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.normal(size=(6, 8)) * (1 + i), jnp.float32) for i in range(3)]
    params = model.init(jax.random.key(0), batches[0])
    rules = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation=activation)]
    qparams, _ = jc.quantize_params(params, rules)
    return model, qparams, batches


def _hidden(model, qparams, x):
    """The activation the second kernel meets, computed weight-only."""
    p = jc.dequantize_params(qparams)["params"]
    return np.maximum(np.asarray(x) @ np.asarray(p["first"]["kernel"]) + np.asarray(p["first"]["bias"]), 0)


def test_absmax_and_percentile_match_numpy():
    model, qparams, batches = _setup()
    scales = calibrate_activations(model.apply, qparams, batches)
    first = max(np.abs(np.asarray(b)).max() for b in batches) / 127
    second = max(np.abs(_hidden(model, qparams, b)).max() for b in batches) / 127
    np.testing.assert_allclose(float(scales["params"]["first"]["kernel"]), first, rtol=1e-6)
    np.testing.assert_allclose(float(scales["params"]["second"]["kernel"]), second, rtol=1e-5)
    assert scales["params"]["first"]["bias"] is None

    scales = calibrate_activations(model.apply, qparams, batches, method="percentile", percentile=90.0)
    expected = np.mean([np.percentile(np.abs(np.asarray(b)), 90.0) for b in batches]) / 127
    np.testing.assert_allclose(float(scales["params"]["first"]["kernel"]), expected, rtol=1e-5)


def test_mse_clips_an_outlier_and_is_never_worse_on_the_samples():
    model, qparams, _ = _setup()
    rng = np.random.default_rng(1)
    batches = [jnp.asarray(rng.normal(size=(512, 8)), jnp.float32) for _ in range(3)]
    batches[1] = batches[1].at[0, 0].set(40.0)          # one outlier among 12288 values
    absmax = calibrate_activations(model.apply, qparams, batches)
    mse = calibrate_activations(model.apply, qparams, batches, method="mse", bins=1 << 12)
    a = float(absmax["params"]["first"]["kernel"])
    m = float(mse["params"]["first"]["kernel"])
    assert m < a
    samples = np.abs(np.concatenate([np.asarray(b).ravel() for b in batches]))

    def error(scale):
        return np.mean((np.clip(np.round(samples / scale), -127, 127) * scale - samples) ** 2)

    assert error(m) <= error(a)


def test_static_w8a8_runs_the_calibrated_integer_arithmetic():
    model, qparams, batches = _setup()
    scales = calibrate_activations(model.apply, qparams, batches)
    calibrated = attach_activation_scales(qparams, scales)
    kernel = calibrated["params"]["first"]["kernel"]
    assert kernel.activation == "static"
    assert kernel.nbytes == qparams["params"]["first"]["kernel"].nbytes + 4
    x = batches[1]
    out = jax.jit(compressed(model.apply))(calibrated, x)
    p = calibrated["params"]
    hidden = np.maximum(dense_w8a8(x, p["first"]["kernel"], p["first"]["bias"], static_scale=float(scales["params"]["first"]["kernel"])), 0)
    expected = dense_w8a8(
        hidden.astype(np.float32), p["second"]["kernel"], p["second"]["bias"],
        static_scale=float(scales["params"]["second"]["kernel"]),
    )
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_attach_can_switch_mode_and_validates():
    model, qparams, batches = _setup(activation="weight_only")
    scales = calibrate_activations(model.apply, qparams, batches[:1])
    switched = attach_activation_scales(qparams, scales, activation="static")
    assert switched["params"]["second"]["kernel"].activation == "static"
    with pytest.raises(ValueError, match="activation"):
        attach_activation_scales(qparams, scales, activation="int8")
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_activations(model.apply, qparams, [])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3000), st.floats(0.0, 100.0), st.integers(0, 2**31 - 1), st.floats(0.0, 0.9))
def test_magnitude_percentile_matches_numpy_without_sorting(n, percentile, seed, zero_fraction):
    from jaxcompress.execute.calibration import magnitude_percentile

    rng = np.random.default_rng(seed)
    values = np.abs(rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
    values[: int(zero_fraction * n)] = 0.0  # ties
    got = float(magnitude_percentile(jnp.asarray(values), percentile))
    expected = np.percentile(values.astype(np.float64), percentile)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-30)
    hlo = jax.jit(lambda v: magnitude_percentile(v, percentile)).lower(jnp.asarray(values)).as_text()
    assert "sort" not in hlo
