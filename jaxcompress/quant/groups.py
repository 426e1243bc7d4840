"""The geometry of per-group quantization along one axis, ragged last group included.

``group_size=g`` on an axis of length ``n`` makes ``ceil(n / g)`` groups of ``g`` consecutive
elements; when ``g`` does not divide ``n`` the LAST group is shorter (``n mod g`` elements), as
llama.cpp and GPTQ implementations do. An axis shorter than the group (``n < g``, e.g. the 9
taps of a depthwise 3x3 kernel at ``g128``) is one group of ``n``. Element ``i`` uses group
``i // g``.

The scale of a `jaxcompress.QArray` keeps ``num_groups(n, g)`` entries along the group axis.
To work on whole groups at once, the GROUPED view pads the axis with ``padded_length(n, g) - n``
elements at its end and splits it into ``(num_groups, group_span)``: ``group_span`` is ``g``,
or ``n`` for a single short group (no padding needed then). Every function here works on NumPy
and JAX arrays alike and is jit-able (all sizes are static).

>>> num_groups(576, 128), group_span(576, 128), padded_length(576, 128), group_lengths(576, 128)
(5, 128, 640, (128, 128, 128, 128, 64))
>>> num_groups(9, 128), group_span(9, 128), padded_length(9, 128)
(1, 9, 9)
"""

from __future__ import annotations

from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

__all__ = [
    "num_groups",
    "group_span",
    "padded_length",
    "is_ragged",
    "group_lengths",
    "group_index",
    "expand_groups",
    "pad_groups",
    "split_groups",
    "merge_groups",
]


def _check(dim: int, group_size: int) -> tuple[int, int]:
    dim, group_size = int(dim), int(group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size}")
    if dim < 0:
        raise ValueError(f"axis length must be non-negative, got {dim}")
    return dim, group_size


def num_groups(dim: int, group_size: int) -> int:
    """How many groups an axis of length ``dim`` has: ``ceil(dim / group_size)``.

    >>> num_groups(256, 128), num_groups(576, 128), num_groups(3, 64)
    (2, 5, 1)
    """
    dim, group_size = _check(dim, group_size)
    return -(-dim // group_size)


def group_span(dim: int, group_size: int) -> int:
    """The length of one group in the grouped view: ``group_size``, or ``dim`` when the whole
    axis is one short group (``dim <= group_size``).

    >>> group_span(576, 128), group_span(9, 128)
    (128, 9)
    """
    dim, group_size = _check(dim, group_size)
    return group_size if dim > group_size else dim


def padded_length(dim: int, group_size: int) -> int:
    """The axis length of the grouped view: ``num_groups * group_span`` (``>= dim``).

    >>> padded_length(576, 128), padded_length(512, 128)
    (640, 512)
    """
    return num_groups(dim, group_size) * group_span(dim, group_size)


def is_ragged(dim: int, group_size: int) -> bool:
    """Whether the last group is shorter than the others (the grouped view pads the axis).

    >>> is_ragged(576, 128), is_ragged(512, 128), is_ragged(9, 128)
    (True, False, False)
    """
    return padded_length(dim, group_size) != int(dim)


def group_lengths(dim: int, group_size: int) -> tuple[int, ...]:
    """The number of elements of every group, in order.

    >>> group_lengths(10, 4)
    (4, 4, 2)
    """
    dim, group_size = _check(dim, group_size)
    return tuple(min(group_size, dim - start) for start in range(0, dim, group_size))


def group_index(dim: int, group_size: int) -> np.ndarray:
    """The group of every element along the axis, ``(dim,)`` int32: ``i // group_size``.

    >>> group_index(5, 2).tolist()
    [0, 0, 1, 1, 2]
    """
    dim, group_size = _check(dim, group_size)
    return (np.arange(dim) // group_size).astype(np.int32)


def _xp(array: Any) -> Any:
    return np if isinstance(array, (np.ndarray, np.generic)) else jnp


def expand_groups(array: Any, axis: int, group_size: int, dim: int) -> Any:
    """A per-group array (``num_groups(dim, group_size)`` entries along ``axis``, e.g. a
    `QArray` scale) repeated onto the ``dim`` elements of that axis. Other axes are untouched
    (size 1 broadcasts). NumPy in, NumPy out.

    >>> expand_groups(np.array([[1.0, 2.0, 3.0]]), 1, 4, 10).tolist()
    [[1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0]]
    """
    axis = int(axis) % array.ndim
    groups = num_groups(dim, group_size)
    if array.shape[axis] != groups:
        raise ValueError(
            f"expand_groups: axis {axis} of the per-group array has {array.shape[axis]} entries, expected "
            f"{groups} groups of {group_size} over {dim} elements"
        )
    xp = _xp(array)
    repeated = xp.repeat(array, group_span(dim, group_size), axis=axis)
    return repeated[(slice(None),) * axis + (slice(0, int(dim)),)]


def pad_groups(
    x: Any, axis: int, group_size: int, fill: Literal["zero", "edge", "nan"] = "zero"
) -> Any:
    """``x`` padded at the end of ``axis`` to `padded_length` (no copy when nothing is
    missing). ``fill``: ``"zero"``, ``"edge"`` (repeat the last element: keeps every group's min
    and max) or ``"nan"`` (for nan-aware reductions such as percentiles).

    >>> pad_groups(np.array([1.0, 2.0, 3.0]), 0, 2, "edge").tolist()
    [1.0, 2.0, 3.0, 3.0]
    """
    axis = int(axis) % x.ndim
    dim = int(x.shape[axis])
    missing = padded_length(dim, group_size) - dim
    if missing == 0:
        return x
    xp = _xp(x)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, missing)
    if fill == "edge":
        return xp.pad(x, widths, mode="edge")
    value = 0 if fill == "zero" else float("nan")
    return xp.pad(x, widths, mode="constant", constant_values=value)


def split_groups(
    x: Any, axis: int, group_size: int, fill: Literal["zero", "edge", "nan"] = "zero"
) -> Any:
    """The grouped view: ``axis`` padded (`pad_groups`) and split into ``(num_groups,
    group_span)``; the within-group axis is ``axis + 1``.

    >>> split_groups(np.arange(5.0), 0, 2).tolist()
    [[0.0, 1.0], [2.0, 3.0], [4.0, 0.0]]
    """
    axis = int(axis) % x.ndim
    dim = int(x.shape[axis])
    padded = pad_groups(x, axis, group_size, fill)
    shape = tuple(padded.shape)
    return padded.reshape(shape[:axis] + (num_groups(dim, group_size), group_span(dim, group_size)) + shape[axis + 1 :])


def merge_groups(grouped: Any, axis: int, dim: int) -> Any:
    """Inverse of `split_groups`: merge axes ``(axis, axis + 1)`` and drop the padding, back
    to ``dim`` elements.

    >>> merge_groups(split_groups(np.arange(5.0), 0, 2), 0, 5).tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0]
    """
    axis = int(axis) % (grouped.ndim - 1)
    shape = tuple(grouped.shape)
    merged = grouped.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2 :])
    return merged[(slice(None),) * axis + (slice(0, int(dim)),)]
