"""The integer convolution XLA runs natively: an s8 x s8 -> s32 ``convolution`` (internal).

XLA's CPU backend (jax >= 0.10, its YNNPACK fusions) runs a 2-D ``convolution`` of int8 operands
with an int32 result as an integer convolution when both operands are channels-last (activation
``NHWC``, kernel ``HWIO``, as flax lays them out), the input is not dilated and the conv is not
tiny (`runs_natively`): 3-7x float32's speed for the 3x3 convs of a CNN
(``benchmarks/cnn_speed.py``). Any other layout or rank it upcasts to an s32 convolution, several
times SLOWER than float32 (transposing the operands does not help: XLA folds the transposes into
the convolution's dimension numbers first), and there the im2col form of
`jaxcompress.execute.conv` (an s8 dot) is taken instead. A 1-D conv runs as a 2-D conv of unit
height; the codes are convolved with ``preferred_element_type=int32`` and the scales go on the
output::

    out = sx * s * (conv(qx, q) - z * conv(qx, ones))        # s: per output channel

The zero-point term (asymmetric kernels) is the window sum of the activation codes per feature
group (a channel sum, then an int32 ``reduce_window`` with the conv's window, strides, padding and
dilation).
The kernel scale must be constant over the input channels and the window (`runs_natively`): a
per-group input-channel scale needs each group's partial sums, which only the im2col dot has.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.execute.weight_view import WeightView

__all__ = ["runs_natively", "native_integer_conv", "to_out_spec"]

_NATIVE = ("NHWC", "HWIO", "NHWC")


def runs_natively(x_shape, view: WeightView, params: dict) -> bool:
    """Whether a quantized ``conv_general_dilated`` (activation shape in the conv's ``lhs_spec``
    layout, kernel view in its ``rhs_spec`` layout) runs as XLA's native integer convolution: 1-D
    or 2-D, channels-last operands (``NHWC`` / ``HWIO``, the kernel not transposed on the way),
    no input dilation or batch groups, more than 16 input or output features, a window and an
    output no larger than the input along each spatial axis (XLA's conditions for its YNNPACK
    convolution), and a kernel scale constant over the input channels and the window."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    spatial = len(rhs_spec) - 2
    if spatial not in (1, 2) or int(params.get("batch_group_count", 1)) != 1:
        return False
    if any(int(d) != 1 for d in params.get("lhs_dilation", ()) or ()):
        return False
    # XLA folds transposes next to a convolution into its dimension numbers, and then no longer
    # sees a channels-last convolution: only operands already in that layout qualify.
    channels_last = (0, spatial + 1) + tuple(range(1, spatial + 1))
    if tuple(lhs_spec) != channels_last or tuple(out_spec) != channels_last or tuple(rhs_spec) != (spatial + 1, spatial) + tuple(range(spatial)) or view.permutation is not None:
        return False
    kernel_shape, scale_shape = view.shape, view.scale_shape
    if not all(scale_shape[a] == 1 for a in tuple(rhs_spec[1:])):
        return False
    if max(x_shape[lhs_spec[1]], kernel_shape[rhs_spec[0]]) <= 16:
        return False
    for i in range(spatial):
        size, window = x_shape[lhs_spec[2 + i]], kernel_shape[rhs_spec[2 + i]]
        low, high = params["padding"][i]
        dilation, stride = int(params["rhs_dilation"][i]), int(params["window_strides"][i])
        out = (size + int(low) + int(high) - (window - 1) * dilation - 1) // stride + 1
        if window > size or out > size:
            return False
    return True


def to_out_spec(out: jax.Array, out_spec) -> jax.Array:
    """An ``(N, *spatial, C)`` result in the conv's output layout ``out_spec``."""
    permutation = [0] * out.ndim
    permutation[out_spec[0]] = 0
    permutation[out_spec[1]] = out.ndim - 1
    for i, axis in enumerate(out_spec[2:]):
        permutation[axis] = 1 + i
    return jnp.transpose(out, permutation)


def native_integer_conv(codes: jax.Array, x_scale: jax.Array, view: WeightView, params: dict, out_dtype: Any) -> jax.Array:
    """``conv_general_dilated(x, w)`` from int8 activation codes (``x ~= codes * x_scale``, one
    scale per example or a scalar) and an int8 kernel view, as XLA's native integer conv; only
    for the cases `runs_natively` accepts."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    out_axis, in_axis, window_axes = rhs_spec[0], rhs_spec[1], tuple(rhs_spec[2:])
    groups = int(params.get("feature_group_count", 1))
    x = jnp.transpose(codes, (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))
    kernel = view.transpose(window_axes + (in_axis, out_axis)).materialize()
    values = kernel.int8_values()
    strides = tuple(int(s) for s in params["window_strides"])
    padding = tuple((int(low), int(high)) for low, high in params["padding"])
    dilation = tuple(int(d) for d in params["rhs_dilation"])
    if len(window_axes) == 1:  # a 1-D conv as a 2-D conv of unit height
        x, values = x[:, None], values[None]
        strides, padding, dilation = (1,) + strides, ((0, 0),) + padding, (1,) + dilation

    def conv(kernel_codes):
        return jax.lax.conv_general_dilated(
            x, kernel_codes, strides, padding, rhs_dilation=dilation, dimension_numbers=_NATIVE,
            feature_group_count=groups, preferred_element_type=jnp.int32,
        )

    accumulator = conv(values)
    out_features = values.shape[-1]
    scale, zero_point = kernel.full_scale([kernel.ndim - 1])
    if zero_point is not None:
        # each group's window sum of the codes: (N, H, W, groups)
        per_group = jnp.sum(x.reshape(x.shape[:-1] + (groups, -1)), axis=-1, dtype=jnp.int32)
        sums = jax.lax.reduce_window(
            per_group, jnp.int32(0), jax.lax.add, (1,) + values.shape[:2] + (1,), (1,) + strides + (1,),
            ((0, 0),) + padding + ((0, 0),), window_dilation=(1,) + dilation + (1,),
        )
        sums = jnp.repeat(sums, out_features // groups, axis=-1) if groups > 1 else sums
        accumulator = accumulator - sums * zero_point.reshape(-1).astype(jnp.int32)
    out = accumulator.astype(jnp.float32) * scale.reshape(-1).astype(jnp.float32)
    if x_scale.ndim:
        out = out * x_scale.reshape((x.shape[0],) + (1,) * (out.ndim - 1))
    else:
        out = out * x_scale
    if len(window_axes) == 1:
        out = out[:, 0]
    return to_out_spec(out, out_spec).astype(out_dtype)
