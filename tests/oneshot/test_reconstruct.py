"""Masked least-squares reconstruction against a float64 NumPy solve, its guarantees (mask kept,
never worse than the start), errors, and wanda / sparsegpt with reconstruct=True."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.oneshot.reconstruct import masked_least_squares, reconstruction_error
from jaxcompress.oneshot.sparsegpt import damped_hessian, sparsegpt
from jaxcompress.oneshot.wanda import wanda


def _reference(w0, keep, hessian):
    """Float64: per row, the kept weights solve H_KK w_K = (w0 H)_K."""
    out = np.zeros_like(w0)
    for r in range(w0.shape[0]):
        k = keep[r]
        out[r, k] = np.linalg.solve(hessian[np.ix_(k, k)], (w0[r] @ hessian)[k])
    return out


def test_matches_the_float64_solution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 10)) @ rng.normal(size=(10, 10))  # correlated inputs
    w0 = rng.normal(size=(5, 10))
    keep = rng.uniform(size=(5, 10)) < 0.5
    h = x.T @ x
    fit = masked_least_squares(np.where(keep, w0, 0).astype(np.float32), w0.astype(np.float32), keep,
                               h.astype(np.float32), damp=0.01, iterations=40)
    expected = _reference(w0, keep, np.asarray(damped_hessian(h, 0.01), np.float64))
    np.testing.assert_allclose(np.asarray(fit), expected, rtol=2e-3, atol=2e-3)
    assert np.all(np.asarray(fit)[~keep] == 0)


def test_never_worse_than_the_start_and_errors():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 16)).astype(np.float32)  # fewer rows than inputs: rank-deficient H
    w0 = rng.normal(size=(3, 16)).astype(np.float32)
    keep = np.tile([True, False], (3, 8))
    start = np.where(keep, w0, 0)
    h = damped_hessian(x.T @ x, 0.01)
    for iterations in (0, 1, 5):
        fit = masked_least_squares(start, w0, keep, x.T @ x, iterations=iterations)
        assert float(reconstruction_error(fit, w0, h)) <= float(reconstruction_error(start, w0, h)) * (1 + 1e-6)
    with pytest.raises(ValueError, match="same \\(d_out, d_in\\) matrix view"):
        masked_least_squares(start, w0[:2], keep, x.T @ x)
    with pytest.raises(ValueError, match="does not match d_in=16"):
        masked_least_squares(start, w0, keep, np.eye(4))
    with pytest.raises(ValueError, match="damp > 0"):
        masked_least_squares(start, w0, keep, x.T @ x, damp=0.0)


def test_wanda_and_sparsegpt_with_reconstruction_lower_the_layer_error():
    keys = jax.random.split(jax.random.key(3), 3)
    params = {"w": jax.random.normal(keys[0], (24, 6))}
    fn = lambda p, x: x @ p["w"]
    x = jax.random.normal(keys[1], (96, 24)) @ jax.random.normal(keys[2], (24, 24))
    rule = [jc.PruneRule(pattern="w", sparsity=0.5)]
    error = lambda p: float(jnp.sum((fn(p, x) - fn(params, x)) ** 2))
    for method in (wanda, sparsegpt):
        plain, plain_masks = method(fn, params, [x], rule, reconstruct=False)
        fitted, masks = method(fn, params, [x], rule, reconstruct=True)
        np.testing.assert_array_equal(masks["w"], plain_masks["w"])  # the mask is the method's
        assert bool(jnp.all(jnp.where(masks["w"], True, fitted["w"] == 0)))
        assert error(fitted) < error(plain)
