"""`QArray.stored_permutation`: codes stored in another axis order keep the logical shape, scales,
`dequantize` and every pytree / transform behaviour; `quantize_params` picks the (out, in) layout
for integer-mode Flax Dense kernels by default."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.qarray import QArray, inverse_permutation, logical_shape

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layouts(draw):
    """A small array, a quantization spec for it and a permutation of its axes."""
    ndim = draw(st.integers(2, 4))
    shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
    channel_axes = tuple(a for a in range(ndim) if draw(st.booleans()))
    options = dict(bits=draw(st.sampled_from([4, 8])), symmetric=draw(st.booleans()), channel_axes=channel_axes)
    shared = [a for a in range(ndim) if a not in channel_axes]
    if shared and draw(st.booleans()):
        axis = draw(st.sampled_from(shared))
        size = draw(st.integers(1, 3))
        shape[axis] = size * draw(st.integers(1, 3))
        options.update(group_axis=axis, group_size=size)
    permutation = tuple(draw(st.permutations(range(ndim))))
    seed = draw(st.integers(0, 2**16))
    return tuple(shape), options, permutation, seed


@SETTINGS
@given(layouts())
def test_stored_layout_keeps_shape_scales_and_dequantize(case):
    shape, options, permutation, seed = case
    x = jax.random.normal(jax.random.key(seed), shape)
    q = jc.quantize(x, **options)
    stored = q.with_layout(permutation)
    identity = permutation == tuple(range(len(shape)))
    assert stored.stored_permutation == (None if identity else permutation)
    assert stored.shape == q.shape == shape and stored.scale.shape == q.scale.shape
    assert stored.values.shape == tuple(shape[a] for a in permutation)
    assert stored.nbytes == q.nbytes
    np.testing.assert_array_equal(np.asarray(stored.values), np.asarray(jnp.transpose(q.values, permutation)))
    np.testing.assert_array_equal(np.asarray(stored.logical_values), np.asarray(q.values))
    expected = np.asarray(q.dequantize())
    np.testing.assert_array_equal(np.asarray(stored.dequantize()), expected)
    np.testing.assert_array_equal(np.asarray(jc.dequantize(stored)), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(stored)), expected)
    # float64 reference from the stored codes themselves
    codes = np.transpose(np.asarray(stored.values.astype(jnp.int32)), inverse_permutation(permutation)).astype(np.float64)
    scale = np.asarray(q.scale, np.float64)
    zero = 0.0 if q.zero_point is None else np.asarray(q.zero_point.astype(jnp.int32), np.float64)
    if q.group_axis is not None:
        scale, zero = (np.repeat(a, q.group_size, axis=q.group_axis) if np.ndim(a) else a for a in (scale, zero))
    np.testing.assert_allclose(expected, (codes - zero) * scale, rtol=1e-6, atol=1e-7)
    # a pytree round trip keeps the layout; undoing it gives the logical QArray back
    leaves, treedef = jax.tree_util.tree_flatten(stored)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.stored_permutation == stored.stored_permutation and again.shape == shape
    back = stored.with_layout(None)
    assert back.stored_permutation is None
    np.testing.assert_array_equal(np.asarray(back.values), np.asarray(q.values))


def test_logical_shape_and_vmap_over_stored_qarrays():
    assert logical_shape((8, 4), (1, 0)) == (4, 8) and logical_shape((2, 4, 3, 5), (2, 0, 1)) == (2, 3, 5, 4)
    q = jc.quantize(jax.random.normal(jax.random.key(0), (6, 4)), channel_axes=(1,)).with_layout((1, 0))
    batched = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), q)  # a vmap-batched QArray
    assert batched.shape == (2, 6, 4) and batched.values.shape == (2, 4, 6)
    out = jax.vmap(lambda q: q.dequantize())(batched)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(q.dequantize()))


def test_stored_layout_is_checked():
    q = jc.quantize(jnp.ones((6, 4)), channel_axes=(1,))
    with pytest.raises(jc.InvalidQArrayError):
        QArray(values=q.values, scale=q.scale, channel_axes=(1,), stored_permutation=(0, 0))
    with pytest.raises(jc.InvalidQArrayError):  # stored (4, 6) values are read as logical (6, 4): scale (1, 4) fits
        QArray(values=q.values, scale=q.scale, channel_axes=(1,), stored_permutation=(1, 0))
    with pytest.raises(jc.InvalidQArrayError):
        q.with_layout((1, 0, 2))
    assert QArray(values=q.values, scale=q.scale, channel_axes=(1,), stored_permutation=(0, 1)).stored_permutation is None
    assert "stored (1, 0)" in repr(q.with_layout((1, 0)))


RULES = {
    "dynamic": [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")],
    "weight_only": [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,))],
}


def _params():
    return {
        "dense": {"kernel": jax.random.normal(jax.random.key(0), (16, 8)), "bias": jnp.zeros(8)},
        "conv": {"kernel": jax.random.normal(jax.random.key(1), (3, 3, 2, 4))},
        "embedding": jax.random.normal(jax.random.key(2), (10, 8)),
    }


def test_quantize_params_stores_integer_mode_dense_kernels_out_in():
    params = _params()
    rules = RULES["dynamic"] + [jc.QuantRule(pattern="embedding", channel_axes=(-1,), activation="dynamic")]
    qparams, _ = jc.quantize_params(params, rules)
    logical, _ = jc.quantize_params(params, rules, layout="logical")
    dense = qparams["dense"]["kernel"]
    assert dense.stored_permutation == (1, 0) and dense.values.shape == (8, 16) and dense.shape == (16, 8)
    assert qparams["conv"]["kernel"].stored_permutation is None  # conv kernels: logical by default
    assert qparams["embedding"].stored_permutation is None  # not a kernel
    for a, b in zip(jax.tree.leaves(jc.dequantize_params(qparams)), jax.tree.leaves(jc.dequantize_params(logical))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(q.stored_permutation is None for q in jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, QArray))
               if isinstance(q, QArray))
    weight_only, _ = jc.quantize_params(params, RULES["weight_only"])
    assert weight_only["dense"]["kernel"].stored_permutation is None
    with pytest.raises(ValueError):
        jc.quantize_params(params, rules, layout="transposed")


def test_quantize_params_layout_under_jit_and_qat_conversion():
    params = _params()
    jitted = jax.jit(lambda p: jc.quantize_params(p, RULES["dynamic"])[0])(params)
    assert jitted["dense"]["kernel"].stored_permutation == (1, 0)
    opt = jc.qat(optax.sgd(0.1), RULES["dynamic"])
    state = opt.init(params)
    converted, _ = jc.quantize_params(params, RULES["dynamic"], ranges=jc.qat_ranges(state))
    expected = jc.fake_quant(params, RULES["dynamic"], ranges=jc.qat_ranges(state))
    assert converted["dense"]["kernel"].stored_permutation == (1, 0)
    np.testing.assert_array_equal(np.asarray(converted["dense"]["kernel"].dequantize()), np.asarray(expected["dense"]["kernel"]))


def test_transforms_over_stored_qarrays():
    """tree_map-derived trees (zeros_like, float cotangents) and attach_activation_scales keep working."""
    q = jc.quantize_params(_params(), RULES["dynamic"])[0]["dense"]["kernel"]
    zeros = jax.tree_util.tree_map(jnp.zeros_like, q)
    assert zeros.stored_permutation == (1, 0) and zeros.shape == (16, 8)
    floats = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), q)  # an optimizer-moment-like tree
    assert floats.shape == (16, 8)
    static = dataclasses.replace(q, activation="static", activation_scale=jnp.float32(0.05))
    assert static.stored_permutation == (1, 0)
