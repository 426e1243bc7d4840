"""Quantized ``dot_general``: a float activation times a quantized weight.

Integer path (``activation="dynamic"`` / ``"static"``), for ``w = (q - z) * s`` and
``x ~= qx * sx``::

    out = sx * s * (dot(qx, q) - dot(rowsum(qx), z))        # int8 x int8 -> int32 inside

The int8 x int8 -> int32 ``dot_general`` is what XLA sees; the activation scale ``sx`` (per row
or per tensor) and the weight scale ``s`` (per tensor or per output channel) are constant along
the contracted axes, so they multiply the int32 result. The zero-point term (asymmetric weights)
is an outer product of the activation's row sums with ``z``, computed by a second integer
``dot_general`` with the same dimension numbers over size-1 contracted axes.

Per-group weights (a scale that varies along one contracted axis in groups of ``group_size``)
split that axis into ``(groups, group_size)`` on both operands and make ``groups`` a batch
dimension of the integer dot (a shorter last group is completed with zero codes on both
operands); each group's int32 partial sum gets its own scale and the groups
are summed in float32. ``benchmarks/int8_matmul.py`` measures this against the alternative of
dequantizing the weight and running a float dot ("group_int" vs "group_dequant" rows): on the
shared 2-core CPU this was written on, with groups of 128, groups-as-batch ran at 1.3x float32 at
(M, K, N) = (32, 1024, 1024) and 1.05x at (32, 4096, 4096), dequantize-then-float at 0.65x and
0.57x, so grouped weights take the integer path.

Matrix-vector products (batch 1 decoding): XLA's CPU backend runs an s8 dot with a single row as
an s32 dot, far slower than float32, so integer dots with fewer than `MIN_ROWS` rows are padded
to `MIN_ROWS` rows; with an ``(out, in)`` weight layout the weight is made the left operand,
which XLA's integer matmul runs at several times float32's speed (see the benchmark).

Smoothed weights (`QArray.input_scale` ``s``, from SmoothQuant / AWQ): ``x W = (x / s)(W s)``, so
the activation is divided by ``s`` along the matching contracted axes first and the dot then runs
on the codes of ``W s`` exactly as above (integer or weight-only). If ``s`` varies along an axis
the dot does not contract, the weight is dequantized (``W`` itself) for a float dot instead.

bfloat16 carrier (the ``"integer_bf16"`` path of `jaxcompress.execute.policy`): the same
integer codes and scales, with the dot run as ``bfloat16 x bfloat16 -> float32`` instead of
``int8 x int8 -> int32``. Integers up to 256 in magnitude are exact in bfloat16 and their
products (at most 2^15) exact in float32, so every float32 partial sum is exact while it stays
below 2^24 in magnitude -- always when the dot contracts at most 1032 values (1032 * 127 * 128 <
2^24; 1040 with symmetric weights, whose codes stop at 127) -- and the result is then bit for bit
the integer path's (whose exact int32 sum is rounded to float32 once). Beyond that the float32
accumulator rounds partial sums, by up to a few float32 ulps of their magnitude each, which
cancellation (or the zero-point subtraction) can make large relative to a small result.
Why: XLA's CPU backend runs bf16 dots in YNNPACK fusions with the float ops around them, while
an s32 result leaves the fusion through a conversion kernel; on a 2-core AMD EPYC (Zen 4,
AVX-512 BF16, no AMX) a W8A8 4096x384x1536 dot, activation quantization included, ran 1.56x
float32 on bf16 codes and 1.08x on s8 (``benchmarks/int8_matmul.py``).
Matrix-vector products of a 2-D weight (fewer than `MIN_ROWS` rows) stay on the padded s8 dot
(a one-row bf16 dot is slower); `policy` reports such sites as ``"integer"``.

Weight-only path (``activation="weight_only"``): float activation, float dot with the weight
converted from its integer codes. When the scale is constant along the contracted axes the scale
is applied to the (smaller) output instead of the weight.
"""

from __future__ import annotations

import math

from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.quant.codec import block_along
from jaxcompress.quant.groups import group_span, is_ragged, pad_groups
from jaxcompress.execute.activation import quantize_activation
from jaxcompress.execute.weight_view import WeightView
from jaxcompress.qarray import QArray

__all__ = [
    "UnsupportedQuantizedOp",
    "quantized_dot_general",
    "dot_with_weight",
    "integer_dot",
]

# Integer dots with fewer activation rows than this are zero-padded to it (see _few_rows_dot).
MIN_ROWS = 8


class UnsupportedQuantizedOp(NotImplementedError):
    """A quantized weight meets an op that cannot run on the integer path as requested."""


def _unsupported(primitive: str, view: WeightView, reason: str) -> UnsupportedQuantizedOp:
    return UnsupportedQuantizedOp(
        f"{view.name}: `{primitive}` cannot run with this quantized weight in "
        f"activation={view.activation!r} mode: {reason}. Quantize this leaf with "
        f"activation='weight_only', or pass on_unsupported='dequantize' to compressed()"
    )


def _dims(dimension_numbers):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    return tuple(map(int, lhs_contract)), tuple(map(int, rhs_contract)), tuple(map(int, lhs_batch)), tuple(map(int, rhs_batch))


def _free(ndim: int, contract, batch) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in contract and a not in batch)


def _to_output(array: jax.Array, contract, batch, side: str, n_other_free: int) -> jax.Array:
    """Lay out a per-operand scale (``contract`` axes of size 1) like the dot's output:
    ``(batch..., lhs free..., rhs free...)``, with size-1 axes for the other operand's free axes."""
    if array.ndim == 0:
        return array
    free = _free(array.ndim, contract, batch)
    moved = jnp.transpose(array, tuple(batch) + free + tuple(contract))
    kept = moved.shape[: len(batch) + len(free)]
    moved = moved.reshape(kept)
    ones = (1,) * n_other_free
    if side == "lhs":
        return moved.reshape(kept + ones)
    return moved.reshape(kept[: len(batch)] + ones + kept[len(batch) :])


def _split_axis(array, axis: int, parts: int):
    shape = array.shape
    return array.reshape(shape[:axis] + (parts, shape[axis] // parts) + shape[axis + 1 :])


def integer_dot(
    x_codes: jax.Array,
    x_scale: jax.Array,
    view: WeightView,
    dimension_numbers,
    out_dtype: Any,
    primitive: str = "dot_general",
    carrier: Any = None,
) -> jax.Array:
    """``dot_general(x, w)`` from integer activation codes (``x ~= x_codes * x_scale``; the
    scale is a scalar or has size 1 on the contracted axes) and a quantized weight on the right;
    ``carrier``: ``None`` (int8 x int8 -> int32) or ``jnp.bfloat16`` (the codes as bfloat16, a
    float32 accumulator: see the module docs)."""
    lhs_contract, rhs_contract, lhs_batch, rhs_batch = _dims(dimension_numbers)
    view, rhs_contract, rhs_batch, fixup = view.fold(rhs_contract, rhs_batch)
    dims = ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))
    out = _integer_dot_stored(x_codes, x_scale, view, dims, out_dtype, primitive, carrier)
    if fixup is not None:
        lead = out.ndim - len(fixup)
        out = jnp.transpose(out, tuple(range(lead)) + tuple(lead + axis for axis in fixup))
    return out


def _integer_dot_stored(x_codes, x_scale, view: WeightView, dimension_numbers, out_dtype, primitive, carrier=None):
    lhs_contract, rhs_contract, lhs_batch, rhs_batch = _dims(dimension_numbers)
    small = _few_rows_dot(x_codes, x_scale, view, lhs_contract, rhs_contract, lhs_batch, out_dtype)
    if small is not None:
        return small
    # the accumulator: exact int32, or float32 sums of the codes as bfloat16 (module docs)
    code_dtype, sum_dtype = (jnp.int8, jnp.int32) if carrier is None else (carrier, jnp.float32)
    x_codes = x_codes.astype(code_dtype)
    x_scale_out = _to_output(
        x_scale, lhs_contract, lhs_batch, "lhs", view.ndim - len(rhs_contract) - len(rhs_batch)
    )
    grouped = [a for a in rhs_contract if view.scale.shape[a] != 1]
    if len(grouped) > 1:
        raise _unsupported(primitive, view, f"the scale varies along several contracted axes {grouped}")
    non_contract = [a for a in range(view.ndim) if a not in rhs_contract]
    scale, zero_point = view.full_scale(non_contract)
    codes = view.int8_values().astype(code_dtype)
    if grouped:
        # groups -> a leading batch dimension of the integer dot; summed after scaling.
        axis = grouped[0]
        x_axis = lhs_contract[rhs_contract.index(axis)]
        groups, dim = view.scale.shape[axis], codes.shape[axis]
        group = view.ragged[1] if view.ragged is not None and view.ragged[0] == axis else dim // groups
        # Blocks of one scale rather than whole groups where the groups straddle the shards of a
        # sharded contracting axis (a group split would gather the codes): `block_along`.
        block = block_along(codes, axis, group)
        if block == group and is_ragged(dim, group):
            # whole groups, the last one shorter: zero codes on both sides complete it
            codes, x_codes = pad_groups(codes, axis, group), pad_groups(x_codes, x_axis, group)
            parts, per_group = groups, 1
        else:
            parts, per_group = dim // block, group_span(dim, group) // block
        scale = jax.lax.slice_in_dim(jnp.repeat(scale, per_group, axis=axis), 0, parts, axis=axis)
        if zero_point is not None:
            zero_point = jax.lax.slice_in_dim(jnp.repeat(zero_point, per_group, axis=axis), 0, parts, axis=axis)
        codes, scale = _split_axis(codes, axis, parts), _split_axis(scale, axis, parts)
        zero_point = None if zero_point is None else _split_axis(zero_point, axis, parts)
        x_codes = _split_axis(x_codes, x_axis, parts)

        def shift(axes, at):
            return tuple(a + 1 if a > at else a for a in axes)

        lhs_contract = shift([a for a in lhs_contract if a != x_axis], x_axis) + (x_axis + 1,)
        rhs_contract = shift([a for a in rhs_contract if a != axis], axis) + (axis + 1,)
        lhs_batch = (x_axis,) + shift(lhs_batch, x_axis)
        rhs_batch = (axis,) + shift(rhs_batch, axis)
    dims = ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))
    accumulator = jax.lax.dot_general(x_codes, codes, dims, preferred_element_type=sum_dtype)
    if zero_point is not None:
        row_sums = jnp.sum(x_codes, axis=lhs_contract, keepdims=True, dtype=sum_dtype)
        # HIGHEST: a float32 correction must not go through a bf16 / tf32 matmul unit on accelerators
        correction = jax.lax.dot_general(
            row_sums, zero_point.astype(sum_dtype), dims, preferred_element_type=sum_dtype,
            precision=None if carrier is None else jax.lax.Precision.HIGHEST,
        )
        accumulator = accumulator - correction
    n_lhs_free = len(_free(x_codes.ndim, lhs_contract, lhs_batch))
    out = accumulator.astype(jnp.float32) * _to_output(scale, rhs_contract, rhs_batch, "rhs", n_lhs_free)
    if grouped:
        out = jnp.sum(out, axis=0)
    out = out * x_scale_out
    return out.astype(out_dtype)


def few_rows(x_shape, view: WeightView, lhs_contract, rhs_contract, lhs_batch) -> bool:
    """Whether an integer dot runs as the padded matrix-vector s8 dot (`_few_rows_dot`): a 2-D
    weight with one contracted axis and a scale constant along it, no batch dimensions, and a
    known row count below `MIN_ROWS` (a symbolic jax.export batch does not qualify)."""
    if lhs_batch or view.ndim != 2 or len(rhs_contract) != 1 or view.scale.shape[rhs_contract[0]] != 1:
        return False
    free_dims = [d for a, d in enumerate(x_shape) if a != lhs_contract[0]]
    return all(isinstance(d, int) for d in free_dims) and math.prod(free_dims) < MIN_ROWS


def _few_rows_dot(x_codes, x_scale, view: WeightView, lhs_contract, rhs_contract, lhs_batch, out_dtype):
    """Matrix-vector shaped integer dots (fewer than `MIN_ROWS` activation rows, a 2-D weight
    with one contracted axis, per-channel or per-tensor scale): XLA's CPU backend rewrites an s8
    dot with one row into an s32 dot (~10x slower than float32), so the rows are zero-padded to
    `MIN_ROWS`. When the weight's contracted axis is its minor one (an ``(out, in)`` layout), the
    weight becomes the dot's left operand, the layout XLA's integer matmul runs fastest for
    skinny products. Returns ``None`` when the case does not apply."""
    if not few_rows(x_codes.shape, view, lhs_contract, rhs_contract, lhs_batch):
        return None
    x_codes = x_codes.astype(jnp.int8)  # bfloat16 codes of the carrier: the same integers
    x_axis = lhs_contract[0]
    rows = math.prod(d for a, d in enumerate(x_codes.shape) if a != x_axis)
    free_shape = tuple(d for a, d in enumerate(x_codes.shape) if a != x_axis)
    k = x_codes.shape[x_axis]
    matrix = jnp.moveaxis(x_codes, x_axis, -1).reshape(rows, k)
    padded = jnp.pad(matrix, ((0, MIN_ROWS - rows), (0, 0)))
    codes = view.int8_values()
    w_axis = rhs_contract[0]
    if w_axis == 1:  # (out, in): weight on the left, (out, rows)
        accumulator = jax.lax.dot_general(codes, padded, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        accumulator = accumulator[:, :rows].T
    else:  # (in, out)
        accumulator = jax.lax.dot_general(padded, codes, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        accumulator = accumulator[:rows]
    scale, zero_point = view.full_scale([1 - w_axis])
    scale = scale.reshape(1, -1)
    if zero_point is not None:
        row_sums = jnp.sum(matrix, axis=1, keepdims=True, dtype=jnp.int32)
        accumulator = accumulator - row_sums * zero_point.reshape(1, -1).astype(jnp.int32)
    out = accumulator.astype(jnp.float32) * scale
    if x_scale.ndim:
        # One scale per row, or fewer (e.g. one per image of an unfolded conv): broadcast first.
        row_scale = jnp.broadcast_to(x_scale, x_codes.shape[:x_axis] + (1,) + x_codes.shape[x_axis + 1 :])
        out = out * jnp.moveaxis(row_scale, x_axis, -1).reshape(rows, 1)
    else:
        out = out * x_scale
    return out.reshape(free_shape + (out.shape[-1],)).astype(out_dtype)


def weight_only_dot(x, view: WeightView, dimension_numbers, out_dtype, precision=None, preferred_element_type=None):
    """Float ``dot_general(x, dequantize(w))``; the scale goes on the output when it is
    constant along the contracted axes (no zero point, no groups), and then a pending transpose
    of the weight is folded into the dot's dimension numbers: the converted codes are contracted
    in their stored layout, never transposed. (A weight stored ``(out, in)`` for the integer dot,
    transposed and converted every call, made XLA:CPU fuse the conversion, a copy and the dot
    into one loop kernel: a 1x3136x128 weight-only Dense ran 2.6x slower than float32, folded
    0.93x, on a 2-core AMD EPYC, ``benchmarks/cnn_speed.py``.)"""
    lhs_contract, rhs_contract, lhs_batch, rhs_batch = _dims(dimension_numbers)
    compute_dtype = jnp.result_type(x.dtype, view.dtype)
    x = x.astype(compute_dtype)
    logical = view.materialize()  # for the scale only (and the fallback below)
    scale_on_output = (
        view.zero_point is None and view.input_scale is None and all(logical.scale.shape[a] == 1 for a in rhs_contract)
    )
    if not scale_on_output:
        weight = logical.dequantize(compute_dtype)
        return jax.lax.dot_general(
            x, weight, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
        ).astype(out_dtype)
    stored, stored_contract, stored_batch, fixup = view.fold(rhs_contract, rhs_batch)
    weight = stored.float_values(compute_dtype)
    out = jax.lax.dot_general(
        x, weight, ((lhs_contract, stored_contract), (lhs_batch, stored_batch)),
        precision=precision, preferred_element_type=preferred_element_type,
    )
    if fixup is not None:
        lead = out.ndim - len(fixup)
        out = jnp.transpose(out, tuple(range(lead)) + tuple(lead + axis for axis in fixup))
    scale, _ = logical.full_scale([a for a in range(logical.ndim) if a not in rhs_contract])
    n_lhs_free = len(_free(x.ndim, lhs_contract, lhs_batch))
    out = out * _to_output(scale, rhs_contract, rhs_batch, "rhs", n_lhs_free).astype(out.dtype)
    return out.astype(out_dtype)


def dot_with_weight(
    x: jax.Array,
    view: WeightView,
    dimension_numbers,
    *,
    weight_side: str = "rhs",
    out_dtype: Any = None,
    mode: str | None = None,
    precision=None,
    preferred_element_type=None,
    on_activation=None,
    on_unsupported: str = "error",
    carrier: Any = None,
) -> jax.Array:
    """``dot_general`` of a float activation and a quantized weight on either side (internal;
    `quantized_dot_general` is the public form). ``on_activation(view, x, reduce_axes)`` is
    called with the activation the weight meets (activation calibration uses it); ``carrier``
    (``jnp.bfloat16``) runs an integer mode's dot on bfloat16 codes (module docs)."""
    lhs_contract, rhs_contract, lhs_batch, rhs_batch = _dims(dimension_numbers)
    if weight_side == "lhs":
        dimension_numbers = ((rhs_contract, lhs_contract), (rhs_batch, lhs_batch))
        lhs_contract, rhs_contract, lhs_batch, rhs_batch = _dims(dimension_numbers)
    if out_dtype is None:
        out_dtype = preferred_element_type or jnp.result_type(x.dtype, view.dtype)
    mode = view.activation if mode is None else mode
    if view.input_scale is not None:
        divisor = view.activation_divisor(x.ndim, rhs_contract, lhs_contract)
        if divisor is None:
            if mode != "weight_only" and on_unsupported == "error":
                raise _unsupported("dot_general", view, "its input scale varies along an axis the dot does not contract")
            mode = "weight_only"  # the dequantized weight (input scale included), a float dot
        else:
            x = smooth_activation(x, divisor)
            view = view.without_input_scale()
    if on_activation is not None:
        on_activation(view, x, lhs_contract)
    out = None
    if mode != "weight_only":
        try:
            out = _integer_dot_general(x, view, dimension_numbers, out_dtype, mode, carrier)
        except UnsupportedQuantizedOp:
            if on_unsupported == "error":
                raise
    if out is None:
        out = weight_only_dot(x, view, dimension_numbers, out_dtype, precision, preferred_element_type)
    if weight_side == "lhs":
        n_batch = len(lhs_batch)
        n_x_free = x.ndim - len(lhs_contract) - n_batch
        n_w_free = out.ndim - n_batch - n_x_free
        batch = tuple(range(n_batch))
        x_free = tuple(range(n_batch, n_batch + n_x_free))
        w_free = tuple(range(n_batch + n_x_free, n_batch + n_x_free + n_w_free))
        out = jnp.transpose(out, batch + w_free + x_free)
    return out


def smooth_activation(x: jax.Array, divisor: jax.Array) -> jax.Array:
    """``x / divisor`` (computed in float32, returned in ``x``'s dtype): the activation a
    smoothed weight's codes expect."""
    return (x.astype(jnp.float32) / divisor).astype(x.dtype)


def check_integer_operands(primitive: str, x, view: WeightView, mode: str) -> None:
    """What every integer op needs: int8 codes, a float activation, and a calibrated activation
    scale in static mode (shared by the dot and the convolution)."""
    if view.qtype != "int":
        raise _unsupported(primitive, view, f"{view.qtype} weights have no int8 codes")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise _unsupported(primitive, view, f"the activation has non-float dtype {x.dtype}")
    if mode == "static" and view.activation_scale is None:
        raise ValueError(
            f"{view.name}: activation='static' needs a calibrated activation scale; run "
            f"jaxcompress.calibrate_activations and jaxcompress.attach_activation_scales first"
        )


def _integer_dot_general(x, view: WeightView, dimension_numbers, out_dtype, mode, carrier=None):
    check_integer_operands("dot_general", x, view, mode)
    lhs_contract = _dims(dimension_numbers)[0]
    codes_dtype = jnp.int8 if carrier is None else carrier
    x_codes, x_scale = quantize_activation(x, lhs_contract, mode, view.activation_scale, codes_dtype)
    return integer_dot(x_codes, x_scale, view, dimension_numbers, out_dtype, carrier=carrier)


def quantized_dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    activation: str | None = None,
    carrier: Any = None,
) -> jax.Array:
    """`jax.lax.dot_general` where one operand is a `QArray` weight and the other a float array.

    Args:
      lhs, rhs: exactly one of them a `QArray`.
      dimension_numbers, precision, preferred_element_type: as in `jax.lax.dot_general`
        (``precision`` only affects the weight-only float dot).
      activation: ``"weight_only"``, ``"dynamic"`` or ``"static"``; default: the `QArray`'s own
        ``activation`` (set from its `QuantSpec`).
      carrier: ``None`` (the integer dot on int8 codes) or ``jnp.bfloat16``: the same codes as
        bfloat16 with a float32 accumulator (see the module docs; no effect in weight-only mode).

    Returns:
      The float result, laid out and typed as `jax.lax.dot_general`'s.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> x = jax.random.normal(jax.random.key(0), (4, 16))
    >>> w = jax.random.normal(jax.random.key(1), (16, 8))
    >>> q = jc.quantize(w, channel_axes=(-1,))
    >>> dims = (((1,), (0,)), ((), ()))
    >>> out = quantized_dot_general(x, q, dims, activation="dynamic")   # int8 x int8 -> int32
    >>> out.shape, out.dtype, bool(jnp.allclose(out, x @ w, atol=0.1))
    ((4, 8), dtype('float32'), True)
    >>> f = jax.jit(lambda x, q: quantized_dot_general(x, q, dims, activation="dynamic"))
    >>> hlo = f.lower(x, q).compile().as_text()
    >>> "s8[4,16]" in hlo and "s32[4,8]" in hlo
    True
    >>> carried = quantized_dot_general(x, q, dims, activation="dynamic", carrier=jnp.bfloat16)
    >>> bool(jnp.array_equal(carried, out))   # the same integer sums, bit for bit
    True
    """
    if isinstance(lhs, QArray) == isinstance(rhs, QArray):
        raise TypeError("quantized_dot_general expects exactly one QArray operand")
    if carrier is not None and jnp.dtype(carrier) != jnp.dtype(jnp.bfloat16):
        raise ValueError(f"quantized_dot_general: carrier must be None or jnp.bfloat16, got {carrier!r}")
    weight_side = "lhs" if isinstance(lhs, QArray) else "rhs"
    q, x = (lhs, rhs) if weight_side == "lhs" else (rhs, lhs)
    x = jnp.asarray(x)
    return dot_with_weight(
        x,
        WeightView.from_qarray(q),
        dimension_numbers,
        weight_side=weight_side,
        mode=activation,
        precision=precision,
        preferred_element_type=preferred_element_type,
        carrier=None if carrier is None else jnp.bfloat16,
    )
