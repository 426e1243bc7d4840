"""Ragged last groups (issue 19): ``group_size`` not dividing its axis gives ``ceil(n / g)``
groups, the last one shorter. Checked against a float64 NumPy reference that loops over the
groups (written here independently of the package's padded / blocked views)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.quant import groups

# each example compiles new shapes: a few examples keep the file within seconds on 2 cores
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_round_trip(x, *, bits, symmetric, group_axis, group_size, channel_axes=()):
    """float64: every group (its own slice of the group axis, every channel separately)
    quantized with its own absmax scale; returns (dequantized, per-element scale)."""
    x = np.asarray(x, np.float64)
    out, scales = np.empty_like(x), np.empty_like(x)
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if symmetric else -qmax - 1
    n = x.shape[group_axis]
    for start in range(0, n, group_size):
        index = [slice(None)] * x.ndim
        index[group_axis] = slice(start, min(start + group_size, n))
        block = x[tuple(index)]
        reduce = tuple(a for a in range(x.ndim) if a not in channel_axes)
        if symmetric:
            absmax = np.max(np.abs(block), axis=reduce, keepdims=True)
            scale = np.where(absmax > 0, absmax / qmax, 1.0)
            codes = np.clip(np.round(block / scale), qmin, qmax)
            deq = codes * scale
        else:
            lo = np.minimum(np.min(block, axis=reduce, keepdims=True), 0.0)
            hi = np.maximum(np.max(block, axis=reduce, keepdims=True), 0.0)
            scale = np.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0)
            zero = np.clip(np.round(qmin - lo / scale), qmin, qmax)
            deq = (np.clip(np.round(block / scale) + zero, qmin, qmax) - zero) * scale
        out[tuple(index)] = deq
        scales[tuple(index)] = np.broadcast_to(scale, block.shape)
    return out, scales


@st.composite
def ragged_cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    group_axis = draw(st.integers(0, ndim - 1))
    n = draw(st.integers(1, 40))
    shape = shape[:group_axis] + (n,) + shape[group_axis + 1 :]
    group_size = draw(st.integers(1, 48))
    channel = [a for a in range(ndim) if a != group_axis]
    channel_axes = tuple(a for a in channel if draw(st.booleans()))
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    symmetric = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return shape, group_axis, group_size, channel_axes, bits, symmetric, seed


@SETTINGS
@given(ragged_cases())
def test_round_trip_matches_the_per_group_reference(case):
    shape, group_axis, group_size, channel_axes, bits, symmetric, seed = case
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3
    q = jc.quantize(x, bits=bits, symmetric=symmetric, group_axis=group_axis, group_size=group_size, channel_axes=channel_axes)
    n = shape[group_axis]
    expected_scale_shape = tuple(
        math.ceil(n / group_size) if a == group_axis else d if a in channel_axes else 1 for a, d in enumerate(shape)
    )
    assert q.scale.shape == expected_scale_shape
    ref, ref_scale = reference_round_trip(
        x, bits=bits, symmetric=symmetric, group_axis=group_axis, group_size=group_size, channel_axes=channel_axes
    )
    got = np.asarray(jc.dequantize(q), np.float64)
    # float32 arithmetic against float64: a value exactly between two codes may round either way
    mismatch = np.abs(got - ref) > 1e-5 * (1 + np.abs(ref))
    assert np.all(np.abs(got - ref)[mismatch] <= ref_scale[mismatch] * 1.0001)
    assert mismatch.mean() <= 0.02
    # the error bound of every group: half a step (a full step where asymmetric codes clip)
    bound = ref_scale * (0.5 if symmetric else 1.0) * 1.0001 + 1e-6
    assert np.all(np.abs(got - x) <= bound)
    expanded = groups.expand_groups(np.asarray(q.scale), group_axis, group_size, n)
    np.testing.assert_allclose(np.broadcast_to(expanded, shape), ref_scale, rtol=1e-5)


@settings(SETTINGS, max_examples=8)
@given(ragged_cases(), st.sampled_from(["absmax", "percentile", "mse"]))
def test_every_group_is_quantized_on_its_own_elements(case, method):
    """Calibration of a ragged axis (absmax, percentile, MSE) equals quantizing every group as
    an array of its own: the padding of the short last group never enters a statistic."""
    shape, group_axis, group_size, channel_axes, bits, symmetric, seed = case
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    options = dict(bits=bits, symmetric=symmetric, channel_axes=channel_axes, calibration=method)
    q = jc.quantize(x, group_axis=group_axis, group_size=group_size, **options)
    n = shape[group_axis]
    for i, start in enumerate(range(0, n, group_size)):
        piece = np.take(x, np.arange(start, min(start + group_size, n)), axis=group_axis)
        alone = jc.quantize(piece, **options)
        np.testing.assert_allclose(np.take(np.asarray(q.scale), [i], axis=group_axis), np.asarray(alone.scale), rtol=1e-6)
        codes = np.take(np.asarray(q.values.astype(jnp.int8)), np.arange(start, min(start + group_size, n)), axis=group_axis)
        np.testing.assert_array_equal(codes, np.asarray(alone.values.astype(jnp.int8)))


def test_group_helpers():
    assert groups.group_lengths(576, 128) == (128, 128, 128, 128, 64)
    assert groups.num_groups(9, 128) == 1 and not groups.is_ragged(9, 128)
    x = np.arange(10.0).reshape(5, 2)
    split = groups.split_groups(x, 0, 2, "edge")
    assert split.shape == (3, 2, 2) and split[2, 1].tolist() == [8.0, 9.0]
    np.testing.assert_array_equal(groups.merge_groups(split, 0, 5), x)
    assert groups.group_index(5, 2).tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="3 entries, expected 2 groups"):
        groups.expand_groups(np.ones((3, 1)), 0, 4, 8)


def test_qarray_rejects_a_scale_that_contradicts_the_ragged_layout():
    with pytest.raises(jc.InvalidQArrayError, match=r"scale has shape \(2, 1\), expected \(3, 1\)"):
        jc.QArray(values=jnp.zeros((10, 1), jnp.int4), scale=jnp.ones((2, 1)), bits=4, group_axis=0, group_size=4)


def test_fake_quant_and_lsq_on_a_ragged_axis():
    x = jax.random.normal(jax.random.key(0), (10, 3))
    for options in (dict(bits=4, symmetric=True), dict(bits=3, symmetric=False, calibration="mse"), dict(qtype="nf4")):
        spec = dict(options, group_size=4, group_axis=0)
        np.testing.assert_allclose(jc.fake_quant_array(x, **spec), jc.dequantize(jc.quantize(x, **spec)), rtol=1e-6, atol=1e-7)
        grad = np.asarray(jax.grad(lambda w: jc.fake_quant_array(w, **spec).sum())(x))
        q = jc.quantize(x, **spec)
        scale = groups.expand_groups(np.asarray(q.scale, np.float64), 0, 4, 10)
        if q.zero_point is None:  # absmax: nothing is clipped, the straight-through gradient is 1
            np.testing.assert_array_equal(grad, np.ones_like(grad))
        else:  # mse clips: the gradient is 1 exactly where the value lies inside the code range
            zero = groups.expand_groups(np.asarray(q.zero_point.astype(jnp.int8), np.float64), 0, 4, 10)
            codes = np.asarray(x, np.float64) / scale + zero
            np.testing.assert_array_equal(grad, ((codes >= -4) & (codes <= 3)).astype(np.float32))
            assert grad.min() == 0.0  # the case does clip
    step = jc.init_lsq_step(x, bits=4, symmetric=True, group_size=4, group_axis=0)  # LSQ: symmetric only
    x64 = np.asarray(x, np.float64)
    expected = [2 * np.abs(x64[s : s + 4]).mean() / np.sqrt(7) for s in (0, 4, 8)]  # the last: 2 rows
    np.testing.assert_allclose(np.asarray(step)[:, 0], expected, rtol=1e-6)
    out = jc.lsq_fake_quant(x, step, bits=4, symmetric=True, group_size=4, group_axis=0)
    codes = np.clip(np.round(x64 / np.repeat(np.asarray(step, np.float64), 4, axis=0)[:10]), -7, 7)
    np.testing.assert_allclose(np.asarray(out), codes * np.repeat(np.asarray(step), 4, axis=0)[:10], rtol=1e-6)
    _, grad_step = jax.grad(lambda w, s: jc.lsq_fake_quant(w, s, bits=4, symmetric=True, group_size=4, group_axis=0).sum(), argnums=(0, 1))(x, step)
    assert grad_step.shape == (3, 1) and bool(jnp.all(jnp.isfinite(grad_step)))


def _dynamic_reference(x, q):
    """float64 reference of `compressed`'s dynamic int8 dot: per-row absmax int8 activation
    codes times the dequantized weight."""
    x = np.asarray(x, np.float64)
    x_scale = np.max(np.abs(x), axis=-1, keepdims=True) / 127
    x_codes = np.clip(np.round(x / x_scale), -127, 127)
    return (x_codes * x_scale) @ np.asarray(q.dequantize(), np.float64)


@pytest.mark.parametrize("options", [
    dict(bits=4, channel_axes=(-1,), group_size=64),
    dict(bits=4, channel_axes=(-1,), group_size=64, symmetric=False),
    dict(bits=8, channel_axes=(-1,), group_size=36),
])
def test_compressed_integer_dot_on_a_ragged_weight(options):
    w = jax.random.normal(jax.random.key(1), (100, 8))
    q = jc.quantize(w, activation="dynamic", **options)
    x = jax.random.normal(jax.random.key(2), (16, 100))
    f = jc.compressed(lambda w, a: a @ w)
    np.testing.assert_allclose(np.asarray(f(q, x)), _dynamic_reference(x, q), rtol=2e-5, atol=2e-4)
    assert "s8" in jax.jit(f).lower(q, x).compile().as_text()


def test_compressed_weight_only_and_conv_on_ragged_groups():
    w = jax.random.normal(jax.random.key(1), (100, 8))
    q = jc.quantize(w, bits=4, channel_axes=(-1,), group_size=64)
    x = jax.random.normal(jax.random.key(2), (4, 100))
    np.testing.assert_allclose(jc.compressed(lambda w, a: a @ w)(q, x), x @ q.dequantize(), rtol=1e-5, atol=1e-5)
    # conv with its 20 input channels in groups of 8 (8 + 8 + 4): the kernel flattens to
    # (in * window, out) with groups of 8 * 9 rows on the integer path
    k = jax.random.normal(jax.random.key(3), (3, 3, 20, 8))
    image = jax.random.normal(jax.random.key(4), (2, 6, 6, 20))
    conv = lambda k, a: jax.lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    qk = jc.quantize(k, bits=8, channel_axes=(-1,), group_size=8, activation="dynamic")
    out = np.asarray(jc.compressed(conv)(qk, image), np.float64)
    x64 = np.asarray(image, np.float64)
    x_scale = np.max(np.abs(x64), axis=(1, 2, 3), keepdims=True) / 127  # per-image dynamic scale
    ref = conv(np.asarray(qk.dequantize(), np.float64), np.clip(np.round(x64 / x_scale), -127, 127) * x_scale)
    np.testing.assert_allclose(out, np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_w4_g128_preset_fits_any_width():
    """The issue's case: a 576-wide decoder kernel and a 3x3x1x32 (depthwise-shaped) conv."""
    recipe = jc.load_recipe("w4-g128")
    params = {
        "decoder": {"kernel": jax.random.normal(jax.random.key(0), (576, 96)), "weight": jax.random.normal(jax.random.key(1), (96, 576))},
        "conv": {"kernel": jax.random.normal(jax.random.key(2), (3, 3, 1, 32))},
        "depthwise": {"kernel": jax.random.normal(jax.random.key(3), (9, 32))},
    }
    q, _ = jc.quantize_params(params, list(recipe.quantize), on_unused="ignore")  # no norms / embeddings here
    assert q["decoder"]["kernel"].scale.shape == (5, 96)
    assert q["decoder"]["weight"].scale.shape == (96, 5)
    assert q["conv"]["kernel"].scale.shape == (1, 1, 1, 32)
    assert q["depthwise"]["kernel"].scale.shape == (1, 32)  # the 9 taps: one short group
    for leaf, original in ((q["decoder"]["kernel"], params["decoder"]["kernel"]), (q["depthwise"]["kernel"], params["depthwise"]["kernel"])):
        ref, scale = reference_round_trip(original, bits=4, symmetric=True, group_axis=0, group_size=128, channel_axes=(1,))
        assert np.all(np.abs(np.asarray(leaf.dequantize(), np.float64) - np.asarray(original)) <= scale * 0.5001)


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_ragged_and_odd_length_int4_checkpoints_round_trip(tmp_path, fmt):
    params = {
        "odd": jax.random.normal(jax.random.key(0), (9, 7)),      # 63 int4 values: an odd count
        "ragged": jax.random.normal(jax.random.key(1), (100, 5)),
        "nf4": jax.random.normal(jax.random.key(2), (70, 3)),
    }
    rules = [
        jc.QuantRule(pattern="odd", bits=4, channel_axes=(-1,), group_size=4),
        jc.QuantRule(pattern="ragged", bits=3, symmetric=False, channel_axes=(-1,), group_size=64),
        jc.QuantRule(pattern="nf4", qtype="nf4", channel_axes=(-1,), group_size=64),
    ]
    q, _ = jc.quantize_params(params, rules)
    if fmt == "safetensors":
        path = os.path.join(tmp_path, "m.safetensors")
        jc.export_safetensors(path, q)
        loaded = jc.import_safetensors(path)[0]
    else:
        path = os.path.join(tmp_path, "ckpt")
        jc.save_checkpoint(path, q)
        loaded = jc.load_checkpoint(path)[0]
    for name in params:
        a, b = q[name], loaded[name]
        assert (b.qtype, b.bits, b.group_size, b.scale.shape) == (a.qtype, a.bits, a.group_size, a.scale.shape)
        np.testing.assert_array_equal(np.asarray(b.values.astype(jnp.int8)), np.asarray(a.values.astype(jnp.int8)))
        np.testing.assert_array_equal(np.asarray(b.dequantize()), np.asarray(a.dequantize()))
