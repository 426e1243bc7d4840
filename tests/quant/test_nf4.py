"""NF4 (normal-float 4-bit, QLoRA's code book) as a quantization type."""

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.quant.groups import expand_groups
from jaxcompress.quant.nf4 import NF4_CODE, nf4_code_book, nf4_decode, nf4_encode


def test_code_book_properties():
    """16 sorted codes in [-1, 1]: exactly -1, 0 and 1 present, 8 positive and 7 negative
    (the extra positive code is what buys the exact zero), symmetric-ish: each negative code is
    close to the mirror of a positive one, and the positive codes are normal quantiles."""
    assert NF4_CODE.shape == (16,) and NF4_CODE.dtype == np.float64
    assert np.all(np.diff(NF4_CODE) > 0)
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7
    positive, negative = NF4_CODE[8:], -NF4_CODE[:7][::-1]
    assert np.max(np.abs(np.interp(negative, positive, positive) - negative)) < 0.1
    # the largest positive code is the quantile at the offset: it normalises the positive half
    normal = NormalDist()
    raw = [normal.inv_cdf(p) for p in np.linspace(0.5 * (1 - 1 / 30 + 1 - 1 / 32), 0.5, 9)[:-1]]
    np.testing.assert_allclose(positive, np.sort(raw) / max(raw), rtol=1e-12)
    # the published first positive code of QLoRA's table (0.0796) is re-derived, not pasted
    assert abs(NF4_CODE[8] - 0.0796) < 5e-5
    assert np.array_equal(nf4_code_book(), NF4_CODE)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(-1.25, 1.25, allow_nan=False, width=32), min_size=1, max_size=64))
def test_encode_picks_the_nearest_code(values):
    x = np.asarray(values, np.float32)
    codes = np.asarray(nf4_encode(jnp.asarray(x)).astype(jnp.int8)) + 8
    distance = np.abs(np.clip(x.astype(np.float64), -1, 1)[:, None] - NF4_CODE[None, :])
    best = distance.min(axis=1)
    np.testing.assert_allclose(distance[np.arange(len(x)), codes], best, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(nf4_decode(jnp.asarray(codes - 8, jnp.int4))), NF4_CODE[codes].astype(np.float32))


def _reference(x, group_size):
    """float64: every group of the first axis (every column separately) scaled by its absmax,
    nearest code, times the scale."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for start in range(0, x.shape[0], group_size):
        block = x[start : start + group_size]
        scale = np.max(np.abs(block), axis=0, keepdims=True)
        scale = np.where(scale > 0, scale, 1.0)
        index = np.argmin(np.abs((block / scale)[..., None] - NF4_CODE), axis=-1)
        out[start : start + group_size] = NF4_CODE[index] * scale
    return out


@pytest.mark.parametrize("shape,group_size", [((128, 6), 64), ((100, 3), 64), ((9, 4), 64)])
def test_quantize_nf4_matches_the_reference(shape, group_size):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    q = jc.quantize(w, qtype="nf4", channel_axes=(-1,), group_size=group_size)
    assert (q.qtype, q.bits, q.values.dtype, q.zero_point) == ("nf4", 4, jnp.int4, None)
    assert q.scale.shape == (-(-shape[0] // group_size), shape[1])
    got = np.asarray(jc.dequantize(q), np.float64)
    ref = _reference(w, group_size)
    mismatch = np.abs(got - ref) > 1e-6
    assert mismatch.mean() < 0.01  # only float32 ties between two codes may differ
    # the bound of every element: half the widest gap between codes, times its group's scale
    scale = expand_groups(np.asarray(q.scale, np.float64), 0, group_size, shape[0])
    assert np.all(np.abs(got - w) <= scale * np.max(np.diff(NF4_CODE)) / 2 * 1.0001)
    assert q.nbytes == w.size // 2 + (w.size % 2) + q.scale.size * 4


def test_nf4_beats_int4_on_normal_weights():
    """The point of NF4: lower error than uniform int4 absmax on normally distributed weights
    at the same bytes (symmetric int4: no zero point; the 4-bit default, asymmetric, stores one
    more code per group)."""
    w = jax.random.normal(jax.random.key(0), (256, 64))
    errors = {}
    for name, options in {"nf4": dict(qtype="nf4"), "int4": dict(bits=4, symmetric=True)}.items():
        q = jc.quantize(w, channel_axes=(-1,), group_size=64, **options)
        errors[name] = float(jnp.mean((q.dequantize() - w) ** 2))
    assert errors["nf4"] < 0.8 * errors["int4"], errors


def test_nf4_rules_compressed_and_fake_quant():
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (100, 8)), "bias": jnp.zeros(8)}}
    rules = [jc.QuantRule(pattern=".*kernel", qtype="nf4", channel_axes=(-1,), group_size=64)]
    q, _ = jc.quantize_params(params, rules)
    kernel = q["dense"]["kernel"]
    assert kernel.qtype == "nf4" and "nf4" in repr(kernel)
    f = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
    x = jax.random.normal(jax.random.key(1), (4, 100))
    np.testing.assert_allclose(jc.compressed(f)(q, x), f(jc.dequantize_params(q), x), rtol=1e-5, atol=1e-5)
    fq = jc.fake_quant_array(params["dense"]["kernel"], qtype="nf4", channel_axes=(-1,), group_size=64)
    np.testing.assert_allclose(fq, kernel.dequantize(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="LSQ supports symmetric integer"):
        jc.init_lsq_step(params["dense"]["kernel"], qtype="nf4", group_size=64)
