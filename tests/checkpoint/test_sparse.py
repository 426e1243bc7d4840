"""Sparse / packed on-disk encodings decode exactly (hypothesis) and cost what they claim."""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxcompress.checkpoint import sparse

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(bits=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_pack_unpack_bits_roundtrip(bits, data):
    codes = data.draw(hnp.arrays(np.uint8, st.integers(0, 37), elements=st.integers(0, (1 << bits) - 1)))
    packed = sparse.pack_bits(codes, bits)
    assert packed.size == math.ceil(codes.size * bits / 8)
    np.testing.assert_array_equal(sparse.unpack_bits(packed, bits, codes.size), codes)


@SETTINGS
@given(dtype=st.sampled_from([ml_dtypes.int4, ml_dtypes.int2, np.int8, np.float32, ml_dtypes.float8_e4m3fn]), data=st.data())
def test_pack_values_roundtrip(dtype, data):
    info = {ml_dtypes.int4: (-8, 7), ml_dtypes.int2: (-2, 1)}.get(dtype, (-100, 100))
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
    values = data.draw(hnp.arrays(np.int16, shape, elements=st.integers(*info))).astype(dtype)
    packed = sparse.pack_values(values)
    assert packed.size == sparse.packed_nbytes(values.size, dtype)
    out = sparse.unpack_values(packed, dtype, shape)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.astype(np.float32), values.astype(np.float32))


def test_int4_packs_two_per_byte():
    values = np.arange(-8, 8).astype(ml_dtypes.int4)
    assert sparse.pack_values(values).size == 8


@SETTINGS
@given(data=st.data(), dtype=st.sampled_from([np.int8, np.float32, ml_dtypes.int4]))
def test_bitmap_roundtrip(data, dtype):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=9))
    mask = data.draw(hnp.arrays(bool, shape))
    values = data.draw(hnp.arrays(np.int8, shape, elements=st.integers(-7, 7))).astype(dtype)
    values = np.where(mask, values, np.zeros((), dtype)).astype(dtype)
    bitmap, kept = sparse.encode_bitmap(values, mask)
    array, mask_out = sparse.decode_bitmap(bitmap, kept, shape)
    np.testing.assert_array_equal(mask_out, mask)
    np.testing.assert_array_equal(array.astype(np.float32), values.astype(np.float32))
    assert array.dtype == np.dtype(dtype)


def test_bitmap_90_percent_int8_costs_0225_bytes_per_element():
    rng = np.random.default_rng(0)
    n = 80_000
    mask = np.zeros(n, bool)
    mask[rng.choice(n, n // 10, replace=False)] = True
    values = np.where(mask, rng.integers(1, 127, n), 0).astype(np.int8)
    bitmap, kept = sparse.encode_bitmap(values, mask)
    assert (bitmap.nbytes + kept.nbytes) / n == pytest.approx(0.225)


def test_bitmap_rejects_nonzero_outside_mask():
    with pytest.raises(ValueError, match="w: the array is not zero where the mask is False"):
        sparse.encode_bitmap(np.array([1, 2], np.int8), np.array([True, False]), name="w")


@SETTINGS
@given(data=st.data(), nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2)]))
def test_n_m_roundtrip(data, nm):
    n, m = nm
    rows = data.draw(st.integers(1, 4))
    groups = data.draw(st.integers(1, 3))
    axis = data.draw(st.sampled_from([0, 1]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    shape = [rows, rows]
    shape[axis] = groups * m
    scores = rng.random(shape)
    moved = np.moveaxis(scores, axis, -1).reshape(-1, m)
    keep = np.zeros_like(moved, bool)
    np.put_along_axis(keep, np.argsort(-moved, axis=-1)[:, :n], True, axis=-1)
    mask = np.moveaxis(keep.reshape(np.moveaxis(scores, axis, -1).shape), -1, axis)
    values = np.where(mask, rng.integers(-127, 128, shape), 0).astype(np.int8)
    assert sparse.n_m_pattern(mask, axis, candidates=[(n, m)]) == (n, m)
    kept, indices = sparse.encode_n_m(values, mask, n, m, axis)
    assert kept.size == values.size * n // m
    assert indices.size == math.ceil(kept.size * sparse.index_bits(m) / 8)
    array, mask_out = sparse.decode_n_m(kept, indices, tuple(shape), n, m, axis)
    np.testing.assert_array_equal(array, values)
    np.testing.assert_array_equal(mask_out, mask)


def test_n_m_rejects_wrong_pattern():
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        sparse.encode_n_m(np.ones((1, 4), np.int8), np.ones((1, 4), bool), 2, 4, 1)


def test_packing_across_slices(monkeypatch):
    monkeypatch.setattr(sparse, "_CHUNK", 8)  # force many slices on a small array
    rng = np.random.default_rng(1)
    for bits, dtype in ((4, ml_dtypes.int4), (2, ml_dtypes.int2)):
        values = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=101).astype(dtype)
        out = sparse.unpack_values(sparse.pack_values(values), dtype, values.shape)
        np.testing.assert_array_equal(out.astype(int), values.astype(int))
    mask = rng.random(77) < 0.3
    np.testing.assert_array_equal(sparse.unpack_bits(sparse.pack_bits(mask, 1), 1, 77).astype(bool), mask)
