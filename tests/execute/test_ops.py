"""Array-level quantized dot_general / conv_general_dilated against float64 NumPy references of
the same integer arithmetic, and the integer ops in the compiled HLO."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.execute import UnsupportedQuantizedOp
from jaxcompress.execute import quantized_conv_general_dilated as _conv
from jaxcompress.execute import quantized_dot_general as _dot
from tests.execute.reference import activation_codes, conv_w8a8, count_s8_contractions, dense_w8a8, weight_parts

DENSE_DIMS = (((1,), (0,)), ((), ()))


# Everything runs under one jit per call (op-by-op dispatch would compile every small op).
def quantized_dot_general(lhs, rhs, dimension_numbers, **options):
    return jax.jit(functools.partial(_dot, dimension_numbers=dimension_numbers, **options))(lhs, rhs)


def quantized_conv_general_dilated(lhs, rhs, window_strides, padding, **options):
    fn = functools.partial(_conv, window_strides=window_strides, padding=padding, **options)
    return jax.jit(fn)(lhs, rhs)


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


@pytest.mark.parametrize(
    "spec",
    [
        dict(bits=8, channel_axes=(-1,)),
        dict(bits=8, channel_axes=(-1,), symmetric=False),
        dict(bits=4, channel_axes=(-1,), group_size=8),
        dict(bits=4, channel_axes=(-1,), group_size=8, symmetric=False),
        dict(bits=8),
    ],
    ids=["int8", "int8-asym", "int4-g8", "int4-g8-asym", "per-tensor"],
)
@pytest.mark.parametrize("rows", [1, 12])     # 1: the padded matrix-vector path
def test_dense_w8a8_matches_integer_reference(spec, rows):
    x = _normal(0, (rows, 32))
    q = jc.quantize(_normal(1, (32, 12)), **spec)
    out = quantized_dot_general(x, q, DENSE_DIMS, activation="dynamic")
    np.testing.assert_allclose(np.asarray(out, np.float64), dense_w8a8(x, q), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("rows", [1, 3, 12])
@pytest.mark.parametrize("symmetric", [True, False])
def test_out_in_layout_matches_reference_and_stays_integer(rows, symmetric):
    """An (out, in) kernel used as x @ w.T (torch layout): the matrix-vector case puts the
    weight on the left of an s8 dot; the result is the same integer arithmetic."""
    x = _normal(0, (rows, 32))
    q = jc.quantize(_normal(1, (12, 32)), channel_axes=(0,), symmetric=symmetric)
    dims = (((1,), (1,)), ((), ()))
    out = quantized_dot_general(x, q, dims, activation="dynamic")
    q_in_out = jc.QArray(**{**q.__dict__, "values": q.values.T, "scale": q.scale.T,
                            "zero_point": None if symmetric else q.zero_point.T, "channel_axes": (1,)})
    np.testing.assert_allclose(np.asarray(out), dense_w8a8(x, q_in_out), rtol=2e-5, atol=2e-5)
    hlo = jax.jit(lambda x, q: _dot(x, q, dims, activation="dynamic")).lower(x, q).compile().as_text()
    assert count_s8_contractions(hlo) == 1


@pytest.mark.parametrize("rows", [1, 12])
def test_transposed_weight_stays_int8(rows):
    """``x @ w.T`` through compressed: the transpose is folded into the dot (XLA would run an
    s8 dot of a transposed s8 operand as s32); same integer arithmetic, s8 x s8 in the HLO."""
    from jaxcompress.execute.transform import compressed

    x = _normal(0, (rows, 32))
    q = jc.quantize(_normal(1, (12, 32)), channel_axes=(0,), activation="dynamic")
    fn = compressed(lambda w, x: x @ w.T)
    out = jax.jit(fn)(q, x)
    q_in_out = jc.QArray(**{**q.__dict__, "values": q.values.T, "scale": q.scale.T, "channel_axes": (1,)})
    np.testing.assert_allclose(np.asarray(out), dense_w8a8(x, q_in_out), rtol=2e-5, atol=2e-5)
    assert count_s8_contractions(jax.jit(fn).lower(q, x).compile().as_text()) == 1


def test_folded_transpose_restores_free_axis_order():
    """A 3-D weight transposed so that its free axes come out of the dot in stored order."""
    from jaxcompress.execute.transform import compressed

    x = _normal(0, (10, 8))
    q = jc.quantize(_normal(1, (8, 3, 4)), channel_axes=(1, 2), activation="dynamic")
    dims = (((1,), (1,)), ((), ()))
    fn = compressed(lambda w, x: jax.lax.dot_general(x, jnp.transpose(w, (2, 0, 1)), dims))
    out = jax.jit(fn)(q, x)
    permuted = jc.QArray(**{**q.__dict__, "values": jnp.transpose(q.values, (2, 0, 1)),
                            "scale": jnp.transpose(q.scale, (2, 0, 1)), "channel_axes": (0, 2)})
    expected = quantized_dot_general(x, permuted, dims, activation="dynamic")
    assert out.shape == (10, 4, 3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)
    ref = jax.lax.dot_general(x, jnp.transpose(q.dequantize(), (2, 0, 1)), dims)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0.05, atol=0.05)


def test_static_activation_scale_saturates_like_reference():
    x = _normal(0, (5, 32), 3.0)
    q = jc.quantize(_normal(1, (32, 12)), channel_axes=(-1,))
    q = jc.QArray(**{**q.__dict__, "activation": "static", "activation_scale": jnp.float32(0.01)})
    out = quantized_dot_general(x, q, DENSE_DIMS)
    np.testing.assert_allclose(np.asarray(out), dense_w8a8(x, q, static_scale=0.01), rtol=2e-5, atol=2e-5)
    assert np.abs(np.asarray(x) / 0.01).max() > 127       # the test really exercises clipping


def test_weight_on_the_left_and_batch_dims():
    x = _normal(0, (3, 4, 16))                    # (batch, rows, k)
    w = _normal(1, (3, 16, 6))                    # (batch, k, out), per (batch, out) scales
    q = jc.quantize(w, channel_axes=(0, 2))
    dims_right = (((2,), (1,)), ((0,), (0,)))
    dims_left = (((1,), (2,)), ((0,), (0,)))
    right = quantized_dot_general(x, q, dims_right, activation="dynamic")
    left = quantized_dot_general(q, x, dims_left, activation="dynamic")
    np.testing.assert_allclose(np.asarray(left), np.asarray(right).transpose(0, 2, 1), rtol=1e-6)
    codes, x_scale = activation_codes(x, (2,))
    w_codes, w_scale, _ = weight_parts(q)
    expected = np.einsum("brk,bko->bro", codes, w_codes) * x_scale * w_scale
    np.testing.assert_allclose(np.asarray(right), expected, rtol=2e-5, atol=2e-5)


def test_weight_only_equals_dequantized_dot():
    x = _normal(0, (5, 32))
    for spec in (dict(channel_axes=(-1,)), dict(bits=4, group_size=8, channel_axes=(-1,), symmetric=False)):
        q = jc.quantize(_normal(1, (32, 12)), **spec)
        out = quantized_dot_general(x, q, DENSE_DIMS)
        np.testing.assert_allclose(np.asarray(out), np.asarray(x @ q.dequantize()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "strides, padding, dilation, groups, symmetric",
    [
        ((1, 1), ((1, 1), (1, 1)), (1, 1), 1, True),
        ((2, 2), ((0, 1), (1, 0)), (1, 1), 1, False),
        ((1, 2), ((2, 2), (2, 2)), (2, 2), 2, True),
    ],
)
def test_conv_w8a8_matches_integer_reference(strides, padding, dilation, groups, symmetric):
    x = _normal(0, (2, 7, 6, 4))
    w = _normal(1, (3, 3, 4 // groups, 6))
    q = jc.quantize(w, channel_axes=(-1,), symmetric=symmetric)
    out = quantized_conv_general_dilated(
        x, q, strides, padding, rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups, activation="dynamic",
    )
    expected = conv_w8a8(x, q, strides, padding, dilation, groups)
    assert out.shape == expected.shape
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_conv_with_few_output_positions_matches_integer_reference(batch):
    # 1 image x 2x2 output positions = 4 rows < MIN_ROWS: the padded few-rows dot, where the
    # activation has one scale per image that must be broadcast over that image's rows.
    x = _normal(3, (batch, 4, 4, 3)) * jnp.arange(1.0, batch + 1.0).reshape(batch, 1, 1, 1)
    q = jc.quantize(_normal(4, (3, 3, 3, 5)), channel_axes=(-1,))
    out = quantized_conv_general_dilated(
        x, q, (2, 2), ((1, 0), (1, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"), activation="dynamic",
    )
    expected = conv_w8a8(x, q, (2, 2), ((1, 0), (1, 0)), (1, 1), 1)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)


def test_symbolic_batch_exports():
    q = jc.quantize(_normal(5, (16, 8)), channel_axes=(-1,))
    f = jax.jit(lambda x: _dot(x, q, dimension_numbers=DENSE_DIMS, activation="dynamic"))
    (batch,) = jax.export.symbolic_shape("batch")
    exported = jax.export.export(f)(jax.ShapeDtypeStruct((batch, 16), jnp.float32))
    for rows in (1, 12):
        x = _normal(rows, (rows, 16))
        np.testing.assert_allclose(exported.call(x), f(x), rtol=1e-6, atol=1e-6)


def test_conv_other_layouts_and_string_padding():
    x = _normal(0, (2, 4, 7, 6))                     # NCHW
    w = _normal(1, (5, 4, 3, 3))                     # OIHW
    q = jc.quantize(w, channel_axes=(0,))
    dn = ("NCHW", "OIHW", "NCHW")
    out = quantized_conv_general_dilated(x, q, (1, 1), "SAME", dimension_numbers=dn, activation="dynamic")
    expected = conv_w8a8(
        np.asarray(x).transpose(0, 2, 3, 1),
        jc.quantize(w.transpose(2, 3, 1, 0), channel_axes=(-1,)),
        (1, 1), ((1, 1), (1, 1)),
    ).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)
    weight_only = quantized_conv_general_dilated(x, q, (1, 1), "SAME", dimension_numbers=dn)
    ref = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn))(x, q.dequantize())
    np.testing.assert_allclose(np.asarray(weight_only), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_hlo_has_s8_dot_and_conv_contractions():
    x = _normal(0, (8, 64))
    q = jc.quantize(_normal(1, (64, 32)), bits=4, channel_axes=(-1,))   # int4 storage
    dot = jax.jit(lambda x, q: _dot(x, q, DENSE_DIMS, activation="dynamic"))
    assert count_s8_contractions(dot.lower(x, q).compile().as_text()) == 1
    xc = _normal(0, (2, 8, 8, 3))
    qc = jc.quantize(_normal(1, (3, 3, 3, 8)), channel_axes=(-1,))
    conv = jax.jit(
        lambda x, q: _conv(
            x, q, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), activation="dynamic"
        )
    )
    assert count_s8_contractions(conv.lower(xc, qc).compile().as_text()) == 1
    weight_only = jax.jit(lambda x, q: _dot(x, q, DENSE_DIMS))
    assert count_s8_contractions(weight_only.lower(x, q).compile().as_text()) == 0


def test_unsupported_layouts_raise_naming_the_primitive():
    q = jc.quantize(_normal(1, (3, 3, 4, 6)), channel_axes=(0, 3))      # scale varies over the window
    with pytest.raises(UnsupportedQuantizedOp, match="conv_general_dilated"):
        quantized_conv_general_dilated(
            _normal(0, (1, 5, 5, 4)), q, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            activation="dynamic",
        )
    q = jc.quantize(_normal(1, (4, 8, 6)), channel_axes=(0, 2), group_size=4, group_axis=1)
    with pytest.raises(UnsupportedQuantizedOp, match="dot_general"):
        quantized_dot_general(_normal(0, (2, 4, 8)), q, (((1, 2), (0, 1)), ((), ())), activation="dynamic")
    fp8 = jc.quantize(_normal(1, (8, 4)), qtype="float8_e4m3fn")
    with pytest.raises(UnsupportedQuantizedOp, match="dot_general"):
        quantized_dot_general(_normal(0, (2, 8)), fp8, DENSE_DIMS, activation="dynamic")
    with pytest.raises(TypeError, match="exactly one QArray"):
        _dot(_normal(0, (2, 8)), _normal(1, (8, 4)), DENSE_DIMS)
