"""AWQ: scales and error vs float64 NumPy references; never worse than round-to-nearest."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxcompress as jc
from jaxcompress.execute.transform import compressed
from jaxcompress.oneshot.awq import awq, awq_matrix, awq_scales, fake_quant_rows, row_errors


def _np_fake_quant(w, bits, group):
    d_out, d_in = w.shape
    g = w.reshape(d_out, d_in // group, group)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(g).max(-1, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(g / scale), -qmax, qmax) * scale).reshape(d_out, d_in)


def _np_awq(w, x, bits, group, grid):
    """float64 reference of the search (no clip)."""
    h = x.T @ x
    mean = np.abs(x).mean(0)

    def err(scale):
        e = _np_fake_quant(w * scale, bits, group) / scale - w
        return np.sum((e @ h) * e)

    best = (err(np.ones(w.shape[1])), 0.0)
    for a in np.linspace(0, 1, grid)[1:]:
        s = mean**a
        s = s / np.sqrt(s.max() * s.min())
        best = min(best, (err(s), a), key=lambda t: t[0])
    return best


def test_scales_match_numpy():
    mean = np.array([0.5, 2.0, 8.0, 0.0])
    for a in (0.0, 0.4, 1.0):
        m = np.where(mean > 0, mean, 0.5)
        ref = m**a / np.sqrt((m**a).max() * (m**a).min())
        np.testing.assert_allclose(np.asarray(awq_scales(mean, a)), ref, rtol=1e-5)
    assert np.asarray(awq_scales(np.zeros(3), 0.7)).tolist() == [1.0, 1.0, 1.0]


def test_fake_quant_and_row_errors_match_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 16))
    np.testing.assert_allclose(np.asarray(fake_quant_rows(w, 4, 8)), _np_fake_quant(w, 4, 8), rtol=1e-5, atol=1e-6)
    x = rng.normal(size=(10, 16))
    delta = rng.normal(size=(4, 16))
    np.testing.assert_allclose(np.asarray(row_errors(delta, x.T @ x)), ((x @ delta.T) ** 2).sum(0), rtol=1e-4)


def test_matrix_search_matches_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(128, 32)) * np.exp(rng.normal(size=32))
    w = rng.normal(size=(8, 32))
    out = awq_matrix(w, x.T @ x, np.abs(x).mean(0), lambda m: fake_quant_rows(m, 4, 16), grid=6)
    ref_error, ref_exponent = _np_awq(w, x, 4, 16, 6)
    assert out["exponent"] == pytest.approx(ref_exponent)
    assert out["error"] == pytest.approx(ref_error, rel=1e-3)
    assert out["error"] <= out["error_rtn"]


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([3, 4, 8]), clip=st.booleans())
def test_never_worse_than_rtn(seed, bits, clip):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(48, 16)) * np.exp(2 * rng.normal(size=16))
    w = rng.normal(size=(6, 16))
    out = awq_matrix(
        w, x.T @ x, np.abs(x).mean(0), lambda m: fake_quant_rows(m, bits, 8), grid=4,
        clip_grid=(0.9, 0.8) if clip else (),
    )
    assert np.isfinite(out["error"]) and out["error"] <= out["error_rtn"] * (1 + 1e-6)


def test_tree_level_w4_g128_flax_dense_beats_rtn():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16)(nn.relu(nn.Dense(256)(x)))

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(300, 128)) * np.exp(rng.normal(size=128)), jnp.float32)
    model = Mlp()
    params = model.init(jax.random.key(0), x)
    rules = [jc.QuantRule(pattern=r".*kernel", bits=4, channel_axes=(-1,), group_size=128)]
    qparams, report = awq(model.apply, params, [x[:150], x[150:]], rules, grid=4, clip_grid=(0.9, 0.8))
    assert len(report.layers) == 2
    for layer in report.layers:
        assert layer.error <= layer.error_plain and 0.8 <= layer.clip <= 1.0
    q = qparams["params"]["Dense_1"]["kernel"]  # the inner Dense(256) is built second
    assert q.input_scale.shape == (128, 1) and q.bits == 4
    rtn, _ = jc.quantize_params(params, rules)
    exact = model.apply(params, x)
    err_awq = float(jnp.mean((compressed(model.apply)(qparams, x) - exact) ** 2))
    err_rtn = float(jnp.mean((compressed(model.apply)(rtn, x) - exact) ** 2))
    assert err_awq < err_rtn
    # the float path equals compressed's weight-only run
    float_out = model.apply(jc.dequantize_params(qparams), x)
    assert jnp.allclose(compressed(model.apply)(qparams, x), float_out, atol=1e-4)


def test_degenerate_calibration_warns_never_nan():
    w = jnp.asarray(np.random.default_rng(3).normal(size=(16, 4)), jnp.float32)
    fn = lambda p, x: x @ p["w"]
    rules = [jc.QuantRule(pattern="w", bits=4, channel_axes=(-1,), group_size=8)]
    with pytest.warns(RuntimeWarning, match="zero"):
        qparams, report = awq(fn, {"w": w}, [jnp.zeros((3, 16))], rules, grid=4)
    assert bool(jnp.all(jnp.isfinite(qparams["w"].dequantize())))
    with pytest.warns(RuntimeWarning, match="calibration rows"):
        qparams, report = awq(fn, {"w": w}, [jnp.ones((2, 16)).at[:, 3].set(0.0)], rules, grid=4, clip_grid=(0.9,))
    assert bool(jnp.all(jnp.isfinite(qparams["w"].dequantize())))
    assert report.layers[0].error <= report.layers[0].error_plain
