"""`QArray.input_scale` (SmoothQuant / AWQ smoothing): dequantization, size, and `compressed`
dividing the activation instead of the weight (dense, einsum, transposed, conv, scan, static)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.execute.transform import compressed
from jaxcompress.execute import UnsupportedQuantizedOp
from jaxcompress.execute.calibration import attach_activation_scales, calibrate_activations
from jaxcompress.execute.weight_view import WeightView
from tests.execute.reference import activation_codes, count_s8_contractions, weight_parts


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _positive(seed, shape):
    return jnp.asarray(np.exp(np.random.default_rng(seed).normal(size=shape)), jnp.float32)


def _smoothed(w, input_scale, **spec):
    """quantize(w * s) carrying s: stands for w (up to rounding)."""
    spec.setdefault("channel_axes", (-1,))
    q = jc.quantize(w * input_scale, **spec)
    return dataclasses.replace(q, input_scale=input_scale)


def test_dequantize_divides_and_nbytes_counts():
    w = _normal(0, (6, 4))
    s = _positive(1, (6, 1))
    q = _smoothed(w, s, bits=8)
    codes, scale, _ = weight_parts(q)
    expected = codes * scale / np.asarray(s, np.float64)
    np.testing.assert_allclose(np.asarray(q.dequantize()), expected, rtol=1e-6, atol=1e-7)
    assert q.input_scale_axes == (0,)
    assert q.nbytes == 6 * 4 + 4 * 4 + 6 * 4
    assert "input-scaled" in repr(q)
    plain = jc.quantize(w, channel_axes=(-1,))
    assert plain.input_scale is None and plain.input_scale_axes == ()
    # a pytree child: the None default adds no leaves; jit sees it as an array
    assert len(jax.tree_util.tree_leaves(plain)) == 2 and len(jax.tree_util.tree_leaves(q)) == 3
    assert jnp.allclose(jax.jit(lambda q: q.dequantize())(q), q.dequantize())


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_dense_matches_smoothed_float_and_stays_int8(mode):
    x = _normal(2, (5, 16)) * jnp.linspace(0.1, 20.0, 16)  # outlier channels
    w = _normal(3, (16, 8))
    s = jnp.sqrt(jnp.max(jnp.abs(x), axis=0) / jnp.max(jnp.abs(w), axis=1)).reshape(16, 1)
    q = _smoothed(w, s, activation=mode)
    fn = lambda p, x: x @ p["w"]
    out = compressed(fn)({"w": q}, x)
    ref = np.asarray(x, np.float64) @ np.asarray(q.dequantize(), np.float64)
    if mode == "dynamic":
        # float64 reference of the integer arithmetic on x / s
        codes, x_scale = activation_codes(np.asarray(x) / np.asarray(s).reshape(1, 16), (-1,))
        w_codes, w_scale, _ = weight_parts(q)
        exact = (codes @ w_codes) * w_scale * x_scale
        np.testing.assert_allclose(np.asarray(out), exact, rtol=1e-4, atol=1e-3)
        assert count_s8_contractions(jax.jit(compressed(fn)).lower({"w": q}, x).compile().as_text()) >= 1
        tolerance = 0.02 * np.abs(ref).max()
    else:
        tolerance = 1e-4 * np.abs(ref).max()
    assert np.abs(np.asarray(out) - ref).max() <= tolerance


def test_einsum_densegeneral_and_transposed_weight():
    x = _normal(4, (2, 3, 12))
    s = jnp.linspace(0.7, 1.4, 12)  # mild: a random s would widen the int8 activation's range
    # DenseGeneral-style kernel (in, heads, head_dim): the einsum reshapes it to (in, heads*hd)
    w = _normal(6, (12, 2, 4))
    q = _smoothed(w, s.reshape(12, 1, 1), channel_axes=(1, 2), activation="dynamic")
    fn = lambda p, x: jnp.einsum("btd,dhk->bthk", x, p["w"])
    out = compressed(fn)({"w": q}, x)
    ref = jnp.einsum("btd,dhk->bthk", x, q.dequantize())
    assert jnp.abs(out - ref).max() <= 0.02 * jnp.abs(ref).max()
    # an (out, in) weight used as x @ w.T, smoothed along its axis 1
    w2 = _normal(7, (8, 12))
    q2 = _smoothed(w2, s.reshape(1, 12), channel_axes=(0,), activation="dynamic")
    fn2 = lambda p, x: x @ p["w"].T
    out2 = compressed(fn2)({"w": q2}, x)
    ref2 = x @ q2.dequantize().T
    assert jnp.abs(out2 - ref2).max() <= 0.02 * jnp.abs(ref2).max()
    assert count_s8_contractions(jax.jit(compressed(fn2)).lower({"w": q2}, x).compile().as_text()) >= 1


def test_input_scale_on_a_free_axis_dequantizes_or_raises():
    x = _normal(8, (4, 6))
    w = _normal(9, (6, 5))
    q = _smoothed(w, _positive(10, (1, 5)), channel_axes=(-1,), activation="dynamic")  # along `out`
    fn = lambda p, x: x @ p["w"]
    with pytest.raises(UnsupportedQuantizedOp, match="input scale"):
        compressed(fn)({"w": q}, x)
    out = compressed(fn, on_unsupported="dequantize")({"w": q}, x)
    assert jnp.allclose(out, x @ q.dequantize(), atol=1e-5)


def test_view_layout_ops_carry_or_refuse():
    q = _smoothed(_normal(11, (4, 3, 2)), _positive(12, (4, 1, 1)), channel_axes=(0,))
    view = WeightView.from_qarray(q)
    for op in (
        lambda v: v.reshape((4, 6)),
        lambda v: v.transpose((2, 0, 1)),
        lambda v: v.slice((1, 0, 0), (3, 3, 2)),
        lambda v: v.broadcast_in_dim((5, 4, 3, 2), (1, 2, 3)),
        lambda v: v.astype(jnp.bfloat16).astype(jnp.float32),
    ):
        moved = op(view)
        direct = op(WeightView.from_qarray(dataclasses.replace(q, input_scale=None)))
        expected = direct.dequantize() / op_reference(op, q.input_scale, q.shape)
        assert moved is not None and jnp.allclose(moved.dequantize(), expected, rtol=1e-5)
    # merging the smoothed axis with an unsmoothed one cannot keep a per-element factor
    assert WeightView.from_qarray(q).reshape((24,)) is None


def op_reference(op, input_scale, shape):
    """The input scale moved by the same op, via a full float array (broadcast first)."""
    full = jnp.broadcast_to(input_scale, shape)
    plain = jc.quantize(full, bits=8)  # only used for its layout ops
    view = WeightView.from_qarray(dataclasses.replace(plain, values=full, scale=jnp.ones((1,) * len(shape))))
    return op(view).materialize().values


def test_conv_kernel_smoothed_along_input_features():
    x = _normal(13, (2, 6, 6, 3)) * jnp.array([0.1, 1.0, 10.0])
    w = _normal(14, (3, 3, 3, 4))
    s = _positive(15, (1, 1, 3, 1))
    dn = ("NHWC", "HWIO", "NHWC")
    fn = lambda p, x: jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=dn)
    for mode in ("dynamic", "weight_only"):
        q = _smoothed(w, s, activation=mode)
        out = compressed(fn)({"w": q}, x)
        ref = fn({"w": q.dequantize()}, x)
        assert jnp.abs(out - ref).max() <= 0.03 * jnp.abs(ref).max(), mode


def test_scan_over_stacked_smoothed_layers():
    x = _normal(16, (3, 8))
    w = _normal(17, (4, 8, 8), 0.3)
    s = _positive(18, (4, 8, 1))
    q = _smoothed(w, s, channel_axes=(0, 2), activation="dynamic")

    def fn(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    out = compressed(fn)({"w": q}, x)
    ref = fn({"w": q.dequantize()}, x)
    assert jnp.abs(out - ref).max() <= 0.05


def test_static_calibration_sees_the_smoothed_activation():
    x = _normal(19, (8, 16)) * jnp.linspace(0.5, 30.0, 16)
    w = _normal(20, (16, 4))
    s = jnp.max(jnp.abs(x), axis=0).reshape(16, 1)  # smoothed activation has |x/s| <= 1
    q = _smoothed(w, s, activation="static")
    fn = lambda p, x: x @ p["w"]
    scales = calibrate_activations(fn, {"w": q}, [x])
    assert float(scales["w"]) == pytest.approx(1.0 / 127, rel=1e-5)
    qparams = attach_activation_scales({"w": q}, scales)
    out = compressed(fn)(qparams, x)
    ref = x @ q.dequantize()
    assert jnp.abs(out - ref).max() <= 0.02 * jnp.abs(ref).max()


def test_checkpoints_carry_input_scale(tmp_path):
    from jaxcompress.checkpoint.orbax_io import load_checkpoint, save_checkpoint
    from jaxcompress.checkpoint.safetensors_io import export_safetensors, import_safetensors

    q = _smoothed(_normal(21, (8, 4)), _positive(22, (8, 1)), bits=4, group_size=4, channel_axes=(-1,))
    params = {"w": q, "b": jnp.zeros(4)}
    export_safetensors(tmp_path / "m.safetensors", params)
    restored, _ = import_safetensors(tmp_path / "m.safetensors")
    assert restored["w"].input_scale is not None
    assert jnp.array_equal(restored["w"].dequantize(), q.dequantize())
    save_checkpoint(tmp_path / "ckpt", params)
    restored, _ = load_checkpoint(tmp_path / "ckpt")
    assert restored["w"].input_scale is not None
    assert jnp.array_equal(restored["w"].dequantize(), q.dequantize())
