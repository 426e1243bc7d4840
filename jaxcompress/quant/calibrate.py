"""Weight calibration: choose the clipping range ``[lo, hi]`` of every scale group.

All functions are pure and jit-able. They take the GROUPED view of an array (see
`ResolvedSpec.grouped_shape`) and the axes one scale is shared over, and return ``(lo, hi)`` with
those axes kept as size 1. Symmetric quantization gets ``lo = -hi``.

`calibrate_array` takes the array in its ORIGINAL shape instead and keeps a sharded group axis
sharded (see `jaxcompress.quant.codec`): absmax and mse reduce each block of the blocked view and
combine the per-block results into groups; only those small arrays cross shard boundaries.
Percentile needs every element of a group in one place: a group that straddles a shard boundary
is gathered for it (a copy for calibration; the codes still keep the param's sharding).

A ragged last group (`jaxcompress.quant.groups`) is calibrated on its own elements only: the
grouped view pads it with its last element for min / max (which that leaves unchanged), with NaN
for percentiles (nan-aware), and with zeros for the MSE search (zero round-trips exactly, so the
padding adds no error).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress.quant.codec import block_size, blocks_to_groups, groups_to_blocks, round_trip, to_blocks
from jaxcompress.quant.groups import is_ragged
from jaxcompress.quant.spec import ResolvedSpec

__all__ = ["absmax_range", "percentile_range", "mse_range", "calibrate_range", "calibrate_array"]


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


def _percentile_over(x: jax.Array, q: float, reduce_axes: tuple[int, ...], ignore_nan: bool = False) -> jax.Array:
    """Percentile over several axes at once, keeping them as size 1 (``ignore_nan``: NaN
    elements, the padding of a ragged group, are left out)."""
    kept = [a for a in range(x.ndim) if a not in reduce_axes]
    moved = jnp.transpose(x, kept + list(reduce_axes))
    flat = moved.reshape(tuple(x.shape[a] for a in kept) + (-1,))
    result = (jnp.nanpercentile if ignore_nan else jnp.percentile)(flat, q, axis=-1)
    out_shape = tuple(1 if a in reduce_axes else x.shape[a] for a in range(x.ndim))
    return result.reshape(out_shape)


def percentile_range(
    x: jax.Array, reduce_axes: tuple[int, ...], symmetric: bool, percentile: float, ignore_nan: bool = False
):
    """Clip at the ``percentile``-th percentile of ``|x|`` (symmetric) or of ``x`` at both ends
    (``ignore_nan``: NaN elements are not counted)."""
    if symmetric:
        hi = _percentile_over(jnp.abs(x), percentile, reduce_axes, ignore_nan)
        return -hi, hi
    return (
        _percentile_over(x, 100.0 - percentile, reduce_axes, ignore_nan),
        _percentile_over(x, percentile, reduce_axes, ignore_nan),
    )


def mse_range(x: jax.Array, reduce_axes: tuple[int, ...], spec: ResolvedSpec):
    """Grid search over clip ratios ``r`` (range ``[r*lo, r*hi]``), minimising the squared
    round-trip error per scale group. Starts from ``r = 1`` (absmax) and only moves to a smaller
    ratio that is strictly better, so the error is never above absmax's. Runs as a
    ``fori_loop`` so memory stays at a few copies of ``x`` whatever the grid size.
    """
    lo, hi = absmax_range(x, reduce_axes, spec.symmetric)
    return _mse_search(x, lo, hi, reduce_axes, spec, lambda a: a, lambda a: a)


def _mse_search(x, lo, hi, reduce_axes, spec: ResolvedSpec, to_x_layout, sum_to_groups):
    """The grid search of `mse_range` with the range per group and ``x`` in a possibly finer
    layout: ``to_x_layout`` maps per-group arrays onto ``x``'s, ``sum_to_groups`` sums per-``x``
    partial errors into groups."""
    calibration = spec.calibration
    if calibration.grid_size <= 1:
        return lo, hi
    lo_x, hi_x = to_x_layout(lo), to_x_layout(hi)

    def error(ratio):
        dq = round_trip(x, ratio * lo_x, ratio * hi_x, spec)
        return sum_to_groups(jnp.sum(jnp.square(x - dq), axis=reduce_axes, keepdims=True))

    best_error = error(jnp.float32(1.0))
    best_ratio = jnp.ones_like(best_error)
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


def calibrate_array(x: jax.Array, spec: ResolvedSpec, block: int | None = None):
    """`calibrate_range` of ``x`` given in its ORIGINAL shape (float32), returning ``(lo, hi)``
    in the grouped layout; a sharded group axis stays sharded (``block``: see
    `jaxcompress.quant.codec.block_size`, computed from ``x`` unless given).

    >>> import jax.numpy as jnp
    >>> from jaxcompress.quant.spec import QuantSpec
    >>> spec = QuantSpec(bits=4, symmetric=True, group_size=2, group_axis=0).resolve((4, 1))
    >>> calibrate_array(jnp.array([[1.0], [-3.0], [2.0], [0.5]]), spec, block=1)[1].ravel().tolist()
    [3.0, 2.0]
    >>> asym = QuantSpec(bits=4, group_size=2, group_axis=0).resolve((4, 1))  # 4 bits: asymmetric
    >>> [a.ravel().tolist() for a in calibrate_array(jnp.array([[1.0], [-3.0], [2.0], [0.5]]), asym, block=1)]
    [[-3.0, 0.5], [1.0, 2.0]]
    """
    reduce_axes = spec.reduce_axes(x.ndim)
    if spec.group_axis is None or spec.group_size is None:
        return calibrate_range(x, spec, reduce_axes)
    if spec.allow_nonfinite:
        x = _finite_or_zero(x)
    if block is None:
        block = block_size(x, spec)
    ragged = is_ragged(int(x.shape[spec.group_axis]), spec.group_size)
    method = spec.calibration.method
    if method == "percentile":  # whole groups (gathered where they straddle shards)
        grouped, _ = to_blocks(x, spec, spec.group_size, "nan" if ragged else "zero")
        return percentile_range(grouped, reduce_axes, spec.symmetric, spec.calibration.percentile, ignore_nan=ragged)
    if block == spec.group_size:
        edge, _ = to_blocks(x, spec, block, "edge")
        lo, hi = absmax_range(edge, reduce_axes, spec.symmetric)
        if method == "absmax":
            return lo, hi
        zero = to_blocks(x, spec, block, "zero")[0] if ragged else edge
        return _mse_search(zero, lo, hi, reduce_axes, spec, lambda a: a, lambda a: a)
    blocked, block = to_blocks(x, spec, block)
    lo, hi = absmax_range(blocked, reduce_axes, spec.symmetric)
    hi = blocks_to_groups(hi, spec, block, "max")
    lo = -hi if spec.symmetric else blocks_to_groups(lo, spec, block, "min")
    if spec.calibration.method == "absmax":
        return lo, hi
    return _mse_search(
        blocked,
        lo,
        hi,
        reduce_axes,
        spec,
        lambda a: groups_to_blocks(a, spec, block),
        lambda a: blocks_to_groups(a, spec, block, "sum"),
    )
