"""Depthwise convolutions as a sum over the kernel window (integer and float).

A depthwise convolution (``feature_group_count`` equal to the input channels, one input channel
per group) is ``out[n, p, c * m + j] = sum_t x[n, p * stride + t * dilation, c] * k[t, c, j]``:
per output element only ``prod(window)`` multiply-adds along the channel axis, no contraction to
speak of. XLA's CPU backend runs it poorly both ways: as a float ``convolution`` it takes about
ten times the time of the same multiply-adds written out, and the im2col formulation of
`jaxcompress.execute.conv` turns it into a batched dot with one contracted row per group, which
XLA runs as an s32 (not s8) dot. Written as ``prod(window)`` strided slices of the (padded,
lhs-dilated) input, each multiplied by one kernel tap and accumulated, XLA fuses it into one
vectorized loop over the channels:

* `integer_depthwise`: int8 activation codes (one dynamic scale per example, or the static
  scale) times the int8 kernel codes (minus the zero point), accumulated in int32, the scales on
  the output: the same arithmetic, bit for bit, as the im2col integer conv;
* `float_depthwise`: the same loop in float with the dequantized kernel (weight-only).

``benchmarks/cnn_speed.py`` measures both against XLA's float convolution.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.execute.activation import quantize_activation
from jaxcompress.execute.native_conv import to_out_spec
from jaxcompress.execute.weight_view import WeightView

__all__ = ["is_depthwise", "integer_depthwise", "float_depthwise", "window_taps"]


def is_depthwise(view_shape, params: dict) -> bool:
    """Whether a ``conv_general_dilated`` with these params and kernel shape is depthwise (one
    input channel per feature group, more than one group, no batch groups)."""
    _, rhs_spec, _ = params["dimension_numbers"]
    groups = int(params.get("feature_group_count", 1))
    return groups > 1 and int(params.get("batch_group_count", 1)) == 1 and view_shape[rhs_spec[1]] == 1


def window_taps(x_nhwc, kernel_sizes, window_strides, padding, lhs_dilation, rhs_dilation, zero):
    """The strided input slices ``(N, *out_spatial, C)`` of an NHWC-ordered activation, one per
    kernel window offset (in ``itertools.product`` order), padded with ``zero``; also the im2col
    patches of the integer conv (`jaxcompress.execute.conv`)."""
    config = [(0, 0, 0)]
    for (low, high), dilation in zip(padding, lhs_dilation):
        config.append((int(low), int(high), int(dilation) - 1))
    config.append((0, 0, 0))
    x = jax.lax.pad(x_nhwc, jnp.asarray(zero, x_nhwc.dtype), config)
    padded = x.shape[1:-1]
    out_sizes = [
        (size - (k - 1) * d - 1) // s + 1 for size, k, d, s in zip(padded, kernel_sizes, rhs_dilation, window_strides)
    ]
    for offset in itertools.product(*(range(k) for k in kernel_sizes)):
        start = (0,) + tuple(o * d for o, d in zip(offset, rhs_dilation)) + (0,)
        limit = (
            (x.shape[0],)
            + tuple(st + (n - 1) * s + 1 for st, n, s in zip(start[1:-1], out_sizes, window_strides))
            + (x.shape[-1],)
        )
        yield offset, jax.lax.slice(x, start, limit, (1,) + tuple(window_strides) + (1,))


def _channels_last(x, lhs_spec):
    return jnp.transpose(x, (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))


def _kernel_taps(kernel, rhs_spec, groups):
    """A kernel in ``rhs_spec`` layout -> ``(*window, groups, multiplier)``."""
    out_axis, in_axis, window_axes = rhs_spec[0], rhs_spec[1], tuple(rhs_spec[2:])
    kernel = jnp.transpose(kernel, window_axes + (in_axis, out_axis))
    window = kernel.shape[: len(window_axes)]
    return kernel.reshape(window + (groups, kernel.shape[-1] // groups))


def _accumulate(x_nhwc, taps, params, accumulator_dtype):
    kernel_sizes = taps.shape[:-2]
    total = None
    for offset, piece in window_taps(
        x_nhwc, kernel_sizes, params["window_strides"], params["padding"], params["lhs_dilation"], params["rhs_dilation"], 0
    ):
        term = piece.astype(accumulator_dtype)[..., None] * taps[offset].astype(accumulator_dtype)
        total = term if total is None else total + term
    return total.reshape(total.shape[:-2] + (-1,))


def integer_depthwise(x, view: WeightView, params: dict, out_dtype: Any, mode: str) -> jax.Array | None:
    """The integer depthwise conv (see the module docs), or ``None`` when the kernel's scale varies
    over the window (the caller then takes another path)."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    out_axis, window_axes = rhs_spec[0], tuple(rhs_spec[2:])
    if any(view.scale_shape[a] != 1 for a in window_axes):
        return None
    groups = int(params["feature_group_count"])
    reduce_axes = tuple(a for a in range(x.ndim) if a != lhs_spec[0])
    codes, x_scale = quantize_activation(x, reduce_axes, mode, view.activation_scale)
    view = view.materialize()
    kernel = view.values.astype(jnp.int32)
    scale, zero_point = view.full_scale([out_axis])
    if zero_point is not None:
        kernel = kernel - zero_point.astype(jnp.int32)
    taps = _kernel_taps(kernel, rhs_spec, groups)
    accumulator = _accumulate(_channels_last(codes, lhs_spec), taps, params, jnp.int32)
    out = accumulator.astype(jnp.float32) * scale.reshape(-1).astype(jnp.float32)
    if x_scale.ndim:
        out = out * x_scale.reshape((x_scale.shape[lhs_spec[0]],) + (1,) * (out.ndim - 1))
    else:
        out = out * x_scale
    return to_out_spec(out, out_spec).astype(out_dtype)


def float_depthwise(x, kernel: jax.Array, params: dict, out_dtype: Any) -> jax.Array:
    """``conv_general_dilated(x, kernel)`` for a depthwise ``kernel`` (a float array in the
    conv's ``rhs_spec`` layout) as the window sum of the module docs.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    >>> k = jax.random.normal(jax.random.key(1), (3, 3, 1, 8))
    >>> dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    >>> params = dict(window_strides=(2, 1), padding=((1, 1), (0, 2)), lhs_dilation=(1, 1),
    ...               rhs_dilation=(1, 2), dimension_numbers=dn, feature_group_count=4)
    >>> ref = jax.lax.conv_general_dilated(x, k, (2, 1), ((1, 1), (0, 2)), rhs_dilation=(1, 2),
    ...                                    dimension_numbers=dn, feature_group_count=4)
    >>> bool(jnp.allclose(float_depthwise(x, k, params, jnp.float32), ref, atol=1e-5))
    True
    """
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    groups = int(params["feature_group_count"])
    compute = jnp.result_type(x.dtype, kernel.dtype)
    taps = _kernel_taps(kernel.astype(compute), rhs_spec, groups)
    out = _accumulate(_channels_last(x.astype(compute), lhs_spec), taps, params, compute)
    return to_out_spec(out, out_spec).astype(out_dtype)
