"""`QArray`: a quantized array as a pytree node.

A `QArray` holds the stored values (integers or fp8), the scale, an optional zero point and
static metadata. It knows how to dequantize itself and how many bytes it really occupies; the
arithmetic that *produces* one lives in `jaxcompress.quant`.

Layout conventions (the same for every granularity, so consumers need no special cases):

* ``values`` has the ORIGINAL shape of the array, unless ``stored_permutation`` is set: then the
  codes are stored in another axis order, ``values == transpose(logical codes,
  stored_permutation)`` (e.g. ``(1, 0)``: a Flax ``(in, out)`` Dense kernel kept ``(out, in)``,
  the layout XLA's integer dot runs fastest, see `jaxcompress.execute.layout`). Everything else
  stays logical: `QArray.shape`, the scale / zero point / input scale layout, the axes in the
  metadata, `dequantize`. `QArray.logical_values` gives the codes in the logical order and
  `QArray.with_layout` re-stores them.
* ``scale`` (and ``zero_point``) have the original rank. An axis the scale is shared over has
  size 1; a per-channel axis keeps its full size; the group axis has ``ceil(dim / group_size)``
  entries: when ``group_size`` does not divide ``dim`` the LAST group is shorter (``dim mod
  group_size`` elements, as llama.cpp / GPTQ do), and an axis shorter than the group is one
  group. Element ``i`` of the group axis uses scale entry ``i // group_size``
  (`jaxcompress.quant.groups` has the helpers). Per-tensor quantization therefore has a scale of
  shape ``(1, ..., 1)``.
* dequantization is ``(values - zero_point) * scale`` with the scale repeated over its group,
  divided by ``input_scale`` when present. For ``qtype="nf4"`` (normal-float 4-bit, QLoRA's code
  book) it is ``NF4_CODE[values + 8] * scale``: the int4 values index the 16 codes
  (`jaxcompress.quant.nf4`).
* ``input_scale`` (optional, ``None`` by default) is a per-input-channel smoothing factor ``s``
  (SmoothQuant / AWQ): the codes quantize ``W * s`` along the weight's input (contracting)
  axis or axes, and the `QArray` stands for ``W = dequant(codes) / s``. It has the original rank,
  full size on the smoothed axes and size 1 elsewhere. `jaxcompress.compressed` divides the
  ACTIVATION by ``s`` instead (``x W = (x / s)(s W)``) and runs the integer dot on the codes.

Storage dtypes: 8-bit (and 5..7-bit) integers use ``int8``; 3- and 4-bit use ``jnp.int4``
(a 3-bit value occupies a 4-bit container); 2-bit uses ``jnp.int2``. fp8 uses
``float8_e4m3fn`` or ``float8_e5m2``; nf4 uses ``jnp.int4`` (code index - 8). `QArray.nbytes` counts the packed container bits of the
values (int4 = 0.5 B/element, int2 = 0.25 B/element) plus the bytes of scale and zero point:
exactly what a packed file stores, not what an unpacked in-memory buffer happens to use.

Every construction (``QArray(...)``, ``dataclasses.replace``, a pytree unflatten) checks the
static metadata, and, when the children are concrete arrays or ``jax.ShapeDtypeStruct``s, the
arrays against it (`check_qarray`): bits vs qtype vs storage dtype, scale / zero point / input
scale shapes vs channel and group axes, the group size vs its axis. A contradiction is an
`InvalidQArrayError` (a ``ValueError``). Tracers, ``None`` and sentinel children (what jax
transforms and ``tree_map`` put there) are never inspected, and no value is ever read.

A `QArray` is not an array: ``jnp.asarray(q)``, ``np.asarray(q)``, ``float(q)``, ``x @ q`` raise
a ``TypeError`` that says to run the function through `jaxcompress.compressed` or to
dequantize first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress._errors import InvalidQArrayError

__all__ = [
    "QArray", "INT_QTYPE", "NF4_QTYPE", "FP8_QTYPES", "ACTIVATIONS", "storage_dtype", "storage_bits", "check_qarray",
    "InvalidQArrayError", "logical_shape", "inverse_permutation",
]

INT_QTYPE = "int"
NF4_QTYPE = "nf4"  # normal-float 4-bit: 16 code values, an absmax scale per group (QLoRA)
FP8_QTYPES = {
    "float8_e4m3fn": jnp.float8_e4m3fn,
    "float8_e5m2": jnp.float8_e5m2,
}
ACTIVATIONS = ("weight_only", "dynamic", "static")


def storage_dtype(bits: int, qtype: str = INT_QTYPE) -> Any:
    """The dtype that stores ``bits``-bit values of ``qtype``.

    >>> storage_dtype(4)
    dtype(int4)
    >>> storage_dtype(8, "float8_e4m3fn")
    dtype(float8_e4m3fn)
    >>> storage_dtype(4, "nf4")
    dtype(int4)
    """
    if qtype == NF4_QTYPE:
        return jnp.dtype(jnp.int4)
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
      bits: bit width (2..8; 8 for fp8, 4 for nf4).
      qtype: ``"int"``, ``"float8_e4m3fn"``, ``"float8_e5m2"`` or ``"nf4"`` (symmetric, weight-only).
      channel_axes: axes that keep their own scale (sorted, non-negative). Every other axis is
        shared, except the group axis which is split into groups.
      group_axis / group_size: per-group quantization along ``group_axis`` (``None`` if absent);
        the last group may be shorter (``ceil(dim / group_size)`` scale entries).
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
      stored_permutation: ``None`` (codes in the logical axis order), or the axis order the codes
        are stored in: ``values == transpose(logical codes, stored_permutation)``. Only the storage
        of ``values`` changes (see the module docs); `jaxcompress.quantize_params` stores
        integer-mode Flax Dense kernels ``(1, 0)``, i.e. ``(out, in)``.
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
    stored_permutation: tuple[int, ...] | None = dataclasses.field(
        default=None, metadata=dict(static=True, omit_when_default=True)
    )

    def __post_init__(self):
        check_qarray(self)

    # ---- not an array: say what to do instead -----------------------------------------------
    def _not_an_array(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{self!r} is a quantized weight, not an array: run the function that uses it through "
            f"`jc.compressed(fn)(qparams, ...)` (integer execution), or get float weights first "
            f"with `jc.dequantize_params(qparams)` (or `q.dequantize()`)"
        )

    __array__ = __jax_array__ = __float__ = __int__ = __complex__ = __index__ = _not_an_array
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _not_an_array
    __matmul__ = __rmatmul__ = __truediv__ = __rtruediv__ = __neg__ = __pow__ = _not_an_array

    # ---- array-like surface -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape (that of the array this `QArray` stands for)."""
        return logical_shape(tuple(self.values.shape), self.stored_permutation)

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
    def logical_values(self) -> jax.Array:
        """The codes in the logical axis order (``values`` itself unless ``stored_permutation``).

        >>> import jax.numpy as jnp, jaxcompress as jc
        >>> q = jc.quantize(jnp.arange(6.0).reshape(3, 2), channel_axes=(1,)).with_layout((1, 0))
        >>> q.shape, q.values.shape, q.logical_values.shape
        ((3, 2), (2, 3), (3, 2))
        """
        permutation = self.stored_permutation
        if permutation is None:
            return self.values
        lead = len(self.values.shape) - len(permutation)
        inverse = inverse_permutation(permutation)
        return jnp.transpose(self.values, tuple(range(lead)) + tuple(lead + a for a in inverse))

    def with_layout(self, permutation: tuple[int, ...] | None) -> "QArray":
        """The same `QArray` with its codes stored in axis order ``permutation`` (``None`` or the
        identity: the logical order); shape, scales and `dequantize` are unchanged.

        >>> import jax.numpy as jnp, jaxcompress as jc
        >>> q = jc.quantize(jnp.arange(6.0).reshape(3, 2), channel_axes=(1,))
        >>> stored = q.with_layout((1, 0))
        >>> stored.values.shape, stored.stored_permutation, bool((stored.dequantize() == q.dequantize()).all())
        ((2, 3), (1, 0), True)
        >>> stored.with_layout(None).values.shape
        (3, 2)
        """
        if permutation is not None:
            permutation = tuple(int(a) for a in permutation)
            if sorted(permutation) != list(range(len(self.shape))):
                raise InvalidQArrayError(f"QArray.with_layout: {permutation} is not a permutation of the axes of shape {self.shape}")
            if permutation == tuple(range(len(permutation))):
                permutation = None
        if permutation == self.stored_permutation:
            return self
        logical = self.logical_values
        values = logical if permutation is None else jnp.transpose(logical, permutation)
        return dataclasses.replace(self, values=values, stored_permutation=permutation)

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
        if self.stored_permutation is not None:
            return self.with_layout(None).dequantize(out_dtype)
        if self.group_axis is not None or self.qtype == NF4_QTYPE:
            # Groups go through the blocked view of `jaxcompress.quant.arrays.dequantize`, which
            # keeps a sharded group axis sharded (whole groups would gather straddling shards);
            # nf4 codes are looked up in its code book there.
            from jaxcompress.quant.arrays import dequantize

            return dequantize(self, out_dtype)
        if self.input_scale is not None:
            smoothed = dataclasses.replace(self, input_scale=None).dequantize(jnp.float32)
            return (smoothed / self.input_scale.astype(jnp.float32)).astype(out_dtype)
        values = self.values.astype(jnp.float32)
        scale = self.scale.astype(jnp.float32)
        if self.zero_point is not None:
            values = values - self.zero_point.astype(jnp.float32)
        return (values * scale).astype(out_dtype)

    def __repr__(self) -> str:
        granularity = describe_granularity(self)
        return (
            f"QArray(shape={self.shape}, {self.qtype}{self.bits if self.qtype == INT_QTYPE else ''}, "
            f"{granularity}, {'symmetric' if self.symmetric else 'asymmetric'}, "
            f"{'input-scaled, ' if self.input_scale is not None else ''}"
            f"{f'stored {self.stored_permutation}, ' if self.stored_permutation is not None else ''}"
            f"dtype={jnp.dtype(self.dtype).name})"
        )


def inverse_permutation(permutation: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``permutation``.

    >>> inverse_permutation((2, 0, 1))
    (1, 2, 0)
    """
    inverse = [0] * len(permutation)
    for position, axis in enumerate(permutation):
        inverse[axis] = position
    return tuple(inverse)


def logical_shape(stored_shape: tuple[int, ...], permutation: tuple[int, ...] | None) -> tuple[int, ...]:
    """The logical shape of codes stored as ``stored_shape`` in axis order ``permutation`` (which
    applies to the trailing axes: leading ones are `jax.vmap` batch axes).

    >>> logical_shape((8, 4), (1, 0)), logical_shape((3, 8, 4), (1, 0))
    ((4, 8), (3, 4, 8))
    """
    if permutation is None or len(permutation) > len(stored_shape):
        return tuple(stored_shape)
    lead = len(stored_shape) - len(permutation)
    trailing = stored_shape[lead:]
    return tuple(stored_shape[:lead]) + tuple(trailing[a] for a in inverse_permutation(permutation))


def describe_granularity(q: QArray) -> str:
    """Short human description: ``per-tensor``, ``per-channel(1)``, ``per-group(0, 128)``..."""
    parts = []
    if q.channel_axes:
        parts.append(f"per-channel{tuple(q.channel_axes)}")
    if q.group_axis is not None:
        parts.append(f"per-group(axis={q.group_axis}, size={q.group_size})")
    return " + ".join(parts) if parts else "per-tensor"


# The checks live in their own module and need the definitions above; QArray.__post_init__
# looks `check_qarray` up at call time.
from jaxcompress.qarray_checks import check_qarray  # noqa: E402
