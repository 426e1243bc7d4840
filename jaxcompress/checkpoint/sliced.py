"""Quantize one large array slice by slice, with the same result as quantizing it whole.

A `QArray`'s scales are computed over the axes it shares; along a channel axis (one scale per
index) or along the group axis at group boundaries, slices are independent. `quantize_sliced`
cuts the array along such an axis (preferring the longest), quantizes fixed-size slices with
`jaxcompress.quantize` (the last one zero-padded, so every slice of a leaf has one shape and XLA
compiles once per width) and writes values and scales into preallocated outputs. With a
``rows(begin, end)`` reader for axis-0 slices the float array is never whole in memory: this is
how `compress_checkpoint` streams large leaves out of a safetensors file.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from jaxcompress.checkpoint import treemeta

__all__ = ["quantize_sliced", "split_axis", "is_float", "SLICE_ROWS"]

SLICE_ROWS = 256  # rows (channels / group rows) per slice


def split_axis(spec: Any, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(axis, step)``: an axis the scales do not reduce over (axis 0 if it is one, else the
    longest), and the slice granularity on it.

    >>> import jaxcompress as jc
    >>> split_axis(jc.QuantSpec(bits=4, channel_axes=(0,), group_size=128, group_axis=-1).resolve((8, 256)), (8, 256))
    (0, 1)
    """
    candidates = [(shape[axis], axis, 1) for axis in spec.channel_axes]
    if spec.group_axis is not None:
        candidates.append((shape[spec.group_axis], spec.group_axis, spec.group_size))
    candidates = [c for c in candidates if c[0] > c[2]]
    if not candidates:
        return None
    # axis 0 first: its slices are contiguous rows (and can be read from a file one by one)
    _, axis, step = max(candidates, key=lambda c: (c[1] == 0, c[0]))
    return axis, step


def is_float(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating dtype (bfloat16 included).

    >>> is_float(np.float16), is_float(np.int8)
    (True, False)
    """
    return np.issubdtype(np.dtype(dtype), np.floating) or np.dtype(dtype).name == "bfloat16"


def quantize_sliced(tokens: list, array: Any, spec: Any, chunk_bytes: int, *, shape: tuple | None = None, dtype: Any = None, rows: Callable | None = None) -> Any:
    """Quantize a large leaf in slices along a channel (or group) axis. Every scale is computed
    from elements of one slice only, so the result equals quantizing the whole leaf; the
    transient memory of the jitted quantizer is one slice instead of the leaf. With ``rows``
    (``read(begin, end)``, axis-0 slices from the file) the float leaf is never whole in memory;
    the outputs are written into preallocated arrays.

    >>> import jaxcompress as jc
    >>> w = np.random.default_rng(0).normal(size=(600, 64)).astype(np.float32)
    >>> spec = jc.QuantSpec(bits=8, channel_axes=(0,))
    >>> sliced = quantize_sliced([["key", "w"]], w, spec, chunk_bytes=1 << 20)
    >>> bool((np.asarray(sliced.values) == np.asarray(jc.quantize(w, spec).values)).all())
    True
    """
    import dataclasses

    import jax
    from jaxcompress.quant.arrays import quantize
    from jaxcompress.rules import path_to_keystr

    if array is not None:
        array = np.asarray(array)
        shape, dtype = tuple(array.shape), array.dtype
    if shape is None or (array is None and rows is None):
        raise TypeError("quantize_sliced: pass the array, or its shape, dtype and a rows(begin, end) reader")
    read: Callable = rows if rows is not None else (lambda begin, end: array[begin:end])
    name = path_to_keystr([jax.tree_util.DictKey(t[1]) for t in tokens])
    if not is_float(dtype):
        return array if array is not None else read(0, shape[0])
    resolved = spec.resolve(tuple(shape), name)
    split = split_axis(resolved, shape)
    if split is None or (array is None and split[0] != 0):
        return quantize(array if array is not None else read(0, shape[0]), spec, name=name)
    axis, step = split
    length = shape[axis]
    slice_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // length * step
    # A fixed number of rows per slice (padded at the end) gives leaves of one width one compiled
    # shape, so fewer XLA compilations (each keeps some memory); fewer rows if slices get large.
    per_chunk = max(1, min(SLICE_ROWS // step, chunk_bytes // max(slice_bytes, 1))) * step
    # A ragged group axis (a shorter last group) is not padded: zeros would enter the last
    # group's percentile. The last slice then compiles once more.
    pad_last = not (axis == resolved.group_axis and length % step)
    first: Any = None
    outputs: dict[str, np.ndarray] = {}
    full_size: dict[str, int] = {}
    for begin in range(0, length, per_chunk):
        if array is None:
            chunk = read(begin, begin + per_chunk)
        else:
            index = [slice(None)] * len(shape)
            index[axis] = slice(begin, begin + per_chunk)
            chunk = array[tuple(index)]
        if pad_last and chunk.shape[axis] < per_chunk:  # pad the last slice so every slice has one shape (one compile)
            pad = [(0, 0)] * len(shape)
            pad[axis] = (0, per_chunk - chunk.shape[axis])
            chunk = np.pad(chunk, pad)
        q = quantize(chunk, spec, name=name)
        del chunk
        if first is None:
            first = q
        for field, value in treemeta.qarray_array_fields(q).items():
            value = np.asarray(value)
            if value.ndim != len(shape):  # not laid out along the axes (e.g. a scalar): keep the first
                outputs.setdefault(field, value)
                continue
            if field not in outputs:
                # the first slice is a whole one unless it is the only one: per whole slice a
                # field has per_chunk entries (values, channel scales) or per_chunk // step
                # (group scales); a ragged group axis has ceil(length / step) groups in all
                full_size[field] = value.shape[axis]
                whole = q.shape[axis] == length  # the only slice, and not padded
                total = value.shape[axis] if whole else -(-length * value.shape[axis] // per_chunk)
                full_shape = list(value.shape)
                full_shape[axis] = total
                outputs[field] = np.empty(full_shape, value.dtype)
            total = outputs[field].shape[axis]
            offset = begin * full_size[field] // per_chunk
            valid = min(value.shape[axis], total - offset)
            target = [slice(None)] * len(shape)
            target[axis] = slice(offset, offset + valid)
            source = [slice(None)] * len(shape)
            source[axis] = slice(0, valid)
            outputs[field][tuple(target)] = value[tuple(source)]
        del q
    return dataclasses.replace(first, **outputs)
