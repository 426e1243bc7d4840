"""Quantized ``conv_general_dilated``: a float activation convolved with a quantized kernel.

Integer path: the activation is quantized to int8 (one dynamic scale per example, or the static
calibrated scale), unfolded into int8 patches (im2col: ``prod(kernel window)`` strided slices of
the padded, lhs-dilated input, a pure data movement) and contracted with the reshaped int8 kernel
by `jaxcompress.execute.dot.integer_dot` (int8 x int8 -> int32, scales and zero-point correction
on the output, grouped kernels as a batch dimension). XLA's CPU backend upcasts an s8
``convolution`` to s32 before running it; the patches formulation keeps the contraction an s8 dot,
which XLA runs on its integer matmul path. ``feature_group_count`` (grouped / depthwise convs)
becomes a batch dimension of that dot. Patches cost ``prod(kernel window)`` times the int8
input in memory (a quarter of a float32 im2col). Channels-last 1-D / 2-D convs that XLA's CPU
backend runs natively on s8 (`jaxcompress.execute.native_conv.runs_natively`) are emitted as that
native convolution instead, unless the site's path is ``"integer_im2col"``
(`jaxcompress.execute.policy`): on a CPU where XLA runs its native s8 convolution on one thread
(a 2-core AMD EPYC, Zen 4), the patches' s8 dot runs on all of them and can be the faster one.

Patch features are ordered ``(window position, input channel)`` (each tap's channels one
contiguous copy), or ``(input channel, window position)`` for grouped convs and for a per-group
kernel scale along the input-channel axis, whose groups must stay contiguous after flattening.

Smoothed kernels (`QArray.input_scale` along the kernel's input-feature axis, no feature groups):
the activation is divided by the input scale along its feature axis, then the conv runs on the
codes as above. Any other input-scale layout falls back to the float conv with the dequantized
kernel.

Depthwise convs (one input channel per feature group) run as a sum over the kernel window
instead, integer or float (`jaxcompress.execute.depthwise`): XLA runs the im2col form of a
depthwise conv as an s32 batched dot and its float depthwise ``convolution`` slowly.

Weight-only path: a float convolution with the dequantized kernel.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.execute.activation import quantize_activation
from jaxcompress.execute.dot import (
    UnsupportedQuantizedOp,
    _unsupported,
    check_integer_operands,
    integer_dot,
    smooth_activation,
)
from jaxcompress.execute.depthwise import float_depthwise, integer_depthwise, is_depthwise, window_taps
from jaxcompress.execute.native_conv import native_integer_conv, runs_natively, to_out_spec
from jaxcompress.execute.weight_view import WeightView
from jaxcompress.qarray import QArray

__all__ = ["quantized_conv_general_dilated", "conv_with_weight", "patches_kernel"]


def _patches(codes, lhs_spec, kernel_sizes, window_strides, padding, lhs_dilation, rhs_dilation, channels_minor=False):
    """int8 patches ``(N, *out_spatial, C, prod(kernel_sizes))`` of an activation in layout
    ``lhs_spec`` (batch axis, feature axis, spatial axes); ``channels_minor``: ``(N,
    *out_spatial, prod(kernel_sizes), C)`` instead (each tap's channels copied as one run)."""
    batch_axis, feature_axis, spatial_axes = lhs_spec[0], lhs_spec[1], tuple(lhs_spec[2:])
    x = jnp.transpose(codes, (batch_axis,) + spatial_axes + (feature_axis,))
    taps = window_taps(x, kernel_sizes, window_strides, padding, lhs_dilation, rhs_dilation, 0)
    slices = [tap for _, tap in taps]
    return jnp.stack(slices, axis=-2 if channels_minor else -1)


def patches_kernel(view: WeightView, params: dict) -> tuple[WeightView | None, bool]:
    """The kernel of the im2col dot, ``(in_features * window, out_features)`` (with feature
    groups ``(groups, in_features * window, out_features // groups)``), and whether the patch
    features are ordered (window, channel); the kernel is ``None`` where its scale layout does
    not flatten that way (e.g. ragged groups along the output axis)."""
    _, rhs_spec, _ = params["dimension_numbers"]
    out_axis, in_axis, kernel_axes = rhs_spec[0], rhs_spec[1], tuple(rhs_spec[2:])
    groups = int(params.get("feature_group_count", 1))
    window = math.prod(view.shape[a] for a in kernel_axes)
    in_features, out_features = view.shape[in_axis], view.shape[out_axis]
    # Patch features (window, C) where nothing needs the input channels contiguous: each tap's
    # channels are then one contiguous copy (the (C, window) interleave is a strided scatter,
    # ~1.9x slower to build on a 256x14x14x32 3x3 stride-2 conv); (C, window) for feature groups
    # and for a kernel scale that varies along the input channels (a group axis), whose groups
    # must stay contiguous after flattening.
    channels_minor = groups == 1 and view.scale_shape[in_axis] == 1
    order = kernel_axes + (in_axis,) if channels_minor else (in_axis,) + kernel_axes
    kernel = view.transpose(order + (out_axis,)).reshape((in_features * window, out_features))
    if kernel is not None and groups != 1:
        kernel = kernel.reshape((in_features * window, groups, out_features // groups))
        kernel = None if kernel is None else kernel.transpose((1, 0, 2))
    return kernel, channels_minor


def integer_conv(x, view: WeightView, params: dict, out_dtype, mode: str, im2col: bool = False) -> jax.Array:
    """The integer path (see the module docs); raises `UnsupportedQuantizedOp` when the kernel's
    scale layout or the conv's options do not allow it. ``im2col``: the s8 dot on int8 patches
    even where XLA's native s8 convolution could run (the ``"integer_im2col"`` path of
    `jaxcompress.execute.policy`; the same int32 sums, so the same result)."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    check_integer_operands("conv_general_dilated", x, view, mode)
    if params.get("batch_group_count", 1) != 1:
        raise _unsupported("conv_general_dilated", view, "batch_group_count > 1")
    out_axis, in_axis, kernel_axes = rhs_spec[0], rhs_spec[1], tuple(rhs_spec[2:])
    if any(view.scale_shape[a] != 1 for a in kernel_axes):
        raise _unsupported("conv_general_dilated", view, "the scale varies over the kernel window")
    groups = int(params.get("feature_group_count", 1))
    kernel_sizes = [view.shape[a] for a in kernel_axes]
    window = math.prod(kernel_sizes)
    in_features, out_features = view.shape[in_axis], view.shape[out_axis]

    reduce_axes = tuple(a for a in range(x.ndim) if a != lhs_spec[0])
    codes, scale = quantize_activation(x, reduce_axes, mode, view.activation_scale)
    if not im2col and runs_natively(x.shape, view, params):
        return native_integer_conv(codes, scale, view, params, out_dtype)
    kernel, channels_minor = patches_kernel(view, params)
    if kernel is None:
        raise _unsupported("conv_general_dilated", view, "the kernel scale does not flatten to (in * window, out) per feature group")
    patches = _patches(
        codes, lhs_spec, kernel_sizes, params["window_strides"], params["padding"],
        params["lhs_dilation"], params["rhs_dilation"], channels_minor,
    )
    spatial_rank = len(kernel_sizes)
    batch_shape = patches.shape[: 1 + spatial_rank]
    if scale.ndim:
        scale = scale.reshape((batch_shape[0],) + (1,) * (spatial_rank + (1 if groups == 1 else 2)))
    if groups == 1:
        patches = patches.reshape(batch_shape + (in_features * window,))
        dims: tuple = (((spatial_rank + 1,), (0,)), ((), ()))
        out = integer_dot(patches, scale, kernel, dims, out_dtype, "conv_general_dilated")
    else:
        patches = patches.reshape(batch_shape + (groups, in_features * window))
        dims = (((spatial_rank + 2,), (1,)), ((spatial_rank + 1,), (0,)))
        out = integer_dot(patches, scale, kernel, dims, out_dtype, "conv_general_dilated")
        out = jnp.moveaxis(out, 0, -2).reshape(batch_shape + (out_features,))
    return to_out_spec(out, out_spec)  # out is (N, *spatial, O)


def conv_with_weight(
    x: jax.Array,
    view: WeightView,
    params: dict,
    *,
    out_dtype: Any,
    mode: str | None = None,
    on_activation=None,
    on_unsupported: str = "error",
    im2col: bool = False,
) -> jax.Array:
    """``conv_general_dilated(x, w)`` with the primitive's own ``params`` (explicit padding,
    `ConvDimensionNumbers`) and a quantized kernel (internal; see
    `quantized_conv_general_dilated`; ``im2col``: see `integer_conv`)."""
    mode = view.activation if mode is None else mode
    if view.input_scale is not None:
        lhs_spec, rhs_spec, _ = params["dimension_numbers"]
        divisor = None
        if params.get("feature_group_count", 1) == 1 and params.get("batch_group_count", 1) == 1:
            divisor = view.activation_divisor(x.ndim, (rhs_spec[1],), (lhs_spec[1],))
        if divisor is None:
            if mode != "weight_only" and on_unsupported == "error":
                raise _unsupported(
                    "conv_general_dilated", view, "its input scale is not along the kernel's input features of an ungrouped conv"
                )
            mode = "weight_only"
        else:
            x = smooth_activation(x, divisor)
            view = view.without_input_scale()
    if on_activation is not None:
        on_activation(view, x, tuple(a for a in range(x.ndim) if a != params["dimension_numbers"][0][0]))
    depthwise = is_depthwise(view.shape, params)
    if mode != "weight_only":
        try:
            if depthwise:
                check_integer_operands("conv_general_dilated", x, view, mode)
                out = integer_depthwise(x, view, params, out_dtype, mode)
                if out is not None:
                    return out
            return integer_conv(x, view, params, out_dtype, mode, im2col).astype(out_dtype)
        except UnsupportedQuantizedOp:
            if on_unsupported == "error":
                raise
    compute_dtype = jnp.result_type(x.dtype, view.dtype)
    weight = view.dequantize(compute_dtype)
    if depthwise:
        return float_depthwise(x, weight, params, out_dtype)
    return jax.lax.conv_general_dilated(
        x.astype(compute_dtype),
        weight,
        window_strides=params["window_strides"],
        padding=params["padding"],
        lhs_dilation=params["lhs_dilation"],
        rhs_dilation=params["rhs_dilation"],
        dimension_numbers=params["dimension_numbers"],
        feature_group_count=params.get("feature_group_count", 1),
        batch_group_count=params.get("batch_group_count", 1),
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
    ).astype(out_dtype)


def quantized_conv_general_dilated(
    lhs,
    rhs: QArray,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    activation: str | None = None,
) -> jax.Array:
    """`jax.lax.conv_general_dilated` with a float input ``lhs`` and a `QArray` kernel ``rhs``.

    Arguments are those of `jax.lax.conv_general_dilated` (string or explicit padding, string or
    `ConvDimensionNumbers` layouts); ``activation`` (``"weight_only"`` / ``"dynamic"`` /
    ``"static"``) defaults to the kernel's own mode.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    >>> w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    >>> q = jc.quantize(w, channel_axes=(-1,))
    >>> dn = ("NHWC", "HWIO", "NHWC")
    >>> out = quantized_conv_general_dilated(x, q, (1, 1), "SAME", dimension_numbers=dn, activation="dynamic")
    >>> ref = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
    >>> out.shape, bool(jnp.abs(out - ref).max() < 0.1 * jnp.abs(ref).max())
    ((2, 8, 8, 4), True)
    """
    if not isinstance(rhs, QArray):
        raise TypeError(f"quantized_conv_general_dilated expects a QArray kernel, got {type(rhs).__name__}")
    lhs = jnp.asarray(lhs)
    spatial = lhs.ndim - 2
    dnums = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs_dilation = (1,) * spatial if lhs_dilation is None else tuple(lhs_dilation)
    rhs_dilation = (1,) * spatial if rhs_dilation is None else tuple(rhs_dilation)
    if isinstance(padding, str):
        in_shape = [lhs.shape[a] for a in dnums.lhs_spec[2:]]
        in_shape = [(n - 1) * d + 1 for n, d in zip(in_shape, lhs_dilation)]
        window = [(rhs.shape[a] - 1) * d + 1 for a, d in zip(dnums.rhs_spec[2:], rhs_dilation)]
        padding = jax.lax.padtype_to_pads(in_shape, window, window_strides, padding)
    params = dict(
        window_strides=tuple(window_strides),
        padding=tuple(tuple(p) for p in padding),
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dnums,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    return conv_with_weight(lhs, WeightView.from_qarray(rhs), params, out_dtype=out_dtype, mode=activation)
