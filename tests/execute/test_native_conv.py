"""The native integer convolution (an s8 x s8 -> s32 ``convolution`` XLA runs as one) against the
float64 NumPy reference of the same integer arithmetic, and which convs take it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxcompress as jc
from jaxcompress.execute import quantized_conv_general_dilated as _conv
from jaxcompress.execute.native_conv import runs_natively
from jaxcompress.execute.weight_view import WeightView
from tests.execute.reference import activation_codes, conv_nhwc, conv_w8a8, count_s8_contractions, weight_parts

NHWC = ("NHWC", "HWIO", "NHWC")


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _run(x, q, strides, padding, **options):
    fn = jax.jit(functools.partial(_conv, window_strides=strides, padding=padding, activation=options.pop("activation", "dynamic"), **options))
    return np.asarray(fn(x, q), np.float64), fn.lower(x, q).compile().as_text()


@pytest.mark.parametrize(
    "strides, padding, dilation, groups, symmetric",
    [
        ((1, 1), ((1, 1), (1, 1)), (1, 1), 1, True),
        ((2, 2), ((0, 1), (1, 0)), (1, 1), 1, False),
        ((1, 2), ((2, 2), (2, 2)), (2, 2), 1, True),
        ((1, 1), ((1, 1), (1, 1)), (1, 1), 4, False),     # grouped, asymmetric: per-group zero-point sums
        ((2, 1), ((0, 0), (0, 0)), (1, 1), 2, True),
    ],
)
def test_native_conv_matches_integer_reference(strides, padding, dilation, groups, symmetric):
    x = _normal(0, (2, 9, 8, 20))
    q = jc.quantize(_normal(1, (3, 3, 20 // groups, 24)), channel_axes=(-1,), symmetric=symmetric)
    assert runs_natively(x.shape, WeightView.from_qarray(q), _params(strides, padding, dilation, groups))
    out, hlo = _run(x, q, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC, feature_group_count=groups)
    np.testing.assert_allclose(out, conv_w8a8(x, q, strides, padding, dilation, groups), rtol=2e-5, atol=2e-5)
    assert count_s8_contractions(hlo, "convolution") == 1 and count_s8_contractions(hlo, "dot") == 0


def _params(strides, padding, dilation=(1, 1), groups=1, lhs_dilation=(1, 1), dn=NHWC, shapes=((1, 1, 1, 1), (1, 1, 1, 1))):
    numbers = jax.lax.conv_dimension_numbers(shapes[0], shapes[1], dn)
    return dict(window_strides=strides, padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=dilation,
                dimension_numbers=numbers, feature_group_count=groups, batch_group_count=1)


def test_static_scale_1d_and_channels_first_layouts():
    # static activation scale (saturating), NHWC
    x = _normal(2, (3, 6, 6, 24)) * 2
    q = jc.quantize(_normal(3, (3, 3, 24, 32)), channel_axes=(-1,))
    q = jc.QArray(**{**q.__dict__, "activation_scale": jnp.float32(0.01)})
    out, hlo = _run(x, q, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, activation="static")
    codes, x_scale = activation_codes(x, static_scale=0.01)
    w, w_scale, _ = weight_parts(q)
    expected = conv_nhwc(codes, w, (1, 1), ((1, 1), (1, 1))) * x_scale * w_scale.reshape(-1)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
    assert count_s8_contractions(hlo, "convolution") == 1
    # a 1-D conv (NWC / WIO) runs as a 2-D conv of unit height
    x1, w1 = _normal(4, (2, 11, 20)), _normal(5, (3, 20, 18))
    q1 = jc.quantize(w1, channel_axes=(-1,), symmetric=False)
    out, hlo = _run(x1, q1, (2,), ((1, 2),), rhs_dilation=(2,), dimension_numbers=("NWC", "WIO", "NWC"))
    expected = conv_w8a8(np.asarray(x1)[:, None], jc.quantize(w1[None], channel_axes=(-1,), symmetric=False), (1, 2), ((0, 0), (1, 2)), (1, 2))
    np.testing.assert_allclose(out, expected[:, 0], rtol=2e-5, atol=2e-5)
    assert count_s8_contractions(hlo, "convolution") == 1
    # NCHW / OIHW: XLA would fold transposes to channels-last back into the conv: im2col s8 dot
    xc, wc = _normal(6, (2, 20, 7, 6)), _normal(7, (24, 20, 3, 3))
    qc = jc.quantize(wc, channel_axes=(0,))
    out, hlo = _run(xc, qc, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    expected = conv_w8a8(np.asarray(xc).transpose(0, 2, 3, 1), jc.quantize(wc.transpose(2, 3, 1, 0), channel_axes=(-1,)),
                         (1, 1), ((1, 1), (1, 1))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
    assert count_s8_contractions(hlo, "convolution") == 0 and count_s8_contractions(hlo, "dot") == 1


@pytest.mark.parametrize(
    "case",
    ["few_features", "window_larger_than_input", "lhs_dilation", "grouped_input_scale", "three_d"],
)
def test_convs_xla_would_upcast_take_the_im2col_dot(case):
    """Where XLA would run an s8 convolution as s32 (slower than float32), the conv stays an im2col
    s8 dot, with the same integer arithmetic."""
    x, w, spec, options, strides, padding = _normal(0, (2, 9, 8, 20)), _normal(1, (3, 3, 20, 24)), {}, {}, (1, 1), ((1, 1), (1, 1))
    if case == "few_features":
        x, w = x[..., :8], w[:, :, :8, :12]
    elif case == "window_larger_than_input":
        x = x[:, :2, :2]
    elif case == "lhs_dilation":
        options = dict(lhs_dilation=(2, 1))
    elif case == "grouped_input_scale":
        spec = dict(group_size=10, group_axis=2)
    q = jc.quantize(w, channel_axes=(-1,), **spec)
    if case == "three_d":
        x3, q3 = _normal(0, (1, 4, 5, 5, 20)), jc.quantize(_normal(1, (2, 3, 3, 20, 24)), channel_axes=(-1,))
        out, hlo = _run(x3, q3, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        dequantized = jax.lax.conv_general_dilated(x3, q3.dequantize(), (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        np.testing.assert_allclose(out, np.asarray(dequantized), rtol=0.05, atol=0.05 * float(jnp.abs(dequantized).max()))
    else:
        params = _params(strides, padding, lhs_dilation=options.get("lhs_dilation", (1, 1)))
        assert not runs_natively(x.shape, WeightView.from_qarray(q), params)
        out, hlo = _run(x, q, strides, padding, dimension_numbers=NHWC, **options)
        if case in ("lhs_dilation", "grouped_input_scale"):
            dequantized = jax.lax.conv_general_dilated(x, q.dequantize(), strides, padding, dimension_numbers=NHWC, **options)
            np.testing.assert_allclose(out, np.asarray(dequantized), rtol=0.05, atol=0.05 * float(jnp.abs(dequantized).max()))
        else:
            np.testing.assert_allclose(out, conv_w8a8(x, q, strides, padding), rtol=2e-5, atol=2e-5)
    assert count_s8_contractions(hlo, "dot") >= 1 and count_s8_contractions(hlo, "convolution") == 0


@settings(max_examples=8, deadline=None)
@given(
    size=st.integers(3, 9), window=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2),
    low=st.integers(0, 2), high=st.integers(0, 2), groups=st.sampled_from([1, 2]), symmetric=st.booleans(),
)
def test_native_conv_is_the_integer_arithmetic(size, window, stride, dilation, low, high, groups, symmetric):
    """Any conv the native path accepts gives the integer reference's result."""
    x = _normal(size, (2, size, size + 1, 18))
    q = jc.quantize(_normal(window, (window, window, 18 // groups, 20)), channel_axes=(-1,), symmetric=symmetric)
    padding = ((low, high), (high, low))
    if (size + low + high - (window - 1) * dilation - 1) < 0:
        return  # no output position
    params = _params((stride, stride), padding, (dilation, dilation), groups)
    out, hlo = _run(x, q, (stride, stride), padding, rhs_dilation=(dilation, dilation), dimension_numbers=NHWC, feature_group_count=groups)
    expected = conv_w8a8(x, q, (stride, stride), padding, (dilation, dilation), groups)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
    native = runs_natively(x.shape, WeightView.from_qarray(q), params)
    assert count_s8_contractions(hlo, "convolution") == int(native)


@pytest.mark.parametrize("symmetric", [True, False])
def test_native_conv_is_the_im2col_conv_bit_for_bit(symmetric):
    """The same kernel stored (O, I, H, W) (a pending transpose: the im2col dot) and logical HWIO
    (the native conv) give identical outputs: one integer arithmetic, two programs."""
    import dataclasses

    from jaxcompress.execute.conv import conv_with_weight

    x = _normal(0, (2, 9, 9, 20))
    q = jc.quantize(_normal(1, (3, 3, 20, 24)), channel_axes=(-1,), activation="dynamic", symmetric=symmetric)
    stored = q.with_layout((3, 2, 0, 1))
    params = _params((2, 1), ((1, 1), (0, 1)), shapes=(x.shape, q.shape))
    logical_view, stored_view = WeightView.from_qarray(q), WeightView.from_qarray(stored)
    assert runs_natively(x.shape, logical_view, params) and not runs_natively(x.shape, stored_view, params)

    def run(view):
        fn = jax.jit(lambda x, values: conv_with_weight(x, dataclasses.replace(view, values=values), params, out_dtype=jnp.float32))
        return np.asarray(fn(x, view.values)), fn.lower(x, view.values).compile().as_text()

    (native, native_hlo), (im2col, im2col_hlo) = run(logical_view), run(stored_view)
    np.testing.assert_array_equal(native, im2col)
    assert count_s8_contractions(native_hlo, "convolution") == 1 and count_s8_contractions(im2col_hlo, "dot") >= 1
