"""The default of `QuantSpec.symmetric` resolves by bits: asymmetric integer codes at <= 4 bits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.checkpoint import orbax_io, safetensors_io
from jaxcompress.quant.spec import ASYMMETRIC_MAX_BITS, QuantSpec, default_symmetric
from tests.quant.reference import reference_absmax, reference_codes


@pytest.mark.parametrize("bits", range(2, 9))
def test_default_resolves_by_bits(bits):
    spec = QuantSpec(bits=bits)
    assert spec.symmetric is (bits > ASYMMETRIC_MAX_BITS) is default_symmetric(bits)
    assert jc.QuantRule(pattern=".*", bits=bits).spec == spec  # rules resolve the same way
    assert QuantSpec(bits=bits, symmetric=True).symmetric is True  # either can be forced
    assert QuantSpec(bits=bits, symmetric=False).symmetric is False
    assert ("asym" if bits <= 4 else "sym") == spec.describe().split()[2]


def test_non_integer_formats_stay_symmetric_and_bad_values_are_rejected():
    for qtype in ("nf4", "float8_e4m3fn", "float8_e5m2"):
        assert QuantSpec(qtype=qtype).symmetric is True
        with pytest.raises(ValueError, match="symmetric only"):
            QuantSpec(qtype=qtype, symmetric=False)
    with pytest.raises(TypeError, match="symmetric must be True, False or None"):
        QuantSpec(bits=4, symmetric="yes")
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        QuantSpec(bits=1)
    # replace keeps the resolved value unless told to resolve again
    assert dataclasses.replace(QuantSpec(bits=4), bits=8).symmetric is False
    assert dataclasses.replace(QuantSpec(bits=4), bits=8, symmetric=None).symmetric is True


def test_default_4bit_matches_the_float64_zero_point_reference():
    x = np.asarray(jax.random.normal(jax.random.key(0), (96, 8)), np.float64) + 0.3  # off-centre groups
    q = jc.quantize(jnp.asarray(x, jnp.float32), bits=4, channel_axes=(-1,), group_size=32)
    assert q.zero_point is not None
    scale, zero = reference_absmax(x, bits=4, symmetric=False, channel_axes=(1,), group_axis=0, group_size=32)
    codes = reference_codes(x, scale, zero, bits=4, symmetric=False, group_axis=0, group_size=32)
    np.testing.assert_allclose(np.asarray(q.scale, np.float64), scale.reshape(3, 8), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.zero_point.astype(jnp.int8)), zero.reshape(3, 8))
    stored = np.asarray(jc.quantize(jnp.asarray(x, jnp.float32), bits=4, channel_axes=(-1,), group_size=32).values
                        .astype(jnp.int8), np.int64)
    np.testing.assert_array_equal(stored, codes.reshape(96, 8))
    deq = (codes.reshape(3, 32, 8) - zero) * scale
    np.testing.assert_allclose(np.asarray(q.dequantize()), deq.reshape(96, 8), rtol=1e-5, atol=1e-6)
    # the asymmetric grid is finer here than the symmetric one: half the step or better
    sym = jc.quantize(jnp.asarray(x, jnp.float32), bits=4, channel_axes=(-1,), group_size=32, symmetric=True)
    assert float(jnp.mean((q.dequantize() - x) ** 2)) < float(jnp.mean((sym.dequantize() - x) ** 2))


def _default_w4_tree():
    w = jax.random.normal(jax.random.key(1), (64, 16)) + 0.1
    params = {"dense": {"kernel": w, "bias": jnp.zeros(16)}}
    qparams, _ = jc.quantize_params(params, jc.QuantRule(pattern=".*kernel", bits=4, channel_axes=(-1,), group_size=32))
    assert qparams["dense"]["kernel"].zero_point is not None  # the default at 4 bits
    return params, qparams


def _assert_same_qarray(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for fa, fb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert fa.dtype == fb.dtype and fa.shape == fb.shape
        np.testing.assert_array_equal(np.asarray(fa.astype(jnp.float32)), np.asarray(fb.astype(jnp.float32)))


def test_default_asymmetric_round_trips_through_both_checkpoint_formats(tmp_path):
    _, qparams = _default_w4_tree()
    orbax_io.save_checkpoint(tmp_path / "orbax", qparams)
    restored, _ = orbax_io.load_checkpoint(tmp_path / "orbax")
    _assert_same_qarray(qparams["dense"]["kernel"], restored["dense"]["kernel"])
    safetensors_io.export_safetensors(tmp_path / "w.safetensors", qparams)
    restored, _ = safetensors_io.import_safetensors(tmp_path / "w.safetensors")
    _assert_same_qarray(qparams["dense"]["kernel"], restored["dense"]["kernel"])


def test_default_asymmetric_runs_in_compressed_like_its_dequantized_weights():
    params, qparams = _default_w4_tree()
    x = jax.random.normal(jax.random.key(2), (4, 64))
    fn = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
    expected = np.asarray(x, np.float64) @ np.asarray(qparams["dense"]["kernel"].dequantize(), np.float64)
    out = jax.jit(jc.compressed(fn))(qparams, x)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
