"""What cannot be exported fails before any file is written, naming the primitive, its source line
and the leaf; writes are atomic; dynamic-range models use the runtimes' dynamic kernels."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.export import ExportError, to_onnx, to_tflite
from jaxcompress.export._files import write_atomic
from tests.export.runtimes import optimized_ops, run_onnx, run_tflite, tflite_ops

X = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
PARAMS = {"w": np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)}


def quantized(activation):
    rules = [jc.QuantRule(pattern="w", channel_axes=(-1,), activation=activation)]
    qparams, _ = jc.quantize_params(PARAMS, rules)
    if activation == "static":
        qparams = jc.attach_activation_scales(qparams, jc.calibrate_activations(lambda p, x: x @ p["w"], qparams, [X]))
    return qparams


@pytest.mark.parametrize("writer", [to_tflite, to_onnx])
def test_unsupported_primitive_names_primitive_line_and_leaf(writer, tmp_path):
    def fn(params, x):
        return jnp.cumsum(x @ params["w"], axis=-1)  # no export rule for cumsum

    path = tmp_path / "model.bin"
    with pytest.raises(ExportError) as info:
        writer(fn, quantized("static"), X, path=path)
    message = str(info.value)
    assert "`cumsum`" in message and "test_export_errors.py" in message
    assert not os.listdir(tmp_path)


def test_quantized_weight_in_an_unsupported_position_names_the_leaf(tmp_path):
    def fn(params, x):
        return jnp.einsum("bi,io->bo", x, params["w"])  # an einsum dot is fine ...

    to_tflite(fn, quantized("static"), X, path=tmp_path / "ok.tflite")

    def bad(params, x):
        return jnp.einsum("bi,io->bio", x, params["w"])  # ... an outer product with it is not

    with pytest.raises(ExportError, match=r"quantized leaf w"):
        to_tflite(bad, quantized("static"), X, path=tmp_path / "bad.tflite")
    assert not (tmp_path / "bad.tflite").exists()


def test_mixed_static_and_dynamic_weights_are_refused():
    params = {"a": PARAMS["w"], "b": PARAMS["w"].T.copy()}
    static, _ = jc.quantize_params(params, [jc.QuantRule(pattern="a", channel_axes=(-1,), activation="static"),
                                            jc.QuantRule(pattern="b", channel_axes=(-1,), activation="dynamic")])
    fn = lambda p, x: (x @ p["a"]) @ p["b"]  # noqa: E731
    static = jc.attach_activation_scales(static, jc.calibrate_activations(fn, static, [X]))
    with pytest.raises(ExportError, match=r"^b: activation='dynamic'"):
        to_onnx(fn, static, X, path="/nonexistent/never.onnx")


def test_bad_example_argument():
    with pytest.raises(ExportError, match=r"example_args\[0\]"):
        to_tflite(lambda p, x: x, PARAMS, "not an array", path="/nonexistent/never.tflite")


def test_atomic_write_removes_the_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "model.tflite"
    target.write_bytes(b"old")

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.tflite"]
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing" / "m.tflite", b"x")


def test_dynamic_range_dense_uses_dynamic_kernels(tmp_path):
    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(5)])
    x = np.random.default_rng(2).normal(size=(8, 16)).astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    rules = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]
    qparams, _ = jc.quantize_params(variables, rules)
    expected = np.asarray(jc.compressed(model.apply)(qparams, x))
    tflite = to_tflite(model.apply, qparams, x, path=tmp_path / "dyn.tflite")
    onnx_path = to_onnx(model.apply, qparams, x, path=tmp_path / "dyn.onnx")
    ops = tflite_ops(open(tflite, "rb").read())
    assert [types[:2] for name, types in ops if name == "FULLY_CONNECTED"] == [["FLOAT32", "INT8"]] * 2
    assert "QUANTIZE" not in [name for name, _ in ops]
    onnx_ops = optimized_ops(onnx_path, tmp_path)
    assert not {"Gemm", "MatMul", "FusedGemm", "FusedMatMul"} & set(onnx_ops), onnx_ops
    for out in (run_tflite(tflite, x)[0], run_onnx(onnx_path, x)[0]):
        cosine = np.sum(out * expected) / np.linalg.norm(out) / np.linalg.norm(expected)
        assert cosine > 0.999


def test_unquantized_kernel_stays_float_inside_an_int8_graph(tmp_path):
    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(5)])
    x = np.random.default_rng(3).normal(size=(16, 16)).astype(np.float32)
    variables = model.init(jax.random.key(1), x)
    rules = [jc.QuantRule(pattern=r".*layers_0/kernel", channel_axes=(-1,), activation="static")]
    qparams, _ = jc.quantize_params(variables, rules, on_unused="ignore")
    qparams = jc.attach_activation_scales(qparams, jc.calibrate_activations(model.apply, qparams, [x]))
    expected = np.asarray(jc.compressed(model.apply)(qparams, x))
    tflite = to_tflite(model.apply, qparams, x, path=tmp_path / "mixed.tflite")
    onnx_path = to_onnx(model.apply, qparams, x, path=tmp_path / "mixed.onnx")
    ops = tflite_ops(open(tflite, "rb").read())
    assert [types[:2] for name, types in ops if name == "FULLY_CONNECTED"] == [["INT8", "INT8"], ["FLOAT32", "FLOAT32"]]
    for out in (run_tflite(tflite, x)[0], run_onnx(onnx_path, x)[0]):
        assert np.max(np.abs(out - expected)) <= 0.05 * np.max(np.abs(expected))
