"""On-disk encodings: bit packing, sparse bitmaps and N:M, all exact and NumPy-only.

* `pack_bits` / `unpack_bits`: unsigned codes of 1, 2, 4 or 8 bits, packed little-endian
  within each byte (element ``i`` sits at bit ``(i * bits) % 8`` of byte ``i * bits // 8``).
  `pack_values` / `unpack_values` use them for ``int4`` / ``int2`` containers (two's
  complement nibbles / crumbs; int4 packs two per byte) and pass other dtypes through as bytes.
* Bitmap sparsity (`encode_bitmap` / `decode_bitmap`): one bit per element saying "kept" plus
  the kept values in C order. A 90%-sparse int8 tensor costs ``1/8 + 0.1 = 0.225`` B/element.
* N:M sparsity (`encode_n_m` / `decode_n_m`): along ``axis``, every group of ``m`` consecutive
  elements keeps exactly ``n``; stored as the kept values (``n/m`` of the elements) and each
  kept value's position inside its group in ``ceil(log2 m)`` bits rounded up to 1/2/4/8.
  2:4 int8 costs ``0.5 + 0.5 * 2/8 = 0.625`` B/element.

Decoding puts zeros where nothing is kept, so an encoding is exact when the array is zero
outside its mask; `encode_bitmap` and `encode_n_m` check that and raise otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "pack_bits",
    "unpack_bits",
    "container_bits",
    "pack_values",
    "unpack_values",
    "packed_nbytes",
    "encode_bitmap",
    "decode_bitmap",
    "n_m_pattern",
    "nonzero",
    "zero_outside",
    "per_value",
    "index_bits",
    "encode_n_m",
    "decode_n_m",
]

_SUB_BYTE = {np.dtype(ml_dtypes.int4): 4, np.dtype(ml_dtypes.int2): 2, np.dtype(ml_dtypes.uint4): 4, np.dtype(ml_dtypes.uint2): 2}


_CHUNK = 1 << 20  # elements per slice: packing works slice by slice to bound temporaries


def _pack_chunk(codes: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    flat = np.zeros(math.ceil(codes.size / per_byte) * per_byte, np.uint8)
    flat[: codes.size] = codes
    rows = flat.reshape(-1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(rows << shifts, axis=1).astype(np.uint8)


def pack_bits(codes: Any, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes (1, 2, 4 or 8) into a flat ``uint8`` array.

    >>> pack_bits([1, 2, 3, 0, 1], 2).tolist()  # 0b00111001, then 0b01
    [57, 1]
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack into {bits} bits")
    if bits == 8:
        return codes.astype(np.uint8)
    out = np.empty(math.ceil(codes.size * bits / 8), np.uint8)
    step = _CHUNK  # a multiple of every per_byte, so slices start on byte boundaries
    for begin in range(0, codes.size, step):
        chunk = codes[begin : begin + step].astype(np.uint8)
        out[begin * bits // 8 : begin * bits // 8 + math.ceil(chunk.size * bits / 8)] = _pack_chunk(chunk, bits)
    return out


def unpack_bits(packed: Any, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: ``count`` unsigned codes as ``uint8``.

    >>> unpack_bits([57, 1], 2, 5).tolist()
    [1, 2, 3, 0, 1]
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
    packed = np.asarray(packed, np.uint8).reshape(-1)
    need = math.ceil(count * bits / 8)
    if packed.size != need:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes, got {packed.size}")
    if bits == 8:
        return packed.copy()
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    out = np.empty(count, np.uint8)
    step = _CHUNK // per_byte  # bytes per slice
    for begin in range(0, packed.size, step):
        codes = ((packed[begin : begin + step, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)
        first = begin * per_byte
        out[first : first + codes.size] = codes[: count - first]
    return out


def container_bits(dtype: Any) -> int:
    """Bits one element of ``dtype`` occupies packed on disk (int4 -> 4, int2 -> 2).

    >>> container_bits(ml_dtypes.int4), container_bits(np.float32)
    (4, 32)
    """
    dtype = np.dtype(dtype)
    return _SUB_BYTE.get(dtype, dtype.itemsize * 8)


def packed_nbytes(count: int, dtype: Any) -> int:
    """Bytes `pack_values` writes for ``count`` elements of ``dtype``.

    >>> packed_nbytes(5, ml_dtypes.int4)
    3
    """
    return math.ceil(count * container_bits(dtype) / 8)


def pack_values(values: Any) -> np.ndarray:
    """The bytes of ``values`` (C order) as flat ``uint8``; int4 / int2 packed 2 / 4 per byte.

    >>> import ml_dtypes
    >>> pack_values(np.array([-1, 2, 7], ml_dtypes.int4)).tolist()  # nibbles 0xF, 0x2, 0x7
    [47, 7]
    """
    values = np.asarray(values)
    bits = _SUB_BYTE.get(values.dtype)
    if bits is None:
        return np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    flat = values.reshape(-1)
    out = np.empty(math.ceil(flat.size * bits / 8), np.uint8)
    for begin in range(0, flat.size, _CHUNK):
        codes = flat[begin : begin + _CHUNK].astype(np.int8).view(np.uint8) & np.uint8((1 << bits) - 1)
        out[begin * bits // 8 : begin * bits // 8 + math.ceil(codes.size * bits / 8)] = _pack_chunk(codes, bits)
    return out


def unpack_values(packed: Any, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack_values`.

    >>> import ml_dtypes
    >>> unpack_values([47, 7], ml_dtypes.int4, (3,)).astype(int).tolist()
    [-1, 2, 7]
    """
    dtype = np.dtype(dtype)
    packed = np.asarray(packed, np.uint8).reshape(-1)
    count = int(np.prod(shape, dtype=np.int64))
    bits = _SUB_BYTE.get(dtype)
    if bits is None:
        if packed.size != count * dtype.itemsize:
            raise ValueError(f"{count} elements of {dtype} need {count * dtype.itemsize} bytes, got {packed.size}")
        return packed.view(dtype).reshape(shape).copy()
    codes = unpack_bits(packed, bits, count)
    if dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.int2)):  # sign-extend in place
        codes <<= np.uint8(8 - bits)
        signed = codes.view(np.int8)
        signed >>= np.int8(8 - bits)
        return signed.astype(dtype).reshape(shape)
    return codes.astype(dtype).reshape(shape)


def nonzero(array: Any) -> np.ndarray:
    """``array != 0`` as bool, for any dtype here (int4 / fp8 compared via float32, slice by
    slice, so no leaf-sized float copy is made).

    >>> nonzero(np.array([0, 3, -0.0])).tolist()
    [False, True, False]
    """
    array = np.asarray(array)
    if array.dtype.kind in "biuf" and array.dtype in (np.dtype(np.bool_), np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int16),
                                                      np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float16),
                                                      np.dtype(np.float32), np.dtype(np.float64)):
        return array != 0
    flat = array.reshape(-1)
    out = np.empty(flat.size, bool)
    for begin in range(0, flat.size, _CHUNK):
        out[begin : begin + _CHUNK] = flat[begin : begin + _CHUNK].astype(np.float32) != 0
    return out.reshape(array.shape)


def per_value(array: Any, shape: tuple[int, ...], group_axis: int | None = None, group_size: int | None = None) -> np.ndarray:
    """A scale-shaped array (a `QArray`'s scale or zero point, logical layout) broadcast to one
    entry per value of ``shape``: along the group axis, value ``i`` takes entry ``i // group_size``.

    >>> per_value(np.array([[1], [2]]), (2, 3)).tolist()
    [[1, 1, 1], [2, 2, 2]]
    >>> per_value(np.array([[1, 2]]), (1, 5), group_axis=1, group_size=3).tolist()
    [[1, 1, 1, 2, 2]]
    """
    array = np.asarray(array)
    if group_axis is not None and group_size is not None:
        axis = int(group_axis) % len(shape)
        array = np.take(array, np.arange(shape[axis]) // int(group_size), axis=axis)
    return np.broadcast_to(array, shape)


def zero_outside(array: Any, mask: Any) -> bool:
    """Whether ``array`` is zero wherever ``mask`` is False (checked slice by slice)."""
    flat, flat_mask = np.asarray(array).reshape(-1), np.asarray(mask, bool).reshape(-1)
    for begin in range(0, flat.size, _CHUNK):
        part = slice(begin, begin + _CHUNK)
        if np.any(nonzero(flat[part]) & ~flat_mask[part]):
            return False
    return True


def _check_zero_outside(array: np.ndarray, mask: np.ndarray, what: str) -> None:
    if not zero_outside(array, mask):
        raise ValueError(f"{what}: the array is not zero where the mask is False; the encoding would not be exact")


def encode_bitmap(array: Any, mask: Any = None, *, name: str = "array") -> tuple[np.ndarray, np.ndarray]:
    """``(bitmap, kept)``: packed 1-bit mask (default: ``array != 0``) and the kept values.

    >>> bitmap, kept = encode_bitmap(np.array([0, 5, 0, 0, 0, 0, 0, 0, 0, -3], np.int8))
    >>> bitmap.tolist(), kept.tolist()
    ([2, 2], [5, -3])
    """
    array = np.asarray(array)
    mask = nonzero(array) if mask is None else np.asarray(mask, bool)
    if mask.shape != array.shape:
        raise ValueError(f"{name}: mask shape {mask.shape} differs from the array's {array.shape}")
    _check_zero_outside(array, mask, name)
    return pack_bits(mask.reshape(-1), 1), array[mask]


def decode_bitmap(bitmap: Any, kept: Any, shape: tuple[int, ...], *, name: str = "array") -> tuple[np.ndarray, np.ndarray]:
    """``(array, mask)`` from `encode_bitmap` output; zeros where the mask is False.

    >>> array, mask = decode_bitmap([2, 2], np.array([5, -3], np.int8), (10,))
    >>> array.tolist()
    [0, 5, 0, 0, 0, 0, 0, 0, 0, -3]
    """
    kept = np.asarray(kept)
    count = int(np.prod(shape, dtype=np.int64))
    mask = unpack_bits(bitmap, 1, count).astype(bool).reshape(shape)
    if int(mask.sum()) != kept.size:
        raise ValueError(f"{name}: the bitmap keeps {int(mask.sum())} elements but {kept.size} values are stored")
    array = np.zeros(shape, kept.dtype)
    array[mask] = kept.reshape(-1)
    return array, mask


def _grouped(array: np.ndarray, m: int, axis: int) -> np.ndarray:
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))


def n_m_pattern(mask: Any, axis: int, candidates=((2, 4), (1, 4), (4, 8), (2, 8), (1, 2))) -> tuple[int, int] | None:
    """The first ``(n, m)`` in ``candidates`` such that every group of ``m`` along ``axis`` keeps
    exactly ``n`` elements of ``mask``, or ``None``.

    >>> n_m_pattern(np.array([[1, 0, 1, 0], [0, 1, 1, 0]], bool), axis=1)
    (2, 4)
    """
    mask = np.asarray(mask, bool)
    if mask.ndim == 0:
        return None
    axis = axis % mask.ndim
    for n, m in candidates:
        if mask.shape[axis] % m == 0 and mask.shape[axis] > 0:
            corner = mask[tuple(slice(None) if i == axis else slice(0, 4) for i in range(mask.ndim))]
            if not np.all(_grouped(corner, m, axis).sum(-1, dtype=np.int16) == n):  # cheap early reject
                continue
            grouped = _grouped(mask, m, axis).reshape(-1, m)
            if all(np.all(grouped[i : i + _CHUNK].sum(-1, dtype=np.int16) == n) for i in range(0, grouped.shape[0], _CHUNK)):
                return n, m
    return None


def index_bits(m: int) -> int:
    """Bits stored per kept position of an N:M group of ``m`` (1, 2, 4 or 8).

    >>> index_bits(4), index_bits(8), index_bits(16)
    (2, 4, 4)
    """
    need = max(1, math.ceil(math.log2(m)))
    for bits in (1, 2, 4, 8):
        if need <= bits:
            return bits
    raise ValueError(f"N:M group size m={m} is larger than 256")


def encode_n_m(array: Any, mask: Any, n: int, m: int, axis: int, *, name: str = "array") -> tuple[np.ndarray, np.ndarray]:
    """``(kept, packed_indices)`` for an N:M-sparse array: ``kept`` has shape
    ``moved_shape[:-1] + (groups, n)`` (``axis`` moved last), indices are positions in groups.

    >>> kept, idx = encode_n_m(np.array([[3, 0, 0, 4]], np.int8), np.array([[1, 0, 0, 1]], bool), 2, 4, 1)
    >>> kept.reshape(-1).tolist(), unpack_bits(idx, 2, 2).tolist()
    ([3, 4], [0, 3])
    """
    array, mask = np.asarray(array), np.asarray(mask, bool)
    axis = axis % array.ndim
    if array.shape[axis] % m:
        raise ValueError(f"{name}: N:M group size {m} does not divide axis {axis} of shape {array.shape}")
    grouped_mask = _grouped(mask, m, axis)
    if not np.all(grouped_mask.sum(-1) == n):
        raise ValueError(f"{name}: the mask does not keep exactly {n} of every {m} along axis {axis}")
    _check_zero_outside(array, mask, name)
    # positions of the kept elements, ascending, per group (stable argsort of ~mask puts kept first)
    positions = np.argsort(~grouped_mask, axis=-1, kind="stable")[..., :n]
    kept = np.take_along_axis(_grouped(array, m, axis), positions, axis=-1)
    return kept, pack_bits(positions.reshape(-1), index_bits(m))


def decode_n_m(kept: Any, packed_indices: Any, shape: tuple[int, ...], n: int, m: int, axis: int, *, name: str = "array") -> tuple[np.ndarray, np.ndarray]:
    """``(array, mask)`` from `encode_n_m` output.

    >>> kept, idx = encode_n_m(np.array([[3, 0, 0, 4]], np.int8), np.array([[1, 0, 0, 1]], bool), 2, 4, 1)
    >>> decode_n_m(kept, idx, (1, 4), 2, 4, 1)[0].tolist()
    [[3, 0, 0, 4]]
    """
    kept = np.asarray(kept)
    axis = axis % len(shape)
    moved = tuple(np.moveaxis(np.empty(shape, np.bool_), axis, -1).shape)
    grouped_shape = moved[:-1] + (moved[-1] // m, m)
    if kept.size != int(np.prod(grouped_shape[:-1], dtype=np.int64)) * n:
        raise ValueError(f"{name}: {kept.size} kept values do not fit {n}:{m} over shape {tuple(shape)}")
    positions = unpack_bits(packed_indices, index_bits(m), kept.size).astype(np.int64)
    if positions.size and positions.max() >= m:
        raise ValueError(f"{name}: an N:M index is >= m={m}")
    positions = positions.reshape(grouped_shape[:-1] + (n,))
    array = np.zeros(grouped_shape, kept.dtype)
    mask = np.zeros(grouped_shape, bool)
    np.put_along_axis(array, positions, kept.reshape(positions.shape), axis=-1)
    np.put_along_axis(mask, positions, True, axis=-1)
    if int(mask.sum()) != kept.size:
        raise ValueError(f"{name}: N:M indices repeat a position within a group")
    unmove = lambda x: np.moveaxis(x.reshape(moved), -1, axis)
    return unmove(array), unmove(mask)
