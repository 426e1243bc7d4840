"""A float64 NumPy executor of an export `Graph`: the quantized math the runtimes should compute.

Every quantized activation is rounded to its int8 grid (``clip(round(x / s) + z, -128, 127)``), an
integer conv / fully-connected sees its input on the ``input_quant`` grid, its weight as
``codes * scale`` and its bias rounded to the int32 grid ``input scale x weight scale``.
"""

from __future__ import annotations

import math

import numpy as np

from jaxcompress.export._graph import FIXED_OUTPUT_QUANT, Graph, Quant


def fake_quant(x: np.ndarray, quant: Quant | None) -> np.ndarray:
    if quant is None:
        return x
    scale, zero = float(quant.scale[0]), float(quant.zero_point[0])
    return (np.clip(np.round(x / scale) + zero, -128, 127) - zero) * scale


def _conv(x, w, strides, dilation, padding, groups):
    """NHWC x (O, kh, kw, I/groups) -> NHWC, float64."""
    (top, bottom), (left, right) = padding
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    n, h, wd, c = x.shape
    o, kh, kw, ig = w.shape
    sh, sw = strides
    dh, dw = dilation
    oh = (h - (kh - 1) * dh - 1) // sh + 1
    ow = (wd - (kw - 1) * dw - 1) // sw + 1
    out = np.zeros((n, oh, ow, o))
    per_group = o // groups
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw, :]
            for g in range(groups):
                cols = slice(g * per_group, (g + 1) * per_group)
                out[..., cols] += patch[..., g * ig : (g + 1) * ig] @ w[cols, i, j, :].T
    return out


def _pool(x, window, strides, padding, reduce):
    if padding == "SAME":
        pads = []
        for axis in range(2):
            size, k, s = x.shape[1 + axis], window[axis], strides[axis]
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=-np.inf)
    n, h, w, c = x.shape
    oh, ow = (h - window[0]) // strides[0] + 1, (w - window[1]) // strides[1] + 1
    out = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            block = x[:, i * strides[0] : i * strides[0] + window[0], j * strides[1] : j * strides[1] + window[1], :]
            out[:, i, j, :] = reduce(block, axis=(1, 2))
    return out


def _gelu(x, approximate):
    if approximate:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


_UNARY = {
    "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.clip(x, 0, 6), "logistic": lambda x: 1 / (1 + np.exp(-x)),
    "tanh": np.tanh, "hard_swish": lambda x: x * np.clip(x + 3, 0, 6) / 6, "exp": np.exp,
    "rsqrt": lambda x: 1 / np.sqrt(x), "sqrt": np.sqrt, "neg": np.negative, "abs": np.abs, "square": np.square,
}
_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "maximum": np.maximum,
           "minimum": np.minimum}


def _dequantized_weight(weight):
    data = np.asarray(weight.data, np.float64)
    if weight.quant is None:
        return data
    return data * weight.quant.scale.astype(np.float64).reshape((-1,) + (1,) * (data.ndim - 1))


def calibrate(graph: Graph, *inputs: np.ndarray) -> None:
    """Set every activation's ``range`` from a float run on ``inputs``."""
    values = run(graph, *inputs, quantized=False, everything=True)
    for tensor in list(graph.inputs) + [out for op in graph.ops for out in op.outputs]:
        tensor.range = (float(values[id(tensor)].min()), float(values[id(tensor)].max()))


def run(graph: Graph, *inputs: np.ndarray, quantized: bool = True, everything: bool = False):
    """The graph's outputs (float64), or with ``everything`` every value by tensor id."""
    values = {}
    q = (lambda x, quant: fake_quant(x, quant)) if quantized else (lambda x, quant: x)
    for tensor, x in zip(graph.inputs, inputs):
        values[id(tensor)] = q(np.asarray(x, np.float64), tensor.quant)

    def get(tensor):
        if tensor.is_constant:
            return np.asarray(tensor.data, np.float64)
        return values[id(tensor)]

    for op in graph.ops:
        kind, attrs = op.kind, op.attrs
        args = [get(t) for t in op.inputs]
        if kind in ("conv2d", "fully_connected"):
            x = args[0]
            weight = _dequantized_weight(op.inputs[1])
            bias = args[2] if len(args) > 2 else np.zeros(weight.shape[0])
            if quantized and "input_quant" in attrs:
                x = fake_quant(x, attrs["input_quant"])
                bias_scale = float(attrs["input_quant"].scale[0]) * op.inputs[1].quant.scale.astype(np.float64)
                bias = np.round(bias / bias_scale) * bias_scale
            if kind == "conv2d":
                y = _conv(x, weight, attrs["strides"], attrs["dilation"], attrs["padding"], attrs.get("groups", 1))
            else:
                y = x @ weight.T
            y = y + bias
        elif kind in _UNARY:
            y = _UNARY[kind](args[0])
        elif kind in _BINARY:
            y = _BINARY[kind](*args)
        elif kind == "gelu":
            y = _gelu(args[0], attrs.get("approximate", False))
        elif kind == "softmax":
            e = np.exp(args[0] - args[0].max(-1, keepdims=True))
            y = e / e.sum(-1, keepdims=True)
        elif kind == "max_pool2d":
            y = _pool(args[0], attrs["window"], attrs["strides"], attrs.get("padding", "VALID"), np.max)
        elif kind == "avg_pool2d":
            y = _pool(args[0], attrs["window"], attrs["strides"], "VALID", np.mean)
        elif kind in ("mean", "sum", "reduce_max"):
            reduce = {"mean": np.mean, "sum": np.sum, "reduce_max": np.max}[kind]
            y = reduce(args[0], axis=tuple(attrs["axes"]), keepdims=attrs.get("keepdims", False))
        elif kind == "pad":
            y = np.pad(args[0], attrs["paddings"])
        elif kind == "reshape":
            y = args[0].reshape(attrs["shape"])
        elif kind == "transpose":
            y = np.transpose(args[0], attrs["perm"])
        elif kind == "concat":
            y = np.concatenate(args, axis=attrs["axis"])
        elif kind == "slice":
            index = tuple(slice(None) if size < 0 else slice(b, e, s)  # the dynamic batch stays whole
                          for size, b, e, s in zip(op.inputs[0].shape, attrs["begin"], attrs["end"], attrs["strides"]))
            y = args[0][index]
        elif kind == "batch_matmul":
            other = np.swapaxes(args[1], -1, -2) if attrs.get("adj_y") else args[1]
            y = args[0] @ other
        else:
            raise NotImplementedError(kind)
        if op.activation is not None:
            y = _UNARY[op.activation](y)
        out = op.outputs[0]
        quant = out.quant
        if kind in FIXED_OUTPUT_QUANT and quant is not None:
            quant = Quant(*FIXED_OUTPUT_QUANT[kind])
        values[id(out)] = q(y, quant)
    if everything:
        return values
    return [values[id(t)] for t in graph.outputs]
