"""Reconstruction of a pruned layer's remaining weights: masked least squares on its calibration
inputs, the mask fixed.

For a matrix-view weight ``W0`` ``(d_out, d_in)``, a keep-mask ``K`` and ``H = X^T X`` of the
calibration inputs, the kept weights are re-fit so that the layer's outputs on the calibration
data match the dense ones as well as the mask allows::

    min_W  tr((W - W0) H_d (W - W0)^T)   subject to   W = 0 where K is False,

with ``H_d`` the damped ``H`` (`jaxcompress.oneshot.sparsegpt.damped_hessian`; the damping keeps
the problem well posed and the weights near ``W0`` along directions the data does not see). The
rows are independent; each is solved by preconditioned conjugate gradients (Jacobi
preconditioner) on the kept coordinates, all rows at once, ``iterations`` steps of one
``(d_out, d_in) @ (d_in, d_in)`` matmul each, starting from the pruned weight given (Wanda's
masked ``W0`` or SparseGPT's OBS-updated weight). CG from a start point never increases the
objective in exact arithmetic; in float32 the result is kept only if its error is not larger
than the start's.

For Wanda this adds SparseGPT-like weight updates to Wanda's mask; for SparseGPT it re-solves
the kept weights jointly (the OBS column sweep freezes each column once visited).

Measured (``benchmarks/oneshot_prune.py``, all-MiniLM-L6-v2, 36 encoder kernels at 50%
unstructured, 128 calibration / 256 held-out sentences, mean cosine to the fp32 embeddings):
Wanda 0.867 -> 0.933 with ``reconstruct=True``, SparseGPT 0.920 -> 0.933, for about the time of
the method itself again (Wanda) or a few percent more (SparseGPT). Each leaf is fit to the dense
weight on the inputs it sees in the partly pruned model (``W0 X``); with ``dense_target=True``
(SparseGPT's default) the driver passes the drift-aware target ``W*`` of
`jaxcompress.oneshot.targets` as ``dense`` instead, which fits the dense model's outputs (same
``H``, same solver). It needs calibration rows: with fewer rows than a kernel's inputs ``X^T X`` is
rank-deficient and the fit follows the calibration set (the 16-sentence quick run of the same
benchmark, two layers: Wanda 0.973, with the re-fit 0.969).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["masked_least_squares", "reconstruction_error"]


def reconstruction_error(weight: jax.Array, dense: jax.Array, hessian: jax.Array) -> jax.Array:
    """``tr((W - W0) H (W - W0)^T)``: the squared output error on the calibration data.

    >>> float(reconstruction_error(jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 1.0]]), jnp.eye(2)))
    1.0
    """
    delta = jnp.asarray(weight, jnp.float32) - jnp.asarray(dense, jnp.float32)
    return jnp.sum((delta @ jnp.asarray(hessian, jnp.float32)) * delta)


@functools.partial(jax.jit, static_argnames=("iterations",))
def _solve(start, dense, keep, hessian, iterations):
    keep = keep.astype(jnp.float32)
    apply = lambda p: (p @ hessian) * keep  # the masked operator, row-wise
    diag = jnp.diagonal(hessian)
    precondition = lambda r: r * keep / diag[None, :]
    w = start * keep
    residual = ((dense - w) @ hessian) * keep
    z = precondition(residual)
    direction = z
    rz = jnp.sum(residual * z, axis=1)
    tiny = jnp.finfo(jnp.float32).tiny

    def body(_, carry):
        w, residual, direction, rz = carry
        q = apply(direction)
        curvature = jnp.sum(direction * q, axis=1)
        alpha = jnp.where(curvature > tiny, rz / jnp.maximum(curvature, tiny), 0.0)
        w = w + alpha[:, None] * direction
        residual = residual - alpha[:, None] * q
        z = precondition(residual)
        rz_new = jnp.sum(residual * z, axis=1)
        beta = jnp.where(rz > tiny, rz_new / jnp.maximum(rz, tiny), 0.0)
        return w, residual, z + beta[:, None] * direction, rz_new

    w = lax.fori_loop(0, iterations, body, (w, residual, direction, rz))[0]
    w = w * keep
    before = reconstruction_error(start * keep, dense, hessian)
    after = reconstruction_error(w, dense, hessian)
    ok = jnp.all(jnp.isfinite(w)) & (after <= before)
    return jnp.where(ok, w, start * keep)


def masked_least_squares(
    pruned: jax.Array,
    dense: jax.Array,
    keep: jax.Array,
    hessian: jax.Array,
    *,
    damp: float = 0.01,
    iterations: int = 50,
    name: str = "weight",
) -> jax.Array:
    """Re-fit the kept weights of a pruned matrix-view weight (see the module docs).

    Args:
      pruned: ``(d_out, d_in)`` start point (zero where ``keep`` is False).
      dense: ``(d_out, d_in)`` the weight before pruning (the target ``W0``).
      keep: ``(d_out, d_in)`` bool keep-mask.
      hessian: ``(d_in, d_in)`` ``X^T X`` of the calibration inputs.
      damp: relative damping ``damp * mean(diag(H))`` added to the diagonal.
      iterations: conjugate-gradient steps (static).
      name: used in error messages.

    Returns the re-fit weight, exactly zero where ``keep`` is False, in ``pruned``'s dtype.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    >>> x[:, 1] += x[:, 0]                                    # correlated inputs
    >>> w0 = np.ones((2, 6), np.float32)
    >>> keep = np.array([[True, False] * 3, [False, True] * 3])
    >>> fit = masked_least_squares(np.where(keep, w0, 0), w0, keep, x.T @ x)
    >>> bool(reconstruction_error(fit, w0, x.T @ x) < reconstruction_error(np.where(keep, w0, 0), w0, x.T @ x))
    True
    """
    from jaxcompress.oneshot.sparsegpt import damped_hessian

    pruned, dense, keep, hessian = (jnp.asarray(a) for a in (pruned, dense, keep, hessian))
    if pruned.ndim != 2 or pruned.shape != dense.shape or keep.shape != pruned.shape:
        raise ValueError(
            f"{name}: pruned {tuple(pruned.shape)}, dense {tuple(dense.shape)} and keep {tuple(keep.shape)} must be "
            f"the same (d_out, d_in) matrix view"
        )
    if tuple(hessian.shape) != (pruned.shape[1],) * 2:
        raise ValueError(f"{name}: Hessian of shape {tuple(hessian.shape)} does not match d_in={pruned.shape[1]}")
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"{name}: iterations must be a non-negative integer, got {iterations!r}")
    if not damp > 0:
        raise ValueError(f"{name}: reconstruction needs damp > 0, got {damp!r}")
    h = damped_hessian(hessian, damp)
    fit = _solve(pruned.astype(jnp.float32), dense.astype(jnp.float32), keep.astype(bool), h, iterations)
    return fit.astype(pruned.dtype)
