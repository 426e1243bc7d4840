"""Reshape plans for block-scaled quantized weights (internal to `WeightView`).

`reshaped_scale_shape` says what a block-scale array becomes when its weight is reshaped (or
that the blocks would not stay contiguous); `stored_reshape` says how to reshape a view with a
pending transpose without moving its codes.
"""

from __future__ import annotations

import math

__all__ = ["reshaped_scale_shape", "stored_reshape"]


def stored_reshape(shape, permutation, new_sizes):
    """Reshape a view with a pending transpose without moving its codes: ``(stored new sizes,
    new permutation)`` when every group of logical axes the reshape merges or splits is a run of
    consecutive stored axes in the same order (e.g. an ``(out, in, h, w)``-stored conv kernel
    seen as ``(in, h, w, out)`` and flattened to ``(in * h * w, out)``), else ``None``."""
    if 0 in shape or math.prod(shape) != math.prod(new_sizes):
        return None
    keyed = []
    for old_axes, new_axes in _segments(tuple(shape), tuple(new_sizes)):
        if not old_axes:  # a new size-1 axis: anywhere in the stored order (last)
            keyed.append((len(shape), new_axes))
            continue
        stored = [permutation[a] for a in old_axes]
        if stored != list(range(stored[0], stored[0] + len(stored))):
            return None
        if new_axes:
            keyed.append((stored[0], new_axes))
    keyed.sort(key=lambda item: item[0])
    stored_sizes, new_permutation = [], [0] * len(new_sizes)
    for _, new_axes in keyed:
        for axis in new_axes:
            new_permutation[axis] = len(stored_sizes)
            stored_sizes.append(new_sizes[axis])
    return tuple(stored_sizes), tuple(new_permutation)


def reshaped_scale_shape(shape, scale_shape, new_shape) -> tuple[int, ...] | None:
    """The block-scale shape after reshaping ``shape`` to ``new_shape``, or ``None`` when the
    scale blocks would not stay contiguous.

    >>> reshaped_scale_shape((4, 5, 6), (1, 1, 6), (20, 6))      # per-channel kernel, merge
    (1, 6)
    >>> reshaped_scale_shape((8, 6), (2, 6), (2, 4, 6))          # groups of 4 rows, split
    (2, 1, 6)
    >>> reshaped_scale_shape((4, 6), (4, 1), (24,)) is None      # per-row then merged: fine
    False
    >>> reshaped_scale_shape((4, 6), (1, 6), (24,)) is None      # per-column then merged: not
    True
    """
    if 0 in shape or math.prod(shape) != math.prod(new_shape):
        return None
    new_scale = [1] * len(new_shape)
    for old_axes, new_axes in _segments(tuple(shape), tuple(new_shape)):
        dims = [shape[a] for a in old_axes]
        count = _merged_count(dims, [scale_shape[a] for a in old_axes])
        if count is None:
            return None
        split = _split_count([new_shape[a] for a in new_axes], count)
        if split is None:
            return None
        for axis, size in zip(new_axes, split):
            new_scale[axis] = size
    return tuple(new_scale)


def _segments(old, new):
    """Pair up runs of axes of ``old`` and ``new`` with equal products (size-1 axes alone)."""
    i = j = 0
    segments = []
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
            segments.append(([i], []))
            i += 1
            continue
        if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            segments.append(([], [j]))
            j += 1
            continue
        old_axes, new_axes = [i], [j]
        old_size, new_size = old[i], new[j]
        i += 1
        j += 1
        while old_size != new_size:
            if old_size < new_size:
                old_axes.append(i)
                old_size *= old[i]
                i += 1
            else:
                new_axes.append(j)
                new_size *= new[j]
                j += 1
        segments.append((old_axes, new_axes))
    return segments


def _merged_count(dims, scale_dims) -> int | None:
    """Number of scale blocks when ``dims`` are flattened into one axis (row-major)."""
    count = 1
    for k, (dim, size) in enumerate(zip(dims, scale_dims)):
        count *= size
        if size != dim:
            if any(s != 1 for s in scale_dims[k + 1 :]):
                return None
            return count
    return count


def _split_count(dims, count) -> list[int] | None:
    """Scale sizes of ``dims`` (row-major split of one axis) holding ``count`` equal blocks."""
    if not dims:
        return [] if count == 1 else None
    remaining = math.prod(dims) // count
    sizes = []
    for dim in reversed(dims):
        if remaining == 1:
            sizes.append(dim)
        elif remaining % dim == 0:
            sizes.append(1)
            remaining //= dim
        elif dim % remaining == 0:
            sizes.append(dim // remaining)
            remaining = 1
        else:
            return None
    return list(reversed(sizes))
