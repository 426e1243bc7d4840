"""The demo CNN, trained briefly on Fashion-MNIST and quantized W8A8 with static scales, exported
to both formats: the runtimes execute integer convs / dense layers and agree with
``jc.compressed`` to one output quantization step on real test images."""

import numpy as np
import pytest

import jax
import jaxcompress as jc
from jaxcompress.export import evaluate_file, to_onnx, to_tflite
from ai_edge_litert import schema_py_generated as schema
from jaxcompress.demo.pipeline import CNN
from tests.export.models import fashion_mnist, quantize_static, train
from tests.export.runtimes import FLOAT_ONNX, WEIGHTED_TFLITE, optimized_ops, run_onnx, run_tflite, tflite_ops

TEST_IMAGES = 1000


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    data = fashion_mnist()
    model = CNN()
    variables = train(model, steps=150)
    calibration = [data.train_images[i * 256 : (i + 1) * 256] for i in range(4)]
    qparams = quantize_static(model.apply, variables, calibration)
    folder = tmp_path_factory.mktemp("cnn")
    example = data.test_images[:2]
    paths = {
        "tflite": to_tflite(model.apply, qparams, example, path=folder / "model.tflite", calibration=calibration),
        "onnx": to_onnx(model.apply, qparams, example, path=folder / "model.onnx", calibration=calibration),
        "tflite_fp32": to_tflite(model.apply, variables, example, path=folder / "fp32.tflite"),
        "onnx_fp32": to_onnx(model.apply, variables, example, path=folder / "fp32.onnx"),
    }
    images = data.test_images[:TEST_IMAGES]
    reference = np.asarray(jax.jit(jc.compressed(model.apply))(qparams, images))
    # the output quantization step: the scale of the tensor the final DEQUANTIZE reads
    parsed = schema.ModelT.InitFromPackedBuf(bytearray(open(paths["tflite"], "rb").read()), 0).subgraphs[0]
    last = parsed.operators[-1]
    step = float(parsed.tensors[last.inputs[0]].quantization.scale[0])
    return dict(model=model, variables=variables, qparams=qparams, paths=paths, images=images, reference=reference,
                step=step, labels=data.test_labels[:TEST_IMAGES])


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_agrees_with_compressed(exported, fmt):
    run = run_tflite if fmt == "tflite" else run_onnx
    out = run(str(exported["paths"][fmt]), exported["images"])[0]
    reference = exported["reference"]
    within = np.abs(out - reference) <= exported["step"] * 1.001
    assert within.mean() >= 0.99, (within.mean(), np.abs(out - reference).max() / exported["step"])
    assert np.mean(np.argmax(out, -1) == np.argmax(reference, -1)) >= 0.99


def test_litert_runs_integer_kernels(exported):
    ops = tflite_ops(open(exported["paths"]["tflite"], "rb").read())
    weighted = [(name, types) for name, types in ops if name in WEIGHTED_TFLITE]
    assert [name for name, _ in weighted] == ["CONV_2D", "CONV_2D", "FULLY_CONNECTED", "FULLY_CONNECTED"]
    assert all(types == ["INT8", "INT8", "INT32"] for _, types in weighted), weighted
    assert [name for name, _ in ops].count("QUANTIZE") == 1  # at the input only: int8 end to end


def test_onnx_runtime_fuses_integer_kernels(exported, tmp_path):
    ops = optimized_ops(str(exported["paths"]["onnx"]), tmp_path)
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 2, ops
    assert not set(ops) & set(FLOAT_ONNX), ops


@pytest.mark.parametrize("fmt", ["tflite", "onnx", "tflite_fp32", "onnx_fp32"])
def test_dynamic_batch(exported, fmt):
    run = run_tflite if fmt.startswith("tflite") else run_onnx
    path = str(exported["paths"][fmt])
    images = exported["images"][:7]
    whole = run(path, images)[0]
    np.testing.assert_allclose(np.concatenate([run(path, images[i : i + 1])[0] for i in range(7)]), whole, atol=1e-5)


@pytest.mark.parametrize("fmt", ["tflite_fp32", "onnx_fp32"])
def test_float_files_match_the_model(exported, fmt):
    run = run_tflite if fmt.startswith("tflite") else run_onnx
    out = run(str(exported["paths"][fmt]), exported["images"][:64])[0]
    expected = exported["model"].apply(exported["variables"], exported["images"][:64])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_int8_file_is_a_quarter_of_float_and_evaluates(exported):
    paths = exported["paths"]
    report = evaluate_file(paths["tflite"], exported["images"], exported["labels"], batch_sizes=(1,), repeats=2)
    float_report = evaluate_file(paths["tflite_fp32"], exported["images"], exported["labels"], batch_sizes=(1,),
                                 repeats=2)
    assert float_report.bytes / report.bytes >= 3.9
    assert abs(report.accuracy - float_report.accuracy) <= 0.01
