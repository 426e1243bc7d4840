"""A MobileNet-style CNN (BatchNorm, depthwise convs, relu6, residual adds, global mean pool)
exported full-integer: BatchNorm folds away, relu6 fuses, both runtimes run integer kernels and
agree with ``jc.compressed`` on real Fashion-MNIST images.

Unlike the plain CNN, the full-integer file also quantizes tensors `compressed` keeps in float
(the linear bottlenecks and the residual sums, with calibrated ranges), so element-wise agreement
is looser than one step; the top-1 agreement is the deployment criterion."""

import jax
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.export import _onnx, to_tflite
from jaxcompress.export._lower import build_graph
from tests.export.models import MobileNet, fashion_mnist, quantize_static, settle_batch_stats
from tests.export.runtimes import FLOAT_ONNX, WEIGHTED_TFLITE, optimized_ops, run_onnx, run_tflite, tflite_ops

MODEL = MobileNet(widths=((8, 2), (8, 1), (16, 2), (16, 1)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    data = fashion_mnist()
    calibration = [data.train_images[:128]]
    variables = MODEL.init(jax.random.key(0), data.train_images[:2])
    variables = settle_batch_stats(MODEL, variables, [data.train_images[i * 128 : (i + 1) * 128] for i in range(4)])
    qparams = quantize_static(MODEL.apply, variables, calibration)
    folder = tmp_path_factory.mktemp("mobilenet")
    example = data.test_images[:2]
    graph, _ = build_graph(MODEL.apply, qparams, (example,), calibration=calibration)
    images = data.test_images[:500]
    return dict(
        graph=graph,
        tflite=to_tflite(MODEL.apply, qparams, example, path=folder / "m.tflite", calibration=calibration),
        onnx=_onnx.to_model(graph).SerializeToString(),  # the same graph (to_onnx is tested on the CNN)
        fp32=to_tflite(MODEL.apply, variables, example, path=folder / "fp32.tflite"),
        images=images,
        reference=np.asarray(jax.jit(jc.compressed(MODEL.apply))(qparams, images)),
        float_out=np.asarray(MODEL.apply(variables, images)),
    )


def test_batchnorm_folds_and_relu6_fuses(exported):
    kinds = [(op.kind, op.activation) for op in exported["graph"].ops]
    assert [k for k, _ in kinds] == ["conv2d"] * 7 + ["add"] + ["conv2d"] * 6 + ["add", "mean", "fully_connected"]
    assert kinds.count(("conv2d", "relu6")) == 9


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_agrees_with_compressed(exported, fmt):
    model = exported[fmt] if fmt == "onnx" else str(exported[fmt])
    out = (run_tflite if fmt == "tflite" else run_onnx)(model, exported["images"])[0]
    reference = exported["reference"]
    step = exported["graph"].outputs[0].quant.scale[0]
    assert np.mean(np.abs(out - reference) <= 3 * step) >= 0.99
    assert np.mean(np.argmax(out, -1) == np.argmax(reference, -1)) >= 0.99


def test_integer_kernels(exported, tmp_path):
    ops = tflite_ops(open(exported["tflite"], "rb").read())
    weighted = [(name, types) for name, types in ops if name in WEIGHTED_TFLITE]
    assert [name for name, _ in weighted].count("DEPTHWISE_CONV_2D") == 4
    assert all(types == ["INT8", "INT8", "INT32"] for _, types in weighted), weighted
    onnx_ops = optimized_ops(exported["onnx"], tmp_path)
    assert onnx_ops.count("QLinearConv") == 13 and not set(onnx_ops) & set(FLOAT_ONNX), onnx_ops


def test_float_file_matches_the_model(exported):
    out = run_tflite(str(exported["fp32"]), exported["images"][:64])[0]
    np.testing.assert_allclose(out, exported["float_out"][:64], rtol=1e-4, atol=1e-4)
