"""The arithmetic of one quantization step, on the GROUPED view of an array (internal).

Everything here works on float32 arrays in the grouped layout of `ResolvedSpec.grouped_shape`,
with ranges / scales / zero points that keep the reduced axes as size 1, so plain broadcasting
applies. Kept separate so calibration (which needs a fake-quant round trip to score clip ratios)
and quantization share one definition of the math.

Sharded group axes. The grouped view splits the group axis into ``(dim // group_size,
group_size)``; when that axis is sharded and a group straddles a shard boundary (``g64`` on a
192-long axis split 4 ways: 48 per shard), no sharding of the grouped view matches the param's
and XLA all-gathers the whole array at the reshape. So values are encoded and decoded in a FINER
view, the *blocked* view: the group axis split into ``(dim // block, block)`` with ``block`` the
largest divisor of the group size that also divides the shard size (`block_size`). That view
keeps the param's sharding (every shard holds whole blocks), the scale is expanded from groups to
blocks (`groups_to_blocks`, a small array) and group reductions run as a block reduction followed
by a regrouping of the per-block results (`blocks_to_groups`, 1/block of the param). When groups
align with shards (the usual case) ``block == group_size`` and both steps are no-ops.

Ragged groups (``group_size`` not dividing the axis, `jaxcompress.quant.groups`): with
``block == group_size`` the grouped view pads the axis at its end to whole groups (zeros for
the codes and MSE errors, the edge value for min / max, NaN for percentiles) and the padding is
cut off again; a sharded ragged axis uses blocks that divide the axis, the group size and the
shard length (`block_along`), so the param itself is never padded, and only the small
per-block arrays are padded when they are regrouped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxcompress.qarray import FP8_QTYPES, INT_QTYPE, NF4_QTYPE, storage_dtype
from jaxcompress.quant.groups import group_span, merge_groups, num_groups, split_groups
from jaxcompress.quant.nf4 import nf4_decode, nf4_encode
from jaxcompress.quant.spec import ResolvedSpec

__all__ = [
    "int_range",
    "scale_from_range",
    "encode",
    "decode",
    "round_trip",
    "to_grouped",
    "from_grouped",
    "block_size",
    "block_along",
    "blocked_spec",
    "to_blocks",
    "from_blocks",
    "groups_to_blocks",
    "blocks_to_groups",
    "encode_array",
    "decode_array",
]


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes used: symmetric drops the most negative code so that 0 is centred.

    >>> int_range(8, True), int_range(8, False), int_range(4, True)
    ((-127, 127), (-128, 127), (-7, 7))
    """
    qmax = 2 ** (bits - 1) - 1
    return (-qmax, qmax) if symmetric else (-qmax - 1, qmax)


def fp8_max(qtype: str) -> float:
    return float(ml_dtypes.finfo(FP8_QTYPES[qtype]).max)


def scale_from_range(lo: jax.Array, hi: jax.Array, spec: ResolvedSpec):
    """Scale (and zero point, or None) mapping the clip range ``[lo, hi]`` onto the codes.

    A degenerate range (all zeros, or a range that underflows) gets scale 1.0: never 0 or NaN,
    and zeros still encode to exact zeros.
    """
    if spec.qtype == NF4_QTYPE:  # the code book spans [-1, 1]
        return _stored_scale(jnp.maximum(jnp.abs(lo), jnp.abs(hi)), spec), None
    if spec.qtype != INT_QTYPE:
        absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = absmax / fp8_max(spec.qtype)
        return _stored_scale(scale, spec), None
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    if spec.symmetric:
        absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        return _stored_scale(absmax / qmax, spec), None
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    scale = _stored_scale((hi - lo) / (qmax - qmin), spec)
    zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def _stored_scale(scale: jax.Array, spec: ResolvedSpec) -> jax.Array:
    """A safe scale, representable in ``spec.scale_dtype`` (as float32). A narrower dtype rounds
    UP: ``scale * (1 + eps)`` rounded to nearest is never below ``scale``, so the clip range still
    fits the codes."""
    scale = _safe_scale(scale)
    if spec.scale_dtype == "float32":
        return scale
    dtype = jnp.dtype(spec.scale_dtype)
    widened = (scale * (1.0 + float(jnp.finfo(dtype).eps))).astype(dtype).astype(jnp.float32)
    return _safe_scale(widened)


def _safe_scale(scale: jax.Array) -> jax.Array:
    ok = jnp.isfinite(scale) & (scale > 0)
    return jnp.where(ok, scale, jnp.ones_like(scale))


def encode(x: jax.Array, scale: jax.Array, zero_point, spec: ResolvedSpec) -> jax.Array:
    """Float (grouped view) -> stored codes, in the storage dtype."""
    if spec.allow_nonfinite:
        x = jnp.where(jnp.isnan(x), 0.0, x)
    if spec.qtype == NF4_QTYPE:
        return nf4_encode(x / scale)
    if spec.qtype != INT_QTYPE:
        limit = fp8_max(spec.qtype)
        return jnp.clip(x / scale, -limit, limit).astype(storage_dtype(8, spec.qtype))
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    codes = jnp.round(x / scale)
    if zero_point is not None:
        codes = codes + zero_point
    return jnp.clip(codes, qmin, qmax).astype(storage_dtype(spec.bits, spec.qtype))


def decode(values: jax.Array, scale: jax.Array, zero_point, qtype: str = INT_QTYPE) -> jax.Array:
    """Stored codes (grouped view) -> float32 (nf4: looked up in the code book)."""
    if qtype == NF4_QTYPE:
        return nf4_decode(values) * scale
    out = values.astype(jnp.float32)
    if zero_point is not None:
        out = out - zero_point.astype(jnp.float32)
    return out * scale


def round_trip(x: jax.Array, lo: jax.Array, hi: jax.Array, spec: ResolvedSpec) -> jax.Array:
    """``decode(encode(x))`` with the scale implied by the clip range ``[lo, hi]``."""
    scale, zero_point = scale_from_range(lo, hi, spec)
    return decode(encode(x, scale, zero_point, spec), scale, zero_point, spec.qtype)


def to_grouped(array: jax.Array, spec: ResolvedSpec) -> jax.Array:
    """Scale layout (group axis = number of groups) -> grouped layout (within-group axis of 1)."""
    return array if spec.group_axis is None else jnp.expand_dims(array, spec.group_axis + 1)


def from_grouped(array: jax.Array, spec: ResolvedSpec) -> jax.Array:
    """Grouped layout -> scale layout (the shape of `QArray.scale`)."""
    return array if spec.group_axis is None else jnp.squeeze(array, spec.group_axis + 1)


# ---- the blocked view (sharding-compatible groups) ---------------------------------------------


def _shards_along(x: Any, axis: int) -> int | None:
    """How many shards ``x`` is split into along ``axis``, when that is known: from the sharding
    of a concrete array, or from the type of a traced one under explicit mesh axes. ``None`` for
    a tracer whose sharding the partitioner decides later (``jit`` over auto axes)."""
    dim = int(x.shape[axis])
    if dim == 0:
        return 1
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return max(1, dim // int(x.sharding.shard_shape(tuple(x.shape))[axis]))
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or spec is None or not mesh.shape:
        return None
    entry = spec[axis] if axis < len(spec) else None
    if entry is None:
        explicit = jax.sharding.AxisType.Explicit
        return 1 if all(t == explicit for t in getattr(mesh, "axis_types", ())) else None
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(int(mesh.shape[name]) for name in names)


def block_size(x: Any, spec: ResolvedSpec) -> int | None:
    """The block the group axis is split into for sharding-compatible work (``None`` without
    groups): `block_along` the group axis.

    >>> from jaxcompress.quant.spec import QuantSpec
    >>> spec = QuantSpec(bits=4, group_size=64, group_axis=0).resolve((192, 8))
    >>> block_size(jax.numpy.zeros((192, 8)), spec)  # one device: whole groups
    64
    """
    if spec.group_axis is None or spec.group_size is None:
        return None
    return block_along(x, spec.group_axis, int(spec.group_size))


def block_along(x: Any, axis: int, group_size: int) -> int:
    """The block length for groups of ``group_size`` along ``axis`` of ``x``: ``group_size``
    itself (whole groups: the grouped view) when the axis is not split or every shard holds
    whole groups; otherwise the largest length that divides the shard length, the axis and
    every group boundary (``group_size``, or the axis alone when it is one short group), so
    that every block lies in one group and one shard. When the sharding is not known at trace
    time (``jit`` over auto mesh axes), any even split of the axis over a divisor of the device
    count is allowed for. (Also for callers outside `quant`, e.g. the grouped integer dot of
    `compressed`.)

    >>> block_along(jax.numpy.zeros((192, 8)), 0, 64), block_along(jax.numpy.zeros((576, 8)), 0, 128)
    (64, 128)
    """
    dim, group_size = int(x.shape[axis]), int(group_size)
    shards = _shards_along(x, axis)
    if shards is None:
        shards = math.gcd(dim, jax.device_count())
    if shards <= 1:
        return group_size
    shard_dim = -(-dim // shards)
    boundary = group_size if dim > group_size else 0  # one short group: only its end matters
    block = math.gcd(math.gcd(boundary, shard_dim), dim)
    return block or group_size


def blocked_spec(spec: ResolvedSpec, block: int | None) -> ResolvedSpec:
    """``spec`` with groups of ``block`` elements: its grouped view is the blocked view."""
    if spec.group_axis is None or block is None or block == spec.group_size:
        return spec
    return dataclasses.replace(spec, group_size=int(block))


def to_blocks(
    x: jax.Array, spec: ResolvedSpec, block: int | None = None, fill: Literal["zero", "edge", "nan"] = "zero"
) -> tuple[jax.Array, int | None]:
    """``x`` in the blocked view (the grouped view when ``block == group_size``: a ragged axis
    is padded at its end with ``fill``, see `jaxcompress.quant.groups.pad_groups`) and the
    block used (`block_size` of ``x`` unless given). The within-block axis is ``group_axis +
    1``, so ``spec.reduce_axes`` applies unchanged. `from_blocks` undoes it."""
    if block is None:
        block = block_size(x, spec)
    if spec.group_axis is None or spec.group_size is None:
        return x, block
    if block == spec.group_size:
        return split_groups(x, spec.group_axis, spec.group_size, fill), block
    return x.reshape(blocked_spec(spec, block).grouped_shape(tuple(x.shape))), block


def from_blocks(blocked: jax.Array, spec: ResolvedSpec, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `to_blocks`: back to ``shape`` (the original), padding dropped."""
    if spec.group_axis is None:
        return blocked
    return merge_groups(blocked, spec.group_axis, shape[spec.group_axis]).reshape(shape)


def _group_geometry(spec: ResolvedSpec, block: int, blocks: int) -> tuple[int, int]:
    """``(groups, blocks per group)`` for ``blocks`` blocks of ``block`` along the group axis."""
    dim = spec.group_dim if spec.group_dim is not None else blocks * block
    assert spec.group_size is not None
    return num_groups(dim, spec.group_size), group_span(dim, spec.group_size) // block


def groups_to_blocks(array: Any, spec: ResolvedSpec, block: int | None) -> Any:
    """A per-group array in the grouped layout (``(..., groups, 1, ...)``) repeated onto the
    blocked layout (``(..., blocks, 1, ...)``; a shorter last group gets fewer blocks);
    ``None`` passes through."""
    if array is None or spec.group_axis is None or block is None or block == spec.group_size:
        return array
    assert spec.group_size is not None
    dim = spec.group_dim if spec.group_dim is not None else array.shape[spec.group_axis] * spec.group_size
    per_group = group_span(dim, spec.group_size) // block
    if dim % spec.group_size == 0 or dim <= spec.group_size:
        return jnp.repeat(array, per_group, axis=spec.group_axis)
    # the group of every block (a shorter last group has fewer): exactly ``dim // block`` entries
    index = np.arange(dim // block) // per_group
    return jnp.take(array, jnp.asarray(index, jnp.int32), axis=spec.group_axis)


def _explicit_unsharded(array: jax.Array, axis: int) -> tuple[jax.Array, Any]:
    """Under explicit mesh axes: ``array`` (a small per-block array) resharded so that ``axis``
    is not split, and that sharding (explicit axes refuse a reshape that would move elements
    between shards, and want the output sharding of any other named). ``(array, None)`` under
    auto axes, where XLA places it."""
    try:
        sharding = jax.typeof(array).sharding
    except (AttributeError, TypeError):
        return array, None
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or mesh is None or not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return array, None
    entries = list(spec) + [None] * (array.ndim - len(spec))
    if entries[axis] is not None:
        entries[axis] = None
        array = jax.sharding.reshard(array, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*entries)))
    return array, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*entries))


def blocks_to_groups(partial: jax.Array, spec: ResolvedSpec, block: int | None, reduce: str) -> jax.Array:
    """Per-block results (blocked layout, within-block axis of size 1) combined into per-group
    ones (grouped layout) with ``reduce`` in ``"max"``, ``"min"``, ``"sum"``. Only these small
    arrays cross shard boundaries, never the param."""
    if spec.group_axis is None or block is None or block == spec.group_size:
        return partial
    axis = spec.group_axis
    groups, per_group = _group_geometry(spec, block, int(partial.shape[axis]))
    partial, out_sharding = _explicit_unsharded(partial, axis)
    reducers: dict[str, Callable[..., Any]] = {"max": jnp.max, "min": jnp.min, "sum": jnp.sum}
    reducer = reducers[reduce]
    blocks = int(partial.shape[axis])
    whole = blocks // per_group  # groups with all their blocks (all but a shorter last one)
    parts = []
    if whole:
        head = partial if whole * per_group == blocks else jax.lax.slice_in_dim(partial, 0, whole * per_group, axis=axis)
        shape = tuple(head.shape)
        split = shape[:axis] + (whole, per_group) + shape[axis + 2 :]
        if out_sharding is None:
            regrouped = head.reshape(split)
        else:
            regrouped = jax.lax.reshape(head, split, out_sharding=out_sharding)
        parts.append(reducer(regrouped, axis=axis + 1, keepdims=True))
    if whole < groups:  # the shorter last group: its few blocks reduced on their own
        tail = jax.lax.slice_in_dim(partial, whole * per_group, blocks, axis=axis)
        parts.append(jnp.expand_dims(reducer(tail, axis=axis, keepdims=False), axis))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def encode_array(x: jax.Array, scale: jax.Array, zero_point, spec: ResolvedSpec, block: int | None = None) -> jax.Array:
    """Float array (original shape) -> codes (original shape), with the scale / zero point in
    the grouped layout; works in the blocked view, so the codes keep ``x``'s sharding."""
    blocked, block = to_blocks(x.astype(jnp.float32), spec, block)
    scale, zero_point = groups_to_blocks(scale, spec, block), groups_to_blocks(zero_point, spec, block)
    return from_blocks(encode(blocked, scale, zero_point, spec), spec, tuple(x.shape))


def decode_array(values: jax.Array, scale: jax.Array, zero_point, spec: ResolvedSpec, block: int | None = None) -> jax.Array:
    """Codes (original shape) -> float32 (original shape), scale / zero point in the grouped
    layout; the result keeps the codes' sharding."""
    blocked, block = to_blocks(values, spec, block)
    scale, zero_point = groups_to_blocks(scale, spec, block), groups_to_blocks(zero_point, spec, block)
    return from_blocks(decode(blocked, scale, zero_point, spec.qtype), spec, tuple(values.shape))
