"""`WeightView`: a quantized weight after the layout ops a program applied to it (internal).

When `jaxcompress.compressed` re-interprets a traced program, a `QArray` weight often reaches its
``dot_general`` only after a ``transpose``, ``reshape``, ``convert_element_type`` or
``broadcast_in_dim`` (``jnp.einsum`` and ``DenseGeneral`` do this). A `WeightView` follows the
weight through those ops without dequantizing it: the same op is applied to the integer codes and,
where the layout allows, to the scale and zero point.

Layout: block scaling. ``scale`` has the rank of ``values`` and ``scale.shape[d]`` divides
``values.shape[d]``; element ``i`` along axis ``d`` uses scale entry
``i // (values.shape[d] // scale.shape[d])``. A shared axis has a scale of size 1, a per-channel
axis has full size, a per-group axis has ``dim // group_size`` entries, which is exactly the
`QArray` layout, so a `QArray` is a view with no ops applied. Every op below either keeps that
form or returns ``None`` (the caller then dequantizes, which is always correct).

Ragged groups: a `QArray` whose ``group_size`` does not divide its group axis (the last group
shorter, ``ceil(dim / group_size)`` scale entries) does not fit block scaling along that axis.
Its view records ``ragged = (stored axis, group_size)``: element ``i`` along that axis uses scale
entry ``i // group_size``. Transposes, squeezes, broadcasts, converts, slices that keep the axis
whole, and reshapes that keep the axes before it and merge it only with following shared axes
(a conv kernel flattened to ``(in * window, out)``: the group becomes ``group_size * window``)
carry it; the other ops return ``None``.

nf4 codes (``qtype="nf4"``) are indices into the NF4 code book: `WeightView.float_values` looks
them up; they have no integer path (`compressed` runs them weight-only).

Input scale (SmoothQuant / AWQ smoothing, `QArray.input_scale`): an optional array of the
values' rank, full size on the input axes and 1 elsewhere; the view stands for
``dequant(codes) / input_scale``. The layout ops carry it when it stays elementwise along whole
axes (transpose, squeeze, broadcast, converting, slicing, a reshape that keeps each smoothed axis
whole or merges only smoothed axes); otherwise they return ``None``. The dot / conv divide the
activation by it (`WeightView.activation_divisor`) and then treat the view without it.

Transposes are lazy: ``permutation`` records them (logical axis ``i`` is stored axis
``permutation[i]``) and a dot folds them into its dimension numbers (`WeightView.fold`). XLA's
CPU backend runs an s8 dot whose operand is a transposed s8 array as an s32 dot (it decides
before folding the transpose), so materializing ``x @ w.T``'s transpose would lose the int8 path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.execute.reshape_plan import reshaped_scale_shape, stored_reshape
from jaxcompress.qarray import NF4_QTYPE, QArray
from jaxcompress.quant.groups import expand_groups, is_ragged
from jaxcompress.quant.nf4 import nf4_decode

__all__ = ["WeightView", "stored_permutation"]


def stored_permutation(q: Any) -> tuple[int, ...] | None:
    """The axis order a `QArray` stores its codes in (``values == transpose(logical codes,
    permutation)``), or ``None`` for the logical order. Read with ``getattr`` so that a
    `QArray` without the field is a logical-order one."""
    permutation = getattr(q, "stored_permutation", None)
    if permutation is None:
        return None
    permutation = tuple(int(a) for a in permutation)
    return None if permutation == tuple(range(len(permutation))) else permutation


def _inverse(permutation) -> tuple[int, ...]:
    inverse = [0] * len(permutation)
    for position, axis in enumerate(permutation):
        inverse[axis] = position
    return tuple(inverse)


@dataclasses.dataclass(frozen=True)
class WeightView:
    """A quantized weight seen through layout ops (see the module docs).

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> q = jc.quantize(jnp.arange(24.0).reshape(2, 3, 4), channel_axes=(-1,))
    >>> view = WeightView.from_qarray(q).reshape((6, 4))
    >>> view.shape, view.scale.shape
    ((6, 4), (1, 4))
    >>> bool(jnp.allclose(view.dequantize(), q.dequantize().reshape(6, 4)))
    True
    """

    values: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    dtype: Any
    qtype: str = "int"
    activation: str = "weight_only"
    activation_scale: jax.Array | None = None
    name: str = "weight"
    leaf_index: int | None = None
    permutation: tuple[int, ...] | None = None
    input_scale: jax.Array | None = None
    path: str | None = None  # the leaf's ``/``-joined path inside the first argument, as rules see it
    ragged: tuple[int, int] | None = None  # (stored axis, group size) of a ragged group axis

    @classmethod
    def from_qarray(
        cls, q: QArray, name: str = "weight", leaf_index: int | None = None, path: str | None = None
    ) -> "WeightView":
        """The view of a `QArray`. A `QArray` whose codes are stored in another axis order
        (``stored_permutation``: ``values == transpose(logical codes, stored_permutation)``,
        e.g. ``(1, 0)`` for a Flax ``(in, out)`` kernel kept ``(out, in)`` for the integer
        dot) becomes a view with a pending transpose over the stored codes: nothing is
        transposed at run time, the dot folds it into its dimension numbers."""
        stored = stored_permutation(q)
        scale, zero_point, input_scale = q.scale, q.zero_point, q.input_scale
        permutation = None
        ragged = None
        if q.group_axis is not None and q.group_size is not None and is_ragged(q.shape[q.group_axis], q.group_size):
            axis = q.group_axis if stored is None else stored.index(q.group_axis)
            ragged = (int(axis), int(q.group_size))
        if stored is not None:
            # Scales are kept in the logical layout by the QArray; the view wants them like
            # the stored codes (they are small).
            def to_stored(array):
                return None if array is None else jnp.transpose(array, stored)

            scale, zero_point, input_scale = to_stored(scale), to_stored(zero_point), to_stored(input_scale)
            permutation = tuple(int(a) for a in _inverse(stored))
        return cls(
            values=q.values,
            scale=scale,
            zero_point=zero_point,
            dtype=jnp.dtype(q.dtype),
            qtype=q.qtype,
            activation=q.activation,
            activation_scale=q.activation_scale,
            name=name,
            leaf_index=leaf_index,
            permutation=permutation,
            input_scale=input_scale,
            path=path,
            ragged=ragged,
        )

    # ---- shape -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._logical(self.values.shape)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return self._logical(self.scale.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    def _logical(self, stored_shape) -> tuple[int, ...]:
        if self.permutation is None:
            return tuple(stored_shape)
        return tuple(stored_shape[axis] for axis in self.permutation)

    def block(self, axis: int) -> int:
        """How many consecutive elements along ``axis`` share one scale entry (the last group of
        a ragged axis has fewer)."""
        stored = axis if self.permutation is None else self.permutation[axis]
        if self.ragged is not None and stored == self.ragged[0]:
            return self.ragged[1]
        return self.shape[axis] // self.scale_shape[axis]

    def materialize(self) -> "WeightView":
        """The same view with any pending transpose applied to the stored arrays."""
        if self.permutation is None:
            return self
        permutation = self.permutation
        scale, zero_point = self._map_scales(lambda a: jnp.transpose(a, permutation))
        input_scale = None if self.input_scale is None else jnp.transpose(self.input_scale, permutation)
        ragged = None if self.ragged is None else (permutation.index(self.ragged[0]), self.ragged[1])
        return dataclasses.replace(
            self,
            values=jnp.transpose(self.values, permutation),
            scale=scale,
            zero_point=zero_point,
            permutation=None,
            input_scale=input_scale,
            ragged=ragged,
        )

    def fold(self, contract, batch):
        """Fold the pending transpose into a dot's dimension numbers for this operand.

        Returns ``(view, contract, batch, fixup)``: the view in stored layout, the stored axes
        to contract / batch, and ``fixup``, ``None`` or the permutation of the dot output's
        trailing free axes that restores the logical order (the dot emits free axes in stored
        order)."""
        if self.permutation is None:
            return self, tuple(contract), tuple(batch), None
        permutation = self.permutation
        free = [a for a in range(self.ndim) if a not in contract and a not in batch]
        stored_free = [permutation[a] for a in free]
        emitted = sorted(stored_free)
        fixup = [emitted.index(axis) for axis in stored_free]
        view = dataclasses.replace(self, permutation=None)
        return (
            view,
            tuple(permutation[a] for a in contract),
            tuple(permutation[a] for a in batch),
            None if fixup == sorted(fixup) else tuple(fixup),
        )

    def _with(self, values, scale, zero_point, dtype=None, input_scale=None, ragged: Any = "keep") -> "WeightView":
        return dataclasses.replace(
            self,
            values=values,
            scale=scale,
            zero_point=zero_point,
            dtype=self.dtype if dtype is None else dtype,
            input_scale=input_scale,
            ragged=self.ragged if ragged == "keep" else ragged,
        )

    # ---- input scale -------------------------------------------------------------------
    @property
    def input_scale_axes(self) -> tuple[int, ...]:
        """Logical axes along which the input scale varies (``()`` without one)."""
        if self.input_scale is None:
            return ()
        return tuple(a for a, size in enumerate(self._logical(self.input_scale.shape)) if size != 1)

    def without_input_scale(self) -> "WeightView":
        """The view of ``dequant(codes)`` alone (the smoothed weight ``W * s``)."""
        return dataclasses.replace(self, input_scale=None)

    def activation_divisor(self, x_ndim: int, weight_axes, x_axes) -> jax.Array | None:
        """The input scale laid out for an activation of rank ``x_ndim`` whose axes ``x_axes``
        are contracted with this view's logical ``weight_axes``: ``x / divisor`` is the smoothed
        activation. ``None`` if the input scale varies along an axis that is not contracted."""
        axes = self.input_scale_axes
        if any(a not in weight_axes for a in axes):
            return None
        logical = self.input_scale
        if logical is None:
            return None
        if self.permutation is not None:
            logical = jnp.transpose(logical, self.permutation)
        kept = logical.reshape(tuple(logical.shape[a] for a in axes))  # weight-axis order
        targets = [x_axes[list(weight_axes).index(a)] for a in axes]
        order = sorted(range(len(axes)), key=lambda i: targets[i])
        kept = jnp.transpose(kept, order)  # now in the activation's axis order
        shape = [1] * x_ndim
        for position, i in enumerate(order):
            shape[targets[i]] = kept.shape[position]
        return kept.reshape(tuple(shape)).astype(jnp.float32)

    def _map_scales(self, fn):
        return fn(self.scale), None if self.zero_point is None else fn(self.zero_point)

    # ---- values ------------------------------------------------------------------------
    def int8_values(self) -> jax.Array:
        """The codes as int8 (int4 / int2 containers widened; XLA's integer dots want s8)."""
        return self.materialize().values.astype(jnp.int8)

    def float_values(self, dtype: Any = jnp.float32) -> jax.Array:
        """The stored values as floats before the scale (in stored layout): the integer codes,
        or for nf4 their code-book values."""
        if self.qtype == NF4_QTYPE:
            return nf4_decode(self.values).astype(dtype)
        return self.values.astype(dtype)

    def full_scale(self, axes) -> tuple[jax.Array, jax.Array | None]:
        """Scale and zero point with the block-scaled ``axes`` repeated to one entry per element
        (axes of scale size 1 stay 1)."""
        scale, zero_point = self.scale, self.zero_point
        for axis in axes:
            size = scale.shape[axis]
            if self.ragged is not None and axis == self.ragged[0] and size != 1:
                group, dim = self.ragged[1], int(self.values.shape[axis])
                scale = expand_groups(scale, axis, group, dim)
                if zero_point is not None:
                    zero_point = expand_groups(zero_point, axis, group, dim)
                continue
            if size != 1 and size != self.shape[axis]:
                repeat = self.shape[axis] // size
                scale = jnp.repeat(scale, repeat, axis=axis)
                if zero_point is not None:
                    zero_point = jnp.repeat(zero_point, repeat, axis=axis)
        return scale, zero_point

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The float array this view stands for."""
        out_dtype = jnp.dtype(self.dtype if dtype is None else dtype)
        self = self.materialize()
        scale, zero_point = self.full_scale(range(self.ndim))
        values = self.float_values(jnp.float32)
        if zero_point is not None:
            values = values - zero_point.astype(jnp.float32)
        out = values * scale.astype(jnp.float32)
        if self.input_scale is not None:
            out = out / self.input_scale.astype(jnp.float32)
        return out.astype(out_dtype)

    # ---- layout ops (each mirrors the lax primitive of the same name) ------------------
    def astype(self, dtype: Any) -> "WeightView | None":
        if not jnp.issubdtype(dtype, jnp.floating):
            return None
        return self._with(self.values, self.scale, self.zero_point, jnp.dtype(dtype), self.input_scale)

    def transpose(self, permutation) -> "WeightView":
        current = self.permutation or tuple(range(self.ndim))
        composed = tuple(current[axis] for axis in permutation)
        identity = composed == tuple(range(self.ndim))
        return dataclasses.replace(self, permutation=None if identity else composed)

    def squeeze(self, dimensions) -> "WeightView":
        self = self.materialize()
        dimensions = tuple(dimensions)
        scale, zero_point = self._map_scales(lambda a: jnp.squeeze(a, dimensions))
        input_scale = None if self.input_scale is None else jnp.squeeze(self.input_scale, dimensions)
        ragged = self.ragged
        if ragged is not None:
            ragged = (ragged[0] - sum(1 for d in dimensions if d % self.ndim < ragged[0]), ragged[1])
        return self._with(jnp.squeeze(self.values, dimensions), scale, zero_point, input_scale=input_scale, ragged=ragged)

    def broadcast_in_dim(self, shape, broadcast_dimensions) -> "WeightView":
        self = self.materialize()
        shape, broadcast_dimensions = tuple(shape), tuple(broadcast_dimensions)
        scale_shape = [1] * len(shape)
        for in_axis, out_axis in enumerate(broadcast_dimensions):
            if self.shape[in_axis] == shape[out_axis]:
                scale_shape[out_axis] = self.scale.shape[in_axis]
        scale, zero_point = self._map_scales(
            lambda a: jax.lax.broadcast_in_dim(a, tuple(scale_shape), broadcast_dimensions)
        )
        input_scale = None
        if self.input_scale is not None:
            input_shape = [1] * len(shape)
            for in_axis, out_axis in enumerate(broadcast_dimensions):
                input_shape[out_axis] = self.input_scale.shape[in_axis]
            input_scale = jax.lax.broadcast_in_dim(self.input_scale, tuple(input_shape), broadcast_dimensions)
        values = jax.lax.broadcast_in_dim(self.values, shape, broadcast_dimensions)
        ragged = None if self.ragged is None else (broadcast_dimensions[self.ragged[0]], self.ragged[1])
        return self._with(values, scale, zero_point, input_scale=input_scale, ragged=ragged)

    def reshape(self, new_sizes) -> "WeightView | None":
        new_sizes = tuple(int(d) for d in new_sizes)
        if self.permutation is not None:
            plan = stored_reshape(self.shape, self.permutation, new_sizes)
            if plan is None:
                return self.materialize().reshape(new_sizes)
            stored_sizes, permutation = plan
            view = dataclasses.replace(self, permutation=None).reshape(stored_sizes)
            if view is None:
                return None
            identity = permutation == tuple(range(len(permutation)))
            return dataclasses.replace(view, permutation=None if identity else permutation)
        if self.ragged is not None:
            return self._ragged_reshape(new_sizes)
        scale_shape = reshaped_scale_shape(self.shape, tuple(self.scale.shape), new_sizes)
        if scale_shape is None:
            return None
        input_scale = None
        if self.input_scale is not None:
            input_shape = reshaped_scale_shape(self.shape, tuple(self.input_scale.shape), new_sizes)
            if input_shape is None or any(s not in (1, d) for s, d in zip(input_shape, new_sizes)):
                return None  # the smoothing factor would not stay whole along axes
            input_scale = self.input_scale.reshape(input_shape)
        scale, zero_point = self._map_scales(lambda a: a.reshape(scale_shape))
        return self._with(self.values.reshape(new_sizes), scale, zero_point, input_scale=input_scale)

    def _ragged_reshape(self, new_sizes: tuple[int, ...]) -> "WeightView | None":
        """`reshape` of a view with a ragged group axis ``r`` (no pending transpose): the axes
        before ``r`` unchanged, ``r`` merged with following axes whose scale has size 1 (the
        group grows by their product), the rest unchanged; otherwise ``None``."""
        assert self.ragged is not None
        axis, group = self.ragged
        shape = tuple(self.values.shape)
        if self.input_scale is not None or tuple(new_sizes[:axis]) != shape[:axis] or len(new_sizes) <= axis:
            return None
        for last in range(axis, len(shape)):
            merged = math.prod(shape[axis : last + 1])
            if merged == new_sizes[axis] and tuple(new_sizes[axis + 1 :]) == shape[last + 1 :]:
                break
        else:
            return None
        if any(self.scale.shape[a] != 1 for a in range(axis + 1, last + 1)):
            return None
        scale_shape = tuple(self.scale.shape[: axis + 1]) + tuple(self.scale.shape[last + 1 :])
        scale, zero_point = self._map_scales(lambda a: a.reshape(scale_shape))
        trailing = math.prod(shape[axis + 1 : last + 1])
        return self._with(self.values.reshape(new_sizes), scale, zero_point, ragged=(axis, group * trailing))

    def slice(self, start_indices, limit_indices, strides=None) -> "WeightView | None":
        self = self.materialize()
        strides = (1,) * self.ndim if strides is None else tuple(strides)
        scale_start, scale_limit = [], []
        for axis, (start, limit, stride) in enumerate(zip(start_indices, limit_indices, strides)):
            size, block = self.scale.shape[axis], self.block(axis)
            if self.ragged is not None and axis == self.ragged[0]:
                if (start, limit, stride) != (0, self.values.shape[axis], 1):
                    return None  # only a ragged axis kept whole
                scale_start.append(0)
                scale_limit.append(size)
            elif size == 1:
                scale_start.append(0)
                scale_limit.append(1)
            elif block == 1:
                scale_start.append(start)
                scale_limit.append(limit)
            elif stride == 1 and start % block == 0 and limit % block == 0:
                scale_start.append(start // block)
                scale_limit.append(limit // block)
            else:
                return None
        scale_strides = tuple(s if self.block(a) == 1 and self.scale.shape[a] != 1 else 1 for a, s in enumerate(strides))
        scale, zero_point = self._map_scales(
            lambda a: jax.lax.slice(a, tuple(scale_start), tuple(scale_limit), scale_strides)
        )
        input_scale = None
        if self.input_scale is not None:
            whole = [size != 1 for size in self.input_scale.shape]
            input_scale = jax.lax.slice(
                self.input_scale,
                tuple(s if w else 0 for s, w in zip(start_indices, whole)),
                tuple(l if w else 1 for l, w in zip(limit_indices, whole)),
                tuple(st if w else 1 for st, w in zip(strides, whole)),
            )
        values = jax.lax.slice(self.values, tuple(start_indices), tuple(limit_indices), strides)
        return self._with(values, scale, zero_point, input_scale=input_scale)
