"""A float64 NumPy reference of the quantization math, written independently of the package."""

from __future__ import annotations

import numpy as np


def grouped(x: np.ndarray, group_axis: int | None, group_size: int | None) -> np.ndarray:
    if group_axis is None:
        return x
    shape = x.shape
    return x.reshape(shape[:group_axis] + (shape[group_axis] // group_size, group_size) + shape[group_axis + 1 :])


def reduce_axes(ndim: int, channel_axes, group_axis) -> tuple[int, ...]:
    axes = []
    for axis in range(ndim):
        if axis in channel_axes:
            continue
        if group_axis is not None and axis == group_axis:
            axes.append(axis + 1)
        elif group_axis is not None and axis > group_axis:
            axes.append(axis + 1)
        else:
            axes.append(axis)
    return tuple(axes)


def reference_absmax(x, *, bits, symmetric, channel_axes, group_axis=None, group_size=None):
    """Returns (scale, zero_point or None) in the grouped keepdims layout, float64."""
    x = np.asarray(x, np.float64)
    g = grouped(x, group_axis, group_size)
    axes = reduce_axes(x.ndim, channel_axes, group_axis)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = np.max(np.abs(g), axis=axes, keepdims=True)
        scale = np.where(absmax > 0, absmax / qmax, 1.0)
        return scale, None
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = np.minimum(np.min(g, axis=axes, keepdims=True), 0.0)
    hi = np.maximum(np.max(g, axis=axes, keepdims=True), 0.0)
    scale = np.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0)
    zero_point = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def reference_codes(x, scale, zero_point, *, bits, symmetric, group_axis=None, group_size=None):
    """Integer codes in the original shape given a (grouped-layout) scale, float64."""
    x = np.asarray(x, np.float64)
    g = grouped(x, group_axis, group_size)
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if symmetric else -qmax - 1
    codes = np.round(g / scale)
    if zero_point is not None:
        codes = codes + zero_point
    return np.clip(codes, qmin, qmax).reshape(x.shape)


def to_grouped_scale(scale: np.ndarray, group_axis: int | None) -> np.ndarray:
    """The package stores the scale with the within-group axis squeezed; put it back."""
    scale = np.asarray(scale, np.float64)
    return scale if group_axis is None else np.expand_dims(scale, group_axis + 1)
