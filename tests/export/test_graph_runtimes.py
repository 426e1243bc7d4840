"""Hand-built graphs written by both serializers run in LiteRT and ONNX Runtime and compute the
quantized math of the float64 NumPy reference (one output step at most), at two batch sizes."""

import numpy as np
import pytest

from jaxcompress.export import _onnx, _passes, _tflite
from jaxcompress.export._graph import Graph, Quant
from tests.export import reference
from tests.export.runtimes import FLOAT_ONNX, WEIGHTED_TFLITE, optimized_ops, run_onnx, run_tflite, tflite_ops

RNG = np.random.default_rng(0)


def qweight(graph, name, w):
    scale = np.abs(w).reshape(w.shape[0], -1).max(1) / 127
    codes = np.round(w / scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.int8)
    return graph.constant(name, codes, np.int8, Quant(scale, np.zeros_like(scale), axis=0))


def conv(graph, x, out_channels, kernel, *, strides=(1, 1), dilation=(1, 1), padding=((1, 1), (1, 1)), groups=1,
         quantized=True, input_scale=None):
    channels = x.shape[3]
    w = RNG.normal(size=(out_channels, kernel, kernel, channels // groups)) / np.sqrt(kernel * kernel * channels / groups)
    weight = qweight(graph, "w", w) if quantized else graph.constant("w", w.astype(np.float32))
    bias = graph.constant("b", RNG.normal(size=out_channels).astype(np.float32) * 0.1)
    h = x.shape[1] + sum(padding[0]) - (kernel - 1) * dilation[0] - 1
    wd = x.shape[2] + sum(padding[1]) - (kernel - 1) * dilation[1] - 1
    shape = (-1, h // strides[0] + 1, wd // strides[1] + 1, out_channels)
    attrs = dict(strides=strides, dilation=dilation, padding=padding, groups=groups)
    if quantized:
        attrs["input_scale"] = input_scale or 3.0 / 127
    return graph.add("conv2d", [x, weight, bias], shape, attrs)


def dense(graph, x, features, quantized=True, input_scale=None):
    w = RNG.normal(size=(features, x.shape[-1])) / np.sqrt(x.shape[-1])
    weight = qweight(graph, "fw", w) if quantized else graph.constant("fw", w.astype(np.float32))
    attrs = {"input_scale": input_scale or 4.0 / 127} if quantized else {}
    bias = graph.constant("fb", RNG.normal(size=features).astype(np.float32) * 0.1)
    return graph.add("fully_connected", [x, weight, bias], x.shape[:-1] + (features,), attrs)


def cnn(graph, quantized):
    x = graph.input("x", (-1, 12, 12, 3))
    y = graph.add("relu", [conv(graph, x, 8, 3, strides=(2, 2), padding=((0, 1), (0, 1)), quantized=quantized)],
                  (-1, 6, 6, 8))
    z = conv(graph, y, 8, 3, groups=8, quantized=quantized, input_scale=4.0 / 127)  # depthwise, SAME
    z = graph.add("relu6", [z], z.shape)
    z = graph.add("add", [z, y], z.shape)  # residual
    g = conv(graph, z, 16, 3, dilation=(2, 2), padding=((2, 2), (2, 2)), groups=2, quantized=quantized,
             input_scale=6.0 / 127)  # grouped, dilated
    g = graph.add("hard_swish", [g], g.shape)
    p = graph.add("max_pool2d", [g], (-1, 3, 3, 16), dict(window=(2, 2), strides=(2, 2), padding="VALID"))
    a = graph.add("avg_pool2d", [g], (-1, 3, 3, 16), dict(window=(2, 2), strides=(2, 2)))
    c = graph.add("concat", [p, a], (-1, 3, 3, 32), dict(axis=3))
    c = graph.add("pad", [c], (-1, 4, 5, 32), dict(paddings=((0, 0), (0, 1), (1, 1), (0, 0))))
    c = conv(graph, c, 8, 2, padding=((0, 0), (0, 0)), quantized=quantized)  # VALID
    m = graph.add("mean", [c], (-1, 8), dict(axes=(1, 2)))
    s = graph.add("slice", [c], (-1, 1, 4, 8), dict(begin=(0, 1, 0, 0), end=(0, 2, 4, 8), strides=(1, 1, 1, 1)))
    s = graph.add("transpose", [s], (-1, 4, 1, 8), dict(perm=(0, 2, 1, 3)))
    s = graph.add("reshape", [s], (-1, 32), dict(shape=(-1, 32)))
    f = graph.add("concat", [m, s], (-1, 40), dict(axis=1))
    logits = dense(graph, f, 10, quantized=quantized)
    probs = graph.add("softmax", [logits], logits.shape)
    gate = graph.add("logistic", [logits], logits.shape)
    squash = graph.add("tanh", [logits], logits.shape)
    graph.outputs = [logits, probs, gate, squash]
    return graph


def build(quantized):
    graph = cnn(Graph(), quantized)
    _passes.fuse_activations(graph)
    reference.calibrate(graph, RNG.normal(size=(32, 12, 12, 3)))
    if quantized:
        _passes.assign_quantization(graph)
    return graph


@pytest.fixture(scope="module")
def quantized_graph():
    return build(True)


def check_quantized(outputs, graph, x, steps=1.0):
    """Within ``steps`` output quantization steps of the reference on >= 99% of the elements."""
    expected = reference.run(graph, x)
    for got, want, tensor in zip(outputs, expected, graph.outputs):
        step = tensor.quant.scale[0] if tensor.quant is not None else 1.0
        if tensor is not graph.outputs[0]:
            step = max(step, 1 / 128)  # the fixed-range outputs
        within = np.abs(got - want) <= steps * step * 1.001
        assert got.shape == want.shape
        assert within.mean() >= 0.99, (tensor.name, np.abs(got - want).max(), step)


SHAPE = (-1, 8, 8, 4)
SINGLE_OPS = {
    "conv_same_stride2": lambda g, x: conv(g, x, 6, 3, strides=(2, 2), padding=((0, 1), (0, 1))),
    "conv_valid": lambda g, x: conv(g, x, 6, 3, padding=((0, 0), (0, 0))),
    "conv_explicit_asymmetric": lambda g, x: conv(g, x, 6, 3, padding=((2, 0), (1, 2))),
    "conv_dilated": lambda g, x: conv(g, x, 6, 3, dilation=(2, 2), padding=((2, 2), (2, 2))),
    "depthwise": lambda g, x: conv(g, x, 4, 3, groups=4),
    "depthwise_multiplier": lambda g, x: conv(g, x, 8, 3, groups=4),
    "grouped": lambda g, x: conv(g, x, 6, 3, groups=2),
    "dense": lambda g, x: dense(g, g.add("reshape", [x], (-1, 256), dict(shape=(-1, 256))), 7),
    "dense_3d": lambda g, x: dense(g, g.add("reshape", [x], (-1, 16, 16), dict(shape=(-1, 16, 16))), 5),
    "add": lambda g, x: g.add("add", [x, g.add("relu", [x], SHAPE)], SHAPE),
    "mul": lambda g, x: g.add("mul", [x, g.add("logistic", [x], SHAPE)], SHAPE),
    "relu6": lambda g, x: g.add("relu6", [g.add("mul", [x, g.constant("k", np.float32(4))], SHAPE)], SHAPE),
    "hard_swish": lambda g, x: g.add("hard_swish", [x], SHAPE),
    "logistic": lambda g, x: g.add("logistic", [x], SHAPE),
    "tanh": lambda g, x: g.add("tanh", [x], SHAPE),
    "softmax": lambda g, x: g.add("softmax", [x], SHAPE),
    "max_pool_same": lambda g, x: g.add("max_pool2d", [x], (-1, 3, 3, 4), dict(window=(3, 3), strides=(3, 3), padding="SAME")),
    "avg_pool": lambda g, x: g.add("avg_pool2d", [x], (-1, 4, 4, 4), dict(window=(2, 2), strides=(2, 2))),
    "mean": lambda g, x: g.add("mean", [x], (-1, 4), dict(axes=(1, 2))),
    "pad": lambda g, x: g.add("pad", [x], (-1, 9, 10, 4), dict(paddings=((0, 0), (1, 0), (1, 1), (0, 0)))),
    "transpose": lambda g, x: g.add("transpose", [x], (-1, 4, 8, 8), dict(perm=(0, 3, 1, 2))),
    "concat": lambda g, x: g.add("concat", [x, g.add("relu", [x], SHAPE)], (-1, 8, 8, 8), dict(axis=3)),
    "slice": lambda g, x: g.add("slice", [x], (-1, 3, 8, 2), dict(begin=(0, 2, 0, 1), end=(0, 8, 8, 3), strides=(1, 2, 1, 1))),
}


def single(name, quantized=True):
    graph = Graph()
    x = graph.input("x", SHAPE)
    graph.outputs = [SINGLE_OPS[name](graph, x)]
    _passes.fuse_activations(graph)
    reference.calibrate(graph, RNG.normal(size=(64, 8, 8, 4)))
    if quantized:
        _passes.assign_quantization(graph)
    return graph


@pytest.mark.parametrize("name", sorted(SINGLE_OPS))
def test_single_op_runs_the_quantized_math(name, tmp_path):
    graph = single(name)
    x = RNG.normal(size=(3, 8, 8, 4)).astype(np.float32)
    check_quantized(run_tflite(_tflite.to_flatbuffer(graph), x), graph, x)
    check_quantized(run_onnx(_onnx.to_model(graph).SerializeToString(), x), graph, x)


@pytest.mark.parametrize("batch", [1, 5])
def test_full_integer_tflite(quantized_graph, batch):
    blob = _tflite.to_flatbuffer(quantized_graph)
    x = RNG.normal(size=(batch, 12, 12, 3)).astype(np.float32)
    # 8 requantized layers deep: each layer may differ by one code where the runtime rounds a tie
    # differently (LiteRT's int8 average pool rounds half away from zero, the reference to even),
    # and the final dense sums those differences
    check_quantized(run_tflite(blob, x), quantized_graph, x, steps=8)
    ops = tflite_ops(blob)
    names = [name for name, _ in ops]
    assert names.count("CONV_2D") == 3 and names.count("DEPTHWISE_CONV_2D") == 1
    for name, types in ops:
        if name in WEIGHTED_TFLITE:
            assert types[:2] == ["INT8", "INT8"] and types[2] == "INT32", (name, types)
    assert names[0] == "QUANTIZE" and names.count("DEQUANTIZE") == 4


@pytest.mark.parametrize("batch", [1, 5])
def test_full_integer_onnx(quantized_graph, batch, tmp_path):
    model = _onnx.to_model(quantized_graph).SerializeToString()
    x = RNG.normal(size=(batch, 12, 12, 3)).astype(np.float32)
    check_quantized(run_onnx(model, x), quantized_graph, x, steps=8)
    ops = optimized_ops(model, tmp_path)
    assert ops.count("QLinearConv") == 4 and ops.count("QGemm") == 1
    assert not set(ops) & set(FLOAT_ONNX), ops


def test_float_graphs_match_reference():
    graph = build(False)
    x = RNG.normal(size=(3, 12, 12, 3)).astype(np.float32)
    expected = reference.run(graph, x, quantized=False)
    for outputs in (run_tflite(_tflite.to_flatbuffer(graph), x), run_onnx(_onnx.to_model(graph).SerializeToString(), x)):
        for got, want in zip(outputs, expected):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fold_affine_is_exact_for_int8_weights():
    """BatchNorm after an int8 conv folds into the per-channel scale (negative factors flip the
    codes' sign), exactly."""
    graph = Graph()
    x = graph.input("x", (-1, 6, 6, 4))
    y = conv(graph, x, 5, 3)
    factor = np.array([0.5, -2.0, 1.5, 3.0, -0.25], np.float32)
    y = graph.add("mul", [y, graph.constant("bn_scale", factor.reshape(1, 1, 1, 5))], y.shape)
    y = graph.add("sub", [y, graph.constant("bn_mean", np.arange(5, dtype=np.float32))], y.shape)
    graph.outputs = [y]
    inputs = RNG.normal(size=(2, 6, 6, 4))
    before = reference.run(graph, inputs, quantized=False)[0]
    _passes.fold_affine(graph)
    assert [op.kind for op in graph.ops] == ["conv2d"]
    np.testing.assert_allclose(reference.run(graph, inputs, quantized=False)[0], before, rtol=1e-5, atol=1e-5)
