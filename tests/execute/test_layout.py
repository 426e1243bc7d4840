"""Integer weight layout: codes stored with the contracted axes last give the same outputs, bit
for bit, and an s8 dot that contracts the weight's minor axis, with no transpose of the codes."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.execute.transform import compressed
from jaxcompress.execute.conv import conv_with_weight
from jaxcompress.execute.dot import dot_with_weight
from jaxcompress.execute.layout import default_contracting_axes, integer_layout, store_for_integer_dots
from jaxcompress.execute.weight_view import WeightView
from tests.execute.reference import dense_w8a8

DENSE = (((1,), (0,)), ((), ()))


def _stored(q, permutation):
    """A stand-in for a QArray storing its codes as ``transpose(codes, permutation)`` (the
    `stored_permutation` field, read by `WeightView.from_qarray`)."""
    fields = {f.name: getattr(q, f.name) for f in dataclasses.fields(q)}
    fields.update(values=jnp.transpose(q.values, permutation), stored_permutation=permutation)
    return types.SimpleNamespace(**fields)


def test_integer_layout_and_default_axes():
    assert integer_layout(2, (0,)) == (1, 0)
    assert integer_layout(4, (2, 0, 1)) == (3, 2, 0, 1)
    assert integer_layout(3, (0,)) == (1, 2, 0)
    assert integer_layout(2, (-1,)) is None
    with pytest.raises(ValueError):
        integer_layout(2, (0, 0))
    assert default_contracting_axes((4, 8)) == (0,)
    assert default_contracting_axes((3, 3, 4, 8)) is None  # HWIO: XLA's native integer conv wants it
    assert default_contracting_axes((2, 3, 3, 4, 8)) == (3, 0, 1, 2)
    assert default_contracting_axes((3, 4, 8)) is None


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_stored_dense_is_the_logical_dense_bit_for_bit(rows, symmetric):
    x = jax.random.normal(jax.random.key(0), (rows, 24))
    q = jc.quantize(jax.random.normal(jax.random.key(1), (24, 12)), channel_axes=(-1,), activation="dynamic", symmetric=symmetric)
    stored = _stored(q, (1, 0))
    view = WeightView.from_qarray(stored)
    assert view.shape == (24, 12) and view.values.shape == (12, 24) and view.permutation == (1, 0)
    np.testing.assert_array_equal(np.asarray(view.dequantize()), np.asarray(q.dequantize()))
    run = jax.jit(lambda x, values, scale, zero: dot_with_weight(
        x, dataclasses.replace(view, values=values, scale=scale, zero_point=zero), DENSE))
    out = run(x, view.values, view.scale, view.zero_point)
    logical = jax.jit(lambda x, q: dot_with_weight(x, WeightView.from_qarray(q), DENSE))(x, q)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(logical))
    np.testing.assert_allclose(np.asarray(out), dense_w8a8(x, q), rtol=2e-5, atol=2e-5)
    hlo = run.lower(x, view.values, view.scale, view.zero_point).compile().as_text()
    lines = hlo.splitlines()
    dots = [line for line in lines if " dot(" in line and "= s32[" in line]
    assert dots and all("lhs_contracting_dims={1}, rhs_contracting_dims={1}" in line for line in dots)
    assert not [line for line in lines if "transpose(" in line and "= s8[" in line]  # the codes never move


def test_stored_conv_kernel_is_the_logical_conv_bit_for_bit():
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
    q = jc.quantize(jax.random.normal(jax.random.key(1), (3, 3, 3, 5)), channel_axes=(-1,), activation="dynamic")
    order = integer_layout(4, (2, 0, 1))  # (O, I, H, W): the im2col dot's layout
    view = WeightView.from_qarray(_stored(q, order))
    kernel = view.transpose((2, 0, 1, 3)).reshape((27, 5))
    assert kernel.permutation == (1, 0) and kernel.values.shape == (5, 27)  # no codes moved
    dn = jax.lax.conv_dimension_numbers(x.shape, q.shape, ("NHWC", "HWIO", "NHWC"))
    params = dict(window_strides=(2, 1), padding=((1, 1), (0, 1)), lhs_dilation=(1, 1), rhs_dilation=(1, 1),
                  dimension_numbers=dn, feature_group_count=1, batch_group_count=1)
    out = jax.jit(lambda x, values: conv_with_weight(x, dataclasses.replace(view, values=values), params, out_dtype=jnp.float32))(x, view.values)
    logical = jax.jit(lambda x, q: conv_with_weight(x, WeightView.from_qarray(q), params, out_dtype=jnp.float32))(x, q)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(logical))


def test_stored_stacked_layers_unstack_without_moving_codes():
    from jaxcompress.execute.rules import unstack_view

    q = jc.quantize(jax.random.normal(jax.random.key(1), (3, 8, 4)), channel_axes=(0, 2), activation="dynamic")
    view = WeightView.from_qarray(_stored(q, (0, 2, 1)))
    arrays, rebuild = unstack_view(view)
    assert arrays[0].shape == (3, 4, 8)  # still stored (layers, out, in)
    layer = rebuild(tuple(None if a is None else a[1] for a in arrays))
    assert layer.shape == (8, 4) and layer.permutation == (1, 0)
    np.testing.assert_array_equal(np.asarray(layer.dequantize()), np.asarray(q.dequantize()[1]))


def test_store_for_integer_dots_keeps_values_and_speeds_the_layout():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    params = {
        "dense": jc.quantize(jax.random.normal(jax.random.key(1), (16, 8)), channel_axes=(-1,), activation="dynamic"),
        "weight_only": jc.quantize(jax.random.normal(jax.random.key(2), (16, 8)), channel_axes=(-1,)),
        "bias": jnp.ones(8),
    }
    stored = store_for_integer_dots(params)
    assert stored["dense"].values.shape == (8, 16) and stored["dense"].shape == (16, 8)
    assert stored["weight_only"] is params["weight_only"] and stored["bias"] is params["bias"]
    np.testing.assert_array_equal(np.asarray(stored["dense"].dequantize()), np.asarray(params["dense"].dequantize()))
    fn = jax.jit(compressed(lambda p, x: x @ p["dense"] + x @ p["weight_only"] + p["bias"]))
    np.testing.assert_array_equal(np.asarray(fn(stored, x)), np.asarray(fn(params, x)))
    assert store_for_integer_dots(stored)["dense"] is stored["dense"]


@pytest.mark.parametrize("rows", [1, 16])
def test_flax_dense_quantized_by_default_runs_the_out_in_integer_dot(rows):
    """A user's path: a linen Dense, `quantize_params` with W8A8 rules, `compressed(apply)`: the
    kernel's codes are stored (out, in), the s8 dot contracts their minor axis, nothing transposes
    the codes at run time, and the result is the float64 reference."""
    import flax.linen as nn

    model = nn.Dense(12)
    x = jax.random.normal(jax.random.key(0), (rows, 24))
    params = model.init(jax.random.key(1), x)
    rules = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]
    qparams, _ = jc.quantize_params(params, rules)
    q = qparams["params"]["kernel"]
    assert q.stored_permutation == (1, 0) and q.values.shape == (12, 24)
    run = jax.jit(compressed(model.apply))
    out = run(qparams, x)
    np.testing.assert_allclose(np.asarray(out), dense_w8a8(x, q, bias=params["params"]["bias"]), rtol=2e-5, atol=2e-5)
    logical, _ = jc.quantize_params(params, rules, layout="logical")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(run(logical, x)))
    lines = run.lower(qparams, x).compile().as_text().splitlines()
    dots = [line for line in lines if " dot(" in line and "= s32[" in line]
    assert dots and all("lhs_contracting_dims={1}, rhs_contracting_dims={1}" in line for line in dots)
    assert not [line for line in lines if "transpose(" in line and "= s8[" in line]
