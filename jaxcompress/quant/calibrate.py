"""Weight calibration: choose the clipping range ``[lo, hi]`` of every scale group.

All functions are pure and jit-able. They take the GROUPED view of an array (see
`ResolvedSpec.grouped_shape`) and the axes one scale is shared over, and return ``(lo, hi)`` with
those axes kept as size 1. Symmetric quantization gets ``lo = -hi``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress.quant.codec import round_trip
from jaxcompress.quant.spec import ResolvedSpec

__all__ = ["absmax_range", "percentile_range", "mse_range", "calibrate_range"]


def _finite_or_zero(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, 0.0)


def absmax_range(x: jax.Array, reduce_axes: tuple[int, ...], symmetric: bool):
    """The full range of each group: ``[-max|x|, max|x|]`` or ``[min x, max x]``.

    >>> import jax.numpy as jnp
    >>> absmax_range(jnp.array([[1.0, -3.0], [2.0, 0.5]]), (1,), True)[1].ravel().tolist()
    [3.0, 2.0]
    """
    if symmetric:
        hi = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True)
        return -hi, hi
    return (
        jnp.min(x, axis=reduce_axes, keepdims=True),
        jnp.max(x, axis=reduce_axes, keepdims=True),
    )


def _percentile_over(x: jax.Array, q: float, reduce_axes: tuple[int, ...]) -> jax.Array:
    """Percentile over several axes at once, keeping them as size 1."""
    kept = [a for a in range(x.ndim) if a not in reduce_axes]
    moved = jnp.transpose(x, kept + list(reduce_axes))
    flat = moved.reshape(tuple(x.shape[a] for a in kept) + (-1,))
    result = jnp.percentile(flat, q, axis=-1)
    out_shape = tuple(1 if a in reduce_axes else x.shape[a] for a in range(x.ndim))
    return result.reshape(out_shape)


def percentile_range(
    x: jax.Array, reduce_axes: tuple[int, ...], symmetric: bool, percentile: float
):
    """Clip at the ``percentile``-th percentile of ``|x|`` (symmetric) or of ``x`` at both ends."""
    if symmetric:
        hi = _percentile_over(jnp.abs(x), percentile, reduce_axes)
        return -hi, hi
    return (
        _percentile_over(x, 100.0 - percentile, reduce_axes),
        _percentile_over(x, percentile, reduce_axes),
    )


def mse_range(x: jax.Array, reduce_axes: tuple[int, ...], spec: ResolvedSpec):
    """Grid search over clip ratios ``r`` (range ``[r*lo, r*hi]``), minimising the squared
    round-trip error per scale group. Starts from ``r = 1`` (absmax) and only moves to a smaller
    ratio that is strictly better, so the error is never above absmax's. Runs as a
    ``fori_loop`` so memory stays at a few copies of ``x`` whatever the grid size.
    """
    lo, hi = absmax_range(x, reduce_axes, spec.symmetric)
    calibration = spec.calibration

    def error(ratio):
        dq = round_trip(x, ratio * lo, ratio * hi, spec)
        return jnp.sum(jnp.square(x - dq), axis=reduce_axes, keepdims=True)

    best_error = error(jnp.float32(1.0))
    best_ratio = jnp.ones_like(best_error)
    if calibration.grid_size <= 1:
        return lo, hi
    ratios = jnp.linspace(calibration.min_ratio, 1.0, calibration.grid_size, dtype=jnp.float32)

    def body(i, carry):
        best_error, best_ratio = carry
        ratio = ratios[i]
        err = error(ratio)
        better = err < best_error
        return jnp.where(better, err, best_error), jnp.where(better, ratio, best_ratio)

    _, best_ratio = jax.lax.fori_loop(0, calibration.grid_size - 1, body, (best_error, best_ratio))
    return best_ratio * lo, best_ratio * hi


def calibrate_range(x: jax.Array, spec: ResolvedSpec, reduce_axes: tuple[int, ...]):
    """Dispatch on ``spec.calibration.method``. Non-finite elements are ignored when
    ``spec.allow_nonfinite`` (otherwise the caller has already rejected them)."""
    if spec.allow_nonfinite:
        x = _finite_or_zero(x)
    method = spec.calibration.method
    if method == "absmax":
        return absmax_range(x, reduce_axes, spec.symmetric)
    if method == "percentile":
        return percentile_range(x, reduce_axes, spec.symmetric, spec.calibration.percentile)
    return mse_range(x, reduce_axes, spec)
