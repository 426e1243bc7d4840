"""SmoothQuant: per-matrix scales vs a float64 NumPy reference, tree level through compressed."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.execute.transform import compressed
from jaxcompress.oneshot.smoothquant import output_error, smoothquant, smoothquant_scales


def _outlier_data(seed=0, rows=64, d_in=32, d_out=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, d_in)) * np.where(np.arange(d_in) % 8 == 0, 40.0, 1.0)  # outlier channels
    w = rng.normal(size=(d_in, d_out)) * 0.2
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


def test_scales_match_numpy_reference():
    rng = np.random.default_rng(1)
    act = np.abs(rng.normal(size=12)) * 5
    act[3] = 0.0
    weight = rng.normal(size=(7, 12))
    weight[:, 5] = 0.0
    for alpha in (0.0, 0.3, 0.5, 0.85, 1.0):
        ref = act**alpha / np.abs(weight).max(0) ** (1 - alpha)
        ref[[3, 5]] = 1.0
        got = np.asarray(smoothquant_scales(act, weight, alpha), np.float64)
        np.testing.assert_allclose(got, np.clip(ref, 1e-4, 1e4), rtol=2e-5)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(act, weight, 1.5)


def test_output_error_is_trace_form():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 6))
    delta = rng.normal(size=(3, 6))
    expected = np.sum((x @ delta.T) ** 2)
    assert float(output_error(delta, x.T @ x)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("activation", ["dynamic", "static"])
def test_tree_level_w8a8_matches_float_and_beats_plain(activation):
    x, w = _outlier_data()
    params = {"dense": {"kernel": w, "bias": jnp.zeros(w.shape[1])}}
    fn = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
    rules = [jc.QuantRule(pattern=r".*kernel", bits=8, channel_axes=(-1,), activation=activation)]
    qparams, report = smoothquant(fn, params, [x[:32], x[32:]], rules, alpha=0.5)
    q = qparams["dense"]["kernel"]
    assert q.input_scale is not None and q.input_scale.shape == (32, 1)
    assert report.quantized == ("dense/kernel",) and report.layers[0].parameter == 0.5
    if activation == "static":
        assert q.activation_scale is not None
    # the float path is the smoothed model; compressed matches it within int8 tolerance
    ref = np.asarray(x, np.float64) @ np.asarray(q.dequantize(), np.float64)
    out = compressed(fn)(qparams, x)
    assert np.abs(np.asarray(out) - ref).max() <= 0.02 * np.abs(ref).max()
    # and smoothing helps W8A8 against plain RTN on outlier activations
    plain, _ = jc.quantize_params(params, rules)
    if activation == "static":
        from jaxcompress.execute.calibration import attach_activation_scales, calibrate_activations

        plain = attach_activation_scales(plain, calibrate_activations(fn, plain, [x]))
    exact = fn(params, x)
    err_smooth = float(jnp.mean((compressed(fn)(qparams, x) - exact) ** 2))
    err_plain = float(jnp.mean((compressed(fn)(plain, x) - exact) ** 2))
    assert err_smooth < err_plain
    hlo = jax.jit(compressed(fn)).lower(qparams, x).compile().as_text()
    assert "s8[" in hlo and "s32[" in hlo


def test_alpha_search_picks_from_grid_and_reports():
    x, w = _outlier_data(seed=3)
    params = {"w": w}
    fn = lambda p, x: x @ p["w"]
    rules = [jc.QuantRule(pattern="w", bits=8, channel_axes=(-1,), activation="dynamic")]
    grid = (0.0, 0.25, 0.5, 0.75)
    qparams, report = smoothquant(fn, params, [x], rules, alpha=grid)
    layer = report.layers[0]
    assert layer.parameter in grid and layer.error <= layer.error_plain
    assert np.isfinite(layer.error) and report.to_dict()["method"] == "smoothquant"


def test_degenerate_calibration_warns_never_nan():
    w = jnp.asarray(np.random.default_rng(4).normal(size=(8, 4)), jnp.float32)
    fn = lambda p, x: x @ p["w"]
    rules = [jc.QuantRule(pattern="w", bits=8, channel_axes=(-1,), activation="dynamic")]
    with pytest.warns(RuntimeWarning, match="zero"):
        qparams, _ = smoothquant(fn, {"w": w}, [jnp.zeros((4, 8))], rules, alpha=(0.0, 0.5))
    assert bool(jnp.all(jnp.isfinite(qparams["w"].dequantize())))
    assert bool(jnp.all(qparams["w"].input_scale == 1.0))
    # one zero channel, few rows: finite, the zero channel keeps s = 1
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 8)), jnp.float32).at[:, 2].set(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        qparams, _ = smoothquant(fn, {"w": w}, [x], rules, alpha=(0.5, 1.0))
    assert bool(jnp.all(jnp.isfinite(qparams["w"].dequantize())))
    assert float(qparams["w"].input_scale[2, 0]) == 1.0
    out = compressed(fn)(qparams, x)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_unused_leaf_quantized_plainly_and_bad_rules():
    x, w = _outlier_data(seed=6)
    params = {"w": w, "unused": jnp.ones((4, 4))}
    fn = lambda p, x: x @ p["w"]
    rules = [jc.QuantRule(pattern=".*", bits=8, channel_axes=(-1,))]
    qparams, report = smoothquant(fn, params, [x], rules)
    assert report.uncalibrated == ("unused",) and qparams["unused"].input_scale is None
    with pytest.raises(TypeError, match="QuantRule"):
        smoothquant(fn, params, [x], [jc.PruneRule(pattern="w", sparsity=0.5)])
    with pytest.raises(ValueError, match="batch"):
        smoothquant(fn, params, [], rules)
