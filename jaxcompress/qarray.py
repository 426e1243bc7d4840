"""`QArray`: a quantized array as a pytree node.

A `QArray` holds the stored values (integers or fp8), the scale, an optional zero point and
static metadata. It knows how to dequantize itself and how many bytes it really occupies; the
arithmetic that *produces* one lives in `jaxcompress.quant`.

Layout conventions (the same for every granularity, so consumers need no special cases):

* ``values`` has the ORIGINAL shape of the array.
* ``scale`` (and ``zero_point``) have the original rank. An axis the scale is shared over has
  size 1; a per-channel axis keeps its full size; the group axis has size ``dim // group_size``.
  Per-tensor quantization therefore has a scale of shape ``(1, ..., 1)``.
* dequantization is ``(values - zero_point) * scale`` after splitting the group axis into
  ``(dim // group_size, group_size)``, divided by ``input_scale`` when present.
* ``input_scale`` (optional, ``None`` by default) is a per-input-channel smoothing factor ``s``
  (SmoothQuant / AWQ): the codes quantize ``W * s`` along the weight's input (contracting)
  axis or axes, and the `QArray` stands for ``W = dequant(codes) / s``. It has the original rank,
  full size on the smoothed axes and size 1 elsewhere. `jaxcompress.compressed` divides the
  ACTIVATION by ``s`` instead (``x W = (x / s)(s W)``) and runs the integer dot on the codes.

Storage dtypes: 8-bit (and 5..7-bit) integers use ``int8``; 3- and 4-bit use ``jnp.int4``
(a 3-bit value occupies a 4-bit container); 2-bit uses ``jnp.int2``. fp8 uses
``float8_e4m3fn`` or ``float8_e5m2``. `QArray.nbytes` counts the packed container bits of the
values (int4 = 0.5 B/element, int2 = 0.25 B/element) plus the bytes of scale and zero point:
exactly what a packed file stores, not what an unpacked in-memory buffer happens to use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["QArray", "INT_QTYPE", "FP8_QTYPES", "storage_dtype", "storage_bits"]

INT_QTYPE = "int"
FP8_QTYPES = {
    "float8_e4m3fn": jnp.float8_e4m3fn,
    "float8_e5m2": jnp.float8_e5m2,
}


def storage_dtype(bits: int, qtype: str = INT_QTYPE) -> Any:
    """The dtype that stores ``bits``-bit values of ``qtype``.

    >>> storage_dtype(4)
    dtype(int4)
    >>> storage_dtype(8, "float8_e4m3fn")
    dtype(float8_e4m3fn)
    """
    if qtype in FP8_QTYPES:
        return jnp.dtype(FP8_QTYPES[qtype])
    if bits <= 2:
        return jnp.dtype(jnp.int2)
    if bits <= 4:
        return jnp.dtype(jnp.int4)
    return jnp.dtype(jnp.int8)


def storage_bits(dtype: Any) -> int:
    """Bits one element of ``dtype`` occupies when packed (int4 -> 4, int2 -> 2, int8 -> 8)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.dtype(jnp.int4) or dtype == jnp.dtype(jnp.uint4):
        return 4
    if dtype == jnp.dtype(jnp.int2) or dtype == jnp.dtype(jnp.uint2):
        return 2
    return dtype.itemsize * 8


def _array_nbytes(array: Any) -> int:
    if array is None:
        return 0
    return math.ceil(int(np.prod(array.shape)) * storage_bits(array.dtype) / 8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class QArray:
    """A quantized array: ``values``, ``scale``, optional ``zero_point`` and static metadata.

    Build one with `jaxcompress.quantize`; get the float array back with `dequantize`.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> q = jc.quantize(jnp.array([[0.5, -1.0], [2.0, 0.25]]), bits=8, channel_axes=(1,))
    >>> q.shape, q.values.dtype, q.scale.shape
    ((2, 2), dtype('int8'), (1, 2))
    >>> q.nbytes  # 4 int8 values + 2 float32 scales
    12

    Attributes:
      values: stored integers (int8 / int4 / int2 containers) or fp8 values, original shape.
      scale: float32 scale, original rank (see the module docs for the layout).
      zero_point: ``None`` for symmetric quantization, else integers in the storage dtype with the
        scale's shape.
      bits: bit width (2..8; 8 for fp8).
      qtype: ``"int"``, ``"float8_e4m3fn"`` or ``"float8_e5m2"``.
      channel_axes: axes that keep their own scale (sorted, non-negative). Every other axis is
        shared, except the group axis which is split into groups.
      group_axis / group_size: per-group quantization along ``group_axis`` (``None`` if absent).
      dtype: the dtype of the original array, returned by `dequantize`.
      activation: how `jaxcompress.compressed` runs a dot / conv with this weight:
        ``"weight_only"``, ``"dynamic"`` or ``"static"`` (see `QuantSpec`).
      activation_scale: for ``activation="static"``, the calibrated float32 scalar scale of the
        int8 activation this weight meets (``None`` until attached with
        `jaxcompress.attach_activation_scales`); with an ``input_scale`` it is the scale of the
        smoothed activation ``x / input_scale``.
      input_scale: ``None``, or the float32 per-input-channel smoothing factor ``s`` (original
        rank; full size on the input axes, 1 elsewhere): the array is ``dequant(codes) / s``.
        Set by `jaxcompress.oneshot.smoothquant.smoothquant` and `jaxcompress.oneshot.awq.awq`.
    """

    values: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None = None
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))
    qtype: str = dataclasses.field(default=INT_QTYPE, metadata=dict(static=True))
    channel_axes: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    group_axis: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    group_size: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    dtype: Any = dataclasses.field(default=jnp.dtype(jnp.float32), metadata=dict(static=True))
    activation: str = dataclasses.field(default="weight_only", metadata=dict(static=True))
    activation_scale: jax.Array | None = None
    input_scale: jax.Array | None = None

    # ---- array-like surface -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.values.shape))

    @property
    def shared_axes(self) -> tuple[int, ...]:
        """Axes the scale is shared over entirely (size 1 in ``scale``)."""
        return tuple(
            axis
            for axis in range(self.ndim)
            if axis not in self.channel_axes and axis != self.group_axis
        )

    @property
    def input_scale_axes(self) -> tuple[int, ...]:
        """Axes along which ``input_scale`` varies (``()`` when there is none)."""
        if self.input_scale is None:
            return ()
        return tuple(axis for axis, size in enumerate(self.input_scale.shape) if size != 1)

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed values plus scale (plus zero point, static
        activation scale and input scale, when present)."""
        return (
            _array_nbytes(self.values)
            + _array_nbytes(self.scale)
            + _array_nbytes(self.zero_point)
            + _array_nbytes(self.activation_scale)
            + _array_nbytes(self.input_scale)
        )

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The float array this `QArray` stands for, in ``dtype`` (default: the original dtype)."""
        out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(self.dtype)
        if self.input_scale is not None:
            smoothed = dataclasses.replace(self, input_scale=None).dequantize(jnp.float32)
            return (smoothed / self.input_scale.astype(jnp.float32)).astype(out_dtype)
        values = self.values.astype(jnp.float32)
        if self.zero_point is not None:
            zero_point = self.zero_point.astype(jnp.float32)
        else:
            zero_point = None
        scale = self.scale.astype(jnp.float32)
        if self.group_axis is None:
            if zero_point is not None:
                values = values - zero_point
            return (values * scale).astype(out_dtype)
        axis = self.group_axis
        shape = self.values.shape
        grouped = shape[:axis] + (shape[axis] // self.group_size, self.group_size) + shape[axis + 1 :]
        values = values.reshape(grouped)
        scale = jnp.expand_dims(scale, axis + 1)
        if zero_point is not None:
            values = values - jnp.expand_dims(zero_point, axis + 1)
        return (values * scale).reshape(shape).astype(out_dtype)

    def __repr__(self) -> str:
        granularity = describe_granularity(self)
        return (
            f"QArray(shape={self.shape}, {self.qtype}{self.bits if self.qtype == INT_QTYPE else ''}, "
            f"{granularity}, {'symmetric' if self.symmetric else 'asymmetric'}, "
            f"{'input-scaled, ' if self.input_scale is not None else ''}dtype={jnp.dtype(self.dtype).name})"
        )


def describe_granularity(q: QArray) -> str:
    """Short human description: ``per-tensor``, ``per-channel(1)``, ``per-group(0, 128)``..."""
    parts = []
    if q.channel_axes:
        parts.append(f"per-channel{tuple(q.channel_axes)}")
    if q.group_axis is not None:
        parts.append(f"per-group(axis={q.group_axis}, size={q.group_size})")
    return " + ".join(parts) if parts else "per-tensor"
