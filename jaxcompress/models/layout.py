"""Transposing a leaf that may be a `QArray`: PyTorch ``(out, in)`` weights to Flax ``(in, out)``.

A `QArray`'s values, scale, zero point and input scale all have the array's rank (see
`jaxcompress.QArray`), so a transpose permutes each of them the same way and renumbers the
static axes (``channel_axes``, ``group_axis``); a scalar ``activation_scale`` is unchanged. The
result dequantizes to the transpose of what the input dequantizes to, exactly. Masks (bool
arrays) transpose like arrays; ``None`` and ``optax.MaskedNode()`` pass through.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from jaxcompress.checkpoint.treemeta import is_masked_node
from jaxcompress.qarray import QArray

__all__ = ["transpose_leaf"]

# Static QArray fields that hold axis numbers, renumbered by a transpose. Every other static
# field (bits, qtype, group_size, dtype, activation, ...) does not depend on the axis order.
_AXIS_FIELDS = ("channel_axes", "group_axis")


def transpose_leaf(leaf: Any, axes: Sequence[int] | None = None, *, where: str = "leaf", move_codes: bool = True) -> Any:
    """``leaf`` with its axes permuted by ``axes`` (default: reversed), `QArray`s included.

    With ``move_codes=False`` a `QArray`'s integer codes stay where they are: the result's
    logical shape, scales and axes are transposed, and its ``stored_permutation`` records the
    order the unchanged codes are in (zero-copy; see `jaxcompress.QArray.with_layout`). Loading a
    PyTorch ``(out, in)`` weight this way gives a Flax kernel already in the layout the integer
    dot wants.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> q = jc.quantize(jnp.arange(12.0).reshape(3, 4), bits=8, channel_axes=(0,))
    >>> t = transpose_leaf(q)
    >>> t.shape, t.channel_axes, t.scale.shape
    ((4, 3), (1,), (1, 3))
    >>> bool(jnp.array_equal(t.dequantize(), q.dequantize().T))
    True
    >>> z = transpose_leaf(q, move_codes=False)
    >>> z.shape, z.values.shape, z.stored_permutation, z.values is q.values
    ((4, 3), (3, 4), (1, 0), True)
    >>> bool(jnp.array_equal(z.dequantize(), q.dequantize().T))
    True
    """
    if leaf is None or is_masked_node(leaf):
        return leaf
    ndim = len(leaf.shape)
    perm = tuple(reversed(range(ndim))) if axes is None else tuple(int(a) % max(ndim, 1) for a in axes)
    if sorted(perm) != list(range(ndim)):
        raise ValueError(f"{where}: axes {tuple(axes or ())} are not a permutation of the {ndim} axes of shape {tuple(leaf.shape)}")
    if not isinstance(leaf, QArray):
        return np.transpose(leaf, perm) if isinstance(leaf, np.ndarray) else jnp.transpose(leaf, perm)
    new_axis = {old: new for new, old in enumerate(perm)}
    changes: dict[str, Any] = {}
    if move_codes:
        leaf = leaf.with_layout(None)  # codes in the logical order first (`QArray.stored_permutation`)
    else:
        # values == transpose(codes, p0); the new codes are transpose(codes, perm), so the
        # unchanged values are those new codes in the order new_axis[p0[j]].
        p0 = leaf.stored_permutation or tuple(range(ndim))
        stored = tuple(new_axis[a] for a in p0)
        changes["stored_permutation"] = None if stored == tuple(range(ndim)) else stored
    for field in dataclasses.fields(leaf):
        value = getattr(leaf, field.name)
        if field.metadata.get("static", False):
            if field.name == "channel_axes":
                changes[field.name] = tuple(sorted(new_axis[a] for a in value))
            elif field.name == "group_axis" and value is not None:
                changes[field.name] = new_axis[value]
            continue
        if value is None or len(value.shape) == 0 or (field.name == "values" and not move_codes):
            continue
        if len(value.shape) != ndim:
            raise ValueError(f"{where}: QArray field {field.name!r} has shape {tuple(value.shape)}, expected rank {ndim} like the values {leaf.shape}")
        changes[field.name] = np.transpose(value, perm) if isinstance(value, np.ndarray) else jnp.transpose(value, perm)
    return dataclasses.replace(leaf, **changes)
