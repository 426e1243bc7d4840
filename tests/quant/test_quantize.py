"""quantize / dequantize against a float64 NumPy reference, with hypothesis over layouts."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from tests.quant.reference import reference_absmax, reference_codes, to_grouped_scale

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layouts(draw):
    """A random array shape, channel axes, and (optionally) a group axis + size that divides it."""
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.sampled_from([1, 2, 3, 4, 6, 8])) for _ in range(ndim)]
    axes = list(range(ndim))
    channel_axes = tuple(sorted(draw(st.sets(st.sampled_from(axes), max_size=ndim))))
    group_axis = group_size = None
    free = [a for a in axes if a not in channel_axes]
    if free and draw(st.booleans()):
        group_axis = draw(st.sampled_from(free))
        group_size = draw(st.sampled_from([1, 2, 4]))
        shape[group_axis] = group_size * draw(st.integers(1, 3))
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return tuple(shape), channel_axes, group_axis, group_size, bits, symmetric, seed


def _sample(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(0.01, 10.0)
    if x.size > 1:  # an outlier now and then
        x.flat[rng.integers(x.size)] *= rng.choice([1.0, 20.0])
    return x.astype(np.float32)


@SETTINGS
@given(layouts())
def test_round_trip_matches_float64_reference(layout):
    shape, channel_axes, group_axis, group_size, bits, symmetric, seed = layout
    x = _sample(shape, seed)
    q = jc.quantize(
        x, bits=bits, symmetric=symmetric, channel_axes=channel_axes,
        group_axis=group_axis, group_size=group_size,
    )
    scale_ref, zp_ref = reference_absmax(
        x, bits=bits, symmetric=symmetric, channel_axes=channel_axes,
        group_axis=group_axis, group_size=group_size,
    )
    scale = to_grouped_scale(q.scale, group_axis)
    np.testing.assert_allclose(scale, scale_ref, rtol=2e-6)
    if symmetric:
        assert q.zero_point is None
    else:
        zp = to_grouped_scale(np.asarray(q.zero_point).astype(np.float64), group_axis)
        # The zero point is round(qmin - lo/scale): equal, or off by one on an exact .5 tie.
        assert np.max(np.abs(zp - zp_ref)) <= 1
        zp_ref = zp
    codes_ref = reference_codes(
        x, scale, zp_ref, bits=bits, symmetric=symmetric, group_axis=group_axis, group_size=group_size
    )
    codes = np.asarray(q.values.astype(jnp.int32))
    # Codes agree except possibly on round-half ties, where float32 and float64 may differ by one.
    diff = np.abs(codes - codes_ref)
    assert diff.max() <= 1
    assert np.mean(diff) <= 0.02
    # The round trip error is at most half a step everywhere (all values are inside the range).
    dq = np.asarray(jc.dequantize(q), np.float64)
    step = np.broadcast_to(
        to_grouped_scale(q.scale, group_axis), _grouped_shape(shape, group_axis, group_size)
    ).reshape(shape)
    assert np.all(np.abs(dq - x) <= step / 2 * (1 + 1e-5) + 1e-7)
    assert q.values.dtype == jc.qarray.storage_dtype(bits)
    assert q.dequantize().dtype == jnp.float32


def _grouped_shape(shape, group_axis, group_size):
    if group_axis is None:
        return shape
    return shape[:group_axis] + (shape[group_axis] // group_size, group_size) + shape[group_axis + 1 :]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_all_zero_tensor_is_valid_and_exact(bits, symmetric):
    q = jc.quantize(jnp.zeros((4, 6)), bits=bits, symmetric=symmetric, channel_axes=(1,))
    assert np.all(np.isfinite(q.scale)) and np.all(np.asarray(q.scale) > 0)
    np.testing.assert_array_equal(jc.dequantize(q), np.zeros((4, 6), np.float32))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("value", [3.5, -0.125, 1e-30])
def test_constant_tensor_is_valid(value, symmetric):
    x = jnp.full((3, 5), value, jnp.float32)
    q = jc.quantize(x, bits=8, symmetric=symmetric)
    assert np.all(np.isfinite(q.scale)) and np.all(np.asarray(q.scale) > 0)
    np.testing.assert_allclose(jc.dequantize(q), x, rtol=1e-6)


def test_zeros_dequantize_to_exact_zeros_in_mixed_tensor():
    x = jnp.array([[0.0, 1.3, -0.7, 0.0], [0.0, 0.0, 5.0, -2.2]])
    for symmetric in (True, False):
        for bits in (3, 8):
            dq = jc.dequantize(jc.quantize(x, bits=bits, symmetric=symmetric, channel_axes=(0,)))
            assert np.all(np.asarray(dq)[np.asarray(x) == 0] == 0.0)


@pytest.mark.parametrize("qtype,mantissa_bits,min_subnormal", [
    ("float8_e4m3fn", 3, 2.0**-9),
    ("float8_e5m2", 2, 2.0**-16),
])
def test_fp8_round_trip_relative_error(qtype, mantissa_bits, min_subnormal):
    x = _sample((16, 32), 7)
    q = jc.quantize(x, qtype=qtype, channel_axes=(-1,))
    assert q.values.dtype == jnp.dtype(getattr(jnp, qtype))
    assert q.bits == 8
    scale = np.asarray(q.scale, np.float64)
    # The channel absmax maps to the format's max exactly representable value.
    np.testing.assert_allclose(scale * float(ml_dtypes.finfo(getattr(jnp, qtype)).max),
                               np.max(np.abs(x), axis=0, keepdims=True), rtol=1e-6)
    err = np.abs(np.asarray(jc.dequantize(q), np.float64) - x)
    bound = np.abs(x) * 2.0 ** -(mantissa_bits + 1) + scale * min_subnormal
    assert np.all(err <= bound * (1 + 1e-6))


def test_fp8_asymmetric_is_rejected():
    with pytest.raises(ValueError, match="symmetric only"):
        jc.quantize(jnp.ones((2, 2)), qtype="float8_e4m3fn", symmetric=False)


def test_original_dtype_is_kept():
    x = jnp.linspace(-1, 1, 12, dtype=jnp.bfloat16).reshape(3, 4)
    q = jc.quantize(x, bits=8)
    assert q.dtype == jnp.bfloat16
    assert jc.dequantize(q).dtype == jnp.bfloat16
    assert jc.dequantize(q, jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.5, True])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits"):
        jc.quantize(jnp.ones((2, 2)), bits=bits)


def test_group_size_not_dividing_the_axis_gives_a_shorter_last_group():
    x = jnp.linspace(-1.0, 1.0, 400).reshape(100, 4)
    q = jc.quantize(x, bits=4, symmetric=True, group_size=32, group_axis=0, name="w")
    assert q.scale.shape == (4, 1)  # 32 + 32 + 32 + 4
    last = np.asarray(x[96:]).astype(np.float64)
    np.testing.assert_allclose(float(q.scale[3, 0]), np.abs(last).max() / 7, rtol=1e-6)


def test_group_axis_out_of_range_and_channel_axis_out_of_range():
    with pytest.raises(ValueError, match=r"k: group axis -2 is out of range"):
        jc.quantize(jnp.ones((8,)), bits=4, group_size=4, name="k")
    with pytest.raises(ValueError, match=r"k: channel axis 2 is out of range .* shape \(3, 4\)"):
        jc.quantize(jnp.ones((3, 4)), channel_axes=(2,), name="k")
    with pytest.raises(ValueError, match="also a channel axis"):
        jc.quantize(jnp.ones((4, 4)), channel_axes=(0,), group_axis=0, group_size=2)
    with pytest.raises(ValueError, match="repeat"):
        jc.quantize(jnp.ones((4, 4)), channel_axes=(1, -1))


def test_non_float_input_is_a_type_error():
    with pytest.raises(TypeError, match=r"ids: expected a floating-point array .* int32"):
        jc.quantize(jnp.arange(4), name="ids")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_is_an_error_by_default(bad):
    x = np.ones((4, 4), np.float32)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"params\['w'\]: contains NaN or Inf"):
        jc.quantize(x, bits=8, name="params['w']")


def test_nonfinite_under_jit_raises_at_run_time():
    f = jax.jit(lambda x: jc.quantize(x, bits=8, name="w").dequantize())
    f(jnp.ones(4)).block_until_ready()
    with pytest.raises(Exception, match="w: contains NaN or Inf"):
        f(jnp.array([1.0, jnp.nan, 2.0, 3.0])).block_until_ready()


def test_allow_nonfinite_saturates_inf_and_zeroes_nan():
    x = jnp.array([[1.0, -2.0, jnp.inf, jnp.nan, -jnp.inf, 0.5]])
    q = jc.quantize(x, bits=8, allow_nonfinite=True)
    np.testing.assert_allclose(np.asarray(q.scale).item(), 2.0 / 127, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.values)[0, 2:5], [127, 0, -127])
    dq = np.asarray(jc.dequantize(q))
    assert np.all(np.isfinite(dq))
    np.testing.assert_allclose(dq[0, [0, 1, 5]], [1.0, -2.0, 0.5], atol=1.0 / 127)


def test_works_under_jit_and_equals_eager():
    x = _sample((8, 16), 3)
    eager = jc.quantize(x, bits=4, channel_axes=(1,), group_size=4, calibration="mse")
    jitted = jax.jit(lambda a: jc.quantize(a, bits=4, channel_axes=(1,), group_size=4, calibration="mse"))(x)
    chex.assert_trees_all_equal(eager, jitted)


def test_works_under_vmap():
    xs = np.stack([_sample((6, 8), s) for s in range(3)])
    batched = jax.vmap(lambda a: jc.quantize(a, bits=8, channel_axes=(1,)))(xs)
    assert batched.values.shape == (3, 6, 8) and batched.scale.shape == (3, 1, 8)
    for i in range(3):
        single = jc.quantize(xs[i], bits=8, channel_axes=(1,))
        np.testing.assert_array_equal(batched.values[i], single.values)
        np.testing.assert_allclose(batched.scale[i], single.scale, rtol=1e-7)
    dq = jax.vmap(jc.dequantize)(batched)
    assert dq.shape == (3, 6, 8)


def test_quantize_accepts_a_spec_but_not_both():
    spec = jc.QuantSpec(bits=4, channel_axes=(-1,))
    q = jc.quantize(jnp.ones((4, 4)), spec)
    assert q.bits == 4 and q.channel_axes == (1,)
    with pytest.raises(TypeError, match="either a QuantSpec or keyword"):
        jc.quantize(jnp.ones((4, 4)), spec, bits=8)


@pytest.mark.parametrize("symmetric", [True, False])
def test_bfloat16_scales_round_up_and_keep_the_error_bound(symmetric):
    x = _sample((256, 16), 11)
    wide = jc.quantize(x, bits=4, channel_axes=(-1,), group_size=128, symmetric=symmetric)
    narrow = jc.quantize(x, bits=4, channel_axes=(-1,), group_size=128, symmetric=symmetric, scale_dtype="bfloat16")
    assert narrow.scale.dtype == jnp.bfloat16
    scale = np.asarray(narrow.scale, np.float64)
    if symmetric:  # rounded up, never down, and by less than two bfloat16 steps
        assert np.all(scale >= np.asarray(wide.scale)) and np.all(scale <= np.asarray(wide.scale) * (1 + 2**-6))
    zp_bytes = 0 if symmetric else 2 * 16 // 2
    assert narrow.nbytes == 256 * 16 // 2 + 2 * 16 * 2 + zp_bytes  # 2-byte scales
    step = np.repeat(scale, 128, axis=0)
    assert np.all(np.abs(np.asarray(jc.dequantize(narrow), np.float64) - x) <= step / 2 * (1 + 1e-5))
    with pytest.raises(ValueError, match="scale_dtype"):
        jc.QuantSpec(scale_dtype="float16")


# ---- the blocked view (sharded group axes, see jaxcompress.quant.codec) -----------------------


@st.composite
def blocked_layouts(draw):
    """A grouped layout and a block (a divisor of the group size) to encode / calibrate in."""
    ndim = draw(st.integers(1, 3))
    group_axis = draw(st.integers(0, ndim - 1))
    group_size = draw(st.sampled_from([2, 4, 6, 8, 12]))
    block = draw(st.sampled_from([d for d in range(1, group_size + 1) if group_size % d == 0]))
    shape = [draw(st.sampled_from([1, 2, 3])) for _ in range(ndim)]
    shape[group_axis] = group_size * draw(st.integers(1, 3))
    channel_axes = tuple(a for a in range(ndim) if a != group_axis and draw(st.booleans()))
    options = dict(
        bits=draw(st.integers(2, 8)), symmetric=draw(st.booleans()), channel_axes=channel_axes,
        group_size=group_size, group_axis=group_axis,
        calibration=draw(st.sampled_from(["absmax", "mse"])),
    )
    return tuple(shape), block, options, draw(st.integers(0, 2**31 - 1))


def _grouped_and_blocked(x, spec, block):
    """(lo, hi, codes, dequantized) with whole groups, then the same in the blocked view."""
    from jaxcompress.quant.calibrate import calibrate_array, calibrate_range
    from jaxcompress.quant.codec import decode_array, encode_array, scale_from_range

    lo, hi = calibrate_range(x.reshape(spec.grouped_shape(x.shape)), spec, spec.reduce_axes(x.ndim))
    scale, zero_point = scale_from_range(lo, hi, spec)
    codes = encode_array(x, scale, zero_point, spec, spec.group_size)
    whole = (lo, hi, codes.astype(jnp.int8), decode_array(codes, scale, zero_point, spec, spec.group_size))
    lo_b, hi_b = calibrate_array(x, spec, block)
    codes_b = encode_array(x, scale, zero_point, spec, block)
    return whole, (lo_b, hi_b, codes_b.astype(jnp.int8), decode_array(codes_b, scale, zero_point, spec, block))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocked_layouts())
def test_blocked_view_gives_the_grouped_result(layout):
    """Any block that divides the group size gives the same ranges, codes and dequantized values
    as whole groups (what a sharded group axis whose groups straddle shards uses)."""
    shape, block, options, seed = layout
    spec = jc.QuantSpec(**options).resolve(shape)
    whole, blocked = jax.jit(_grouped_and_blocked, static_argnums=(1, 2))(jnp.asarray(_sample(shape, seed)), spec, block)
    if options["calibration"] == "absmax":  # max / min are exact in any order
        np.testing.assert_array_equal(np.asarray(blocked[0]), np.asarray(whole[0]))
        np.testing.assert_array_equal(np.asarray(blocked[1]), np.asarray(whole[1]))
    else:  # mse sums errors block by block: the chosen ratio may differ only on a float tie
        np.testing.assert_allclose(np.asarray(blocked[1]), np.asarray(whole[1]), rtol=0.05)
    np.testing.assert_array_equal(np.asarray(blocked[2]), np.asarray(whole[2]))
    np.testing.assert_array_equal(np.asarray(blocked[3]), np.asarray(whole[3]))


def test_block_size_follows_the_sharding_or_the_device_count():
    from jaxcompress.quant.codec import block_size

    spec = jc.QuantSpec(bits=4, channel_axes=(-1,), group_size=64).resolve((192, 8))
    assert block_size(jnp.zeros((192, 8)), spec) == 64  # one device holds whole groups
    assert block_size(jnp.zeros((192, 8)), jc.QuantSpec(bits=4).resolve((192, 8))) is None
    # Traced without a known sharding: any even split over a divisor of the device count.
    seen = []
    jax.jit(lambda w: seen.append(block_size(w, spec)) or w)(jnp.zeros((192, 8)))
    assert seen == [64 if jax.device_count() == 1 else np.gcd(64, 192 // np.gcd(192, jax.device_count()))]


def test_dequantize_and_qarray_method_agree():
    x = _sample((12, 4), 3)
    for options in (dict(bits=4, group_size=4, group_axis=0), dict(bits=3, symmetric=False, group_size=6, group_axis=0)):
        q = jc.quantize(x, channel_axes=(-1,), **options)
        np.testing.assert_array_equal(np.asarray(jc.dequantize(q)), np.asarray(q.dequantize()))
        np.testing.assert_array_equal(np.asarray(jc.dequantize(q, jnp.bfloat16)), np.asarray(q.dequantize(jnp.bfloat16)))
