"""`check_qarray`: a `QArray`'s static metadata and, where the children are concrete arrays or
``jax.ShapeDtypeStruct``s, its arrays checked against each other (bits vs qtype vs storage dtype,
scale / zero point / input scale shapes vs the channel and group axes, ragged last groups, a
stored permutation). Every `QArray` construction runs it (`jaxcompress.qarray`); tracers,
``None`` and sentinel children are never inspected, and no value is ever read.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress._errors import InvalidQArrayError
from jaxcompress.qarray import ACTIVATIONS, FP8_QTYPES, INT_QTYPE, NF4_QTYPE, QArray, logical_shape, storage_dtype

__all__ = ["check_qarray"]


def _checkable(x: Any) -> TypeGuard[jax.Array | np.ndarray | jax.ShapeDtypeStruct]:
    """A child whose shape and dtype may be checked: a concrete array or a ShapeDtypeStruct
    (never a tracer: inside vmap / scan its shape is not the stored one)."""
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _fail(message: str) -> None:
    raise InvalidQArrayError(f"QArray: {message}")


def _check_static(q: QArray) -> None:
    if q.qtype not in (INT_QTYPE, NF4_QTYPE) and q.qtype not in FP8_QTYPES:
        _fail(f"qtype {q.qtype!r} is not 'int', 'nf4' or one of {sorted(FP8_QTYPES)}")
    if isinstance(q.bits, bool) or not isinstance(q.bits, (int, np.integer)):
        _fail(f"bits must be an integer in 2..8, got {q.bits!r}")
    if q.qtype == INT_QTYPE and not 2 <= q.bits <= 8:
        _fail(f"bits {q.bits} is not in 2..8")
    if q.qtype in FP8_QTYPES and q.bits != 8:
        _fail(f"bits {q.bits} for {q.qtype}, expected 8")
    if q.qtype == NF4_QTYPE and q.bits != 4:
        _fail(f"bits {q.bits} for nf4, expected 4")
    if q.activation not in ACTIVATIONS:
        _fail(f"activation {q.activation!r} is not one of {ACTIVATIONS}")
    if q.activation != "weight_only" and q.qtype != INT_QTYPE:
        _fail(f"activation {q.activation!r} runs int8 x int8 dots and needs qtype 'int', got qtype {q.qtype!r}")
    axes = q.channel_axes
    if isinstance(axes, (int, np.integer)) and not isinstance(axes, bool):
        axes = (int(axes),)
    if not isinstance(axes, (tuple, list)) or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes):
        _fail(f"channel_axes must be a tuple of ints, got {q.channel_axes!r}")
    object.__setattr__(q, "channel_axes", tuple(int(a) for a in axes))
    if (q.group_axis is None) != (q.group_size is None):
        _fail(f"group_axis ({q.group_axis!r}) and group_size ({q.group_size!r}) must be given together")
    if q.group_size is not None:
        if isinstance(q.group_size, bool) or not isinstance(q.group_size, (int, np.integer)) or q.group_size < 1:
            _fail(f"group_size must be a positive integer, got {q.group_size!r}")
        if isinstance(q.group_axis, bool) or not isinstance(q.group_axis, (int, np.integer)):
            _fail(f"group_axis must be an integer, got {q.group_axis!r}")
    permutation = q.stored_permutation
    if permutation is not None:
        if not isinstance(permutation, (tuple, list)) or not all(
            isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in permutation
        ) or sorted(int(a) for a in permutation) != list(range(len(permutation))):
            _fail(f"stored_permutation must be None or a permutation of 0..ndim-1, got {permutation!r}")
        permutation = tuple(int(a) for a in permutation)
        object.__setattr__(q, "stored_permutation", None if permutation == tuple(range(len(permutation))) else permutation)
    try:
        dtype = jnp.dtype(q.dtype)
    except (TypeError, ValueError):
        _fail(f"dtype {q.dtype!r} is not a dtype")
    if not jnp.issubdtype(dtype, jnp.floating):
        _fail(f"dtype {dtype.name} is the dtype of the array it stands for, expected a floating dtype")


def _is_storage(dtype: Any) -> bool:
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.integer) or dtype in {jnp.dtype(t) for t in FP8_QTYPES.values()}


def check_qarray(q: QArray, *, strict: bool = False) -> None:
    """Check ``q``'s static metadata, and its arrays against it when they are concrete arrays or
    ``jax.ShapeDtypeStruct``s (no value is read). Raises `InvalidQArrayError` saying what was
    expected; run by every `QArray` construction. Negative axes are made non-negative.

    A node whose values are not integers or fp8 (float zeros from ``tree_map(jnp.zeros_like,
    ...)`` with another dtype, ``float0`` cotangents, optimizer moments) is a tree DERIVED from a
    `QArray`, not one: only its static metadata is checked, unless ``strict`` (the checkpoint
    readers), which requires the storage dtype.

    >>> import jax.numpy as jnp
    >>> QArray(values=jnp.zeros((4, 2), jnp.int8), scale=jnp.ones((1, 3)), channel_axes=(1,))
    Traceback (most recent call last):
    ...
    jaxcompress._errors.InvalidQArrayError: QArray: scale has shape (1, 3), expected (1, 2) for values of shape (4, 2) with channel_axes (1,), group_axis None, group_size None
    """
    _check_static(q)
    values = q.values
    if not _checkable(values):
        return
    expected_dtype = storage_dtype(q.bits, q.qtype)
    if not strict and not _is_storage(values.dtype):
        return
    if jnp.dtype(values.dtype) != expected_dtype:
        _fail(
            f"values have dtype {jnp.dtype(values.dtype).name}, expected {expected_dtype.name} "
            f"for qtype {q.qtype!r} with bits {q.bits}"
        )
    for name in ("scale", "input_scale", "activation_scale"):
        child = getattr(q, name)
        if _checkable(child) and not jnp.issubdtype(child.dtype, jnp.floating):
            _fail(f"{name} has dtype {jnp.dtype(child.dtype).name}, expected a floating dtype")
    if q.qtype == NF4_QTYPE and _checkable(q.zero_point):
        _fail("nf4 is symmetric (absmax scale per group): zero_point must be None")
    if _checkable(q.zero_point) and jnp.dtype(q.zero_point.dtype) != expected_dtype:
        _fail(f"zero_point has dtype {jnp.dtype(q.zero_point.dtype).name}, expected the values' {expected_dtype.name}")
    # A QArray returned by `jax.vmap` carries the batch axes in front of every child while its
    # metadata describes one element: accept leading axes shared by every child.
    permutation = q.stored_permutation
    if permutation is not None:
        batch = len(values.shape) - len(permutation)
        if batch < 0:
            _fail(f"stored_permutation {permutation} has {len(permutation)} axes, the values {len(values.shape)} (shape {tuple(values.shape)})")
        error = _layout_error(q, batch)
        if error is not None:
            _fail(error)
        if batch == 0:
            _normalize_axes(q)
        return
    first = _layout_error(q, 0)
    if first is None:
        _normalize_axes(q)
        return
    for batch in range(1, len(values.shape) + 1):
        if _layout_error(q, batch) is None:
            return
    _fail(first)


def _normalize_axes(q: QArray) -> None:
    ndim = len(q.values.shape)
    object.__setattr__(q, "channel_axes", tuple(sorted(a % ndim for a in q.channel_axes)))
    if q.group_axis is not None:
        object.__setattr__(q, "group_axis", int(q.group_axis) % ndim)


def _layout_error(q: QArray, batch: int) -> str | None:
    """What is wrong with the shapes of ``q`` read with ``batch`` leading batch axes (None: fine)."""
    full = logical_shape(tuple(q.values.shape), q.stored_permutation)
    lead, shape = full[:batch], full[batch:]
    ndim = len(shape)
    axes = []
    for axis in q.channel_axes:
        if not -ndim <= axis < ndim:
            return f"channel_axes {q.channel_axes}: axis {axis} is out of range for values of shape {shape}"
        axes.append(axis % ndim)
    if len(set(axes)) != len(axes):
        return f"channel_axes {q.channel_axes} repeat an axis"
    group_axis = None
    if q.group_axis is not None:
        if not -ndim <= q.group_axis < ndim:
            return f"group_axis {q.group_axis} is out of range for values of shape {shape}"
        group_axis = int(q.group_axis) % ndim
        if group_axis in axes:
            return f"group_axis {q.group_axis} is also a channel axis {q.channel_axes}; groups run along a shared axis"
    expected = tuple(
        dim if axis in axes else -(-dim // int(q.group_size or 1)) if axis == group_axis else 1
        for axis, dim in enumerate(shape)
    )
    layout = f"for values of shape {shape} with channel_axes {q.channel_axes}, group_axis {q.group_axis}, group_size {q.group_size}"
    if _checkable(q.scale):
        got = tuple(q.scale.shape)
        if len(got) != len(full):
            return f"scale has rank {len(got)} (shape {got}), expected rank {ndim}: shape {expected} {layout}"
        if got != lead + expected:
            return f"scale has shape {got[batch:]}, expected {expected} {layout}"
    if _checkable(q.zero_point) and tuple(q.zero_point.shape) != lead + expected:
        return f"zero_point has shape {tuple(q.zero_point.shape)[batch:]}, expected the scale's {expected} {layout}"
    if _checkable(q.input_scale):
        got = tuple(q.input_scale.shape)
        if len(got) != len(full):
            return f"input_scale has rank {len(got)} (shape {got}), expected rank {ndim} (full size on the smoothed axes of {shape}, 1 elsewhere)"
        if got[:batch] != lead or any(size not in (1, dim) for size, dim in zip(got[batch:], shape)):
            return f"input_scale has shape {got[batch:]}, expected each axis 1 or the values' size {shape}"
    if _checkable(q.activation_scale) and tuple(q.activation_scale.shape) != lead:
        return f"activation_scale has shape {tuple(q.activation_scale.shape)[batch:]}, expected a scalar ()"
    return None
