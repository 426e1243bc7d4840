"""Depthwise convs as a window sum: the integer form is the im2col integer conv bit for bit and
the float64 reference of the integer arithmetic; the float form is the float conv; under
`compressed` no s32 (or s8) batched dot is left for a depthwise kernel."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.execute.transform import compressed
from jaxcompress.execute.conv import integer_conv
from jaxcompress.execute.depthwise import float_depthwise, integer_depthwise, is_depthwise
from jaxcompress.execute.weight_view import WeightView
from tests.execute.reference import conv_w8a8, integer_contractions


def _params(x_shape, k_shape, strides, padding, dilation, groups):
    dn = jax.lax.conv_dimension_numbers(x_shape, k_shape, ("NHWC", "HWIO", "NHWC"))
    return dict(
        window_strides=strides, padding=padding, lhs_dilation=(1, 1), rhs_dilation=dilation,
        dimension_numbers=dn, feature_group_count=groups, batch_group_count=1,
    )


@settings(max_examples=5, deadline=None)
@given(
    stride=st.sampled_from([(1, 1), (2, 1), (2, 2)]),
    dilation=st.sampled_from([(1, 1), (1, 2)]),
    padding=st.sampled_from([((1, 1), (1, 1)), ((0, 2), (1, 0))]),
    multiplier=st.sampled_from([1, 2]),
    symmetric=st.booleans(),
    seed=st.integers(0, 100),
)
def test_integer_depthwise_is_the_integer_conv_bit_for_bit(stride, dilation, padding, multiplier, symmetric, seed):
    channels = 3
    x = jax.random.normal(jax.random.key(seed), (2, 7, 6, channels))
    kernel = jax.random.normal(jax.random.key(seed + 1), (3, 3, 1, channels * multiplier))
    q = jc.quantize(kernel, channel_axes=(-1,), activation="dynamic", symmetric=symmetric)
    params = _params(x.shape, kernel.shape, stride, padding, dilation, channels)
    both = jax.jit(
        lambda x, q: (
            integer_depthwise(x, WeightView.from_qarray(q), params, jnp.float32, "dynamic"),
            integer_conv(x, WeightView.from_qarray(q), params, jnp.float32, "dynamic"),
        )
    )
    out, im2col = both(x, q)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(im2col))
    expected = conv_w8a8(x, q, stride, padding, dilation, groups=channels)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)


def test_float_depthwise_matches_the_float_conv():
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 8))
    params = _params(x.shape, kernel.shape, (2, 1), ((1, 1), (0, 2)), (1, 2), 4)
    ref = jax.lax.conv_general_dilated(
        x, kernel, (2, 1), ((1, 1), (0, 2)), rhs_dilation=(1, 2), dimension_numbers=params["dimension_numbers"],
        feature_group_count=4, precision="highest",
    )
    out = jax.jit(lambda x, k: float_depthwise(x, k, params, jnp.float32))(x, kernel)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_window_varying_scale_is_not_taken():
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 2))
    q = jc.quantize(jax.random.normal(jax.random.key(1), (3, 3, 1, 2)), channel_axes=(0, 3), activation="dynamic")
    params = _params(x.shape, q.shape, (1, 1), ((1, 1), (1, 1)), (1, 1), 2)
    view = jax.eval_shape(lambda q: q, q)  # shapes are all the check needs
    assert integer_depthwise(x, WeightView.from_qarray(view), params, jnp.float32, "dynamic") is None


def test_is_depthwise():
    params = _params((1, 5, 5, 4), (3, 3, 1, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), 4)
    assert is_depthwise((3, 3, 1, 4), params)
    assert not is_depthwise((3, 3, 2, 4), dict(params, feature_group_count=2))
    assert not is_depthwise((3, 3, 4, 4), dict(params, feature_group_count=1))


@pytest.mark.parametrize("activation", ["dynamic", "weight_only"])
def test_compressed_depthwise_has_no_batched_integer_dot(activation):
    model = nn.Conv(6, (3, 3), feature_group_count=6, use_bias=False)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 6))
    params = model.init(jax.random.key(1), x)
    qparams, _ = jc.quantize_params(params, [jc.QuantRule(pattern=".*kernel", channel_axes=(-1,), activation=activation)])
    apply = jax.jit(compressed(model.apply))
    hlo = apply.lower(qparams, x).compile().as_text()
    assert [c for c in integer_contractions(hlo) if c[1] in ("s32", "s8")] == []
    if activation == "dynamic":
        expected = conv_w8a8(x, qparams["params"]["kernel"], (1, 1), ((1, 1), (1, 1)), groups=6)
    else:
        expected = np.asarray(model.apply(jc.dequantize_params(qparams), x))
    np.testing.assert_allclose(np.asarray(apply(qparams, x)), expected, rtol=2e-5, atol=2e-5)
