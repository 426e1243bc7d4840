"""Write a `Graph` as an ONNX model in QDQ form (internal).

A quantized activation is its float value followed by ``QuantizeLinear`` / ``DequantizeLinear``
(uint8, the activation type ONNX Runtime's x86 integer kernels take: int8 codes ``q`` with zero
point ``z`` are the same values as uint8 ``q + 128`` with ``z + 128``). An integer conv /
fully-connected reads its input through such a pair, its int8 per-output-channel weight and int32
bias through ``DequantizeLinear``, and its output goes straight into a ``QuantizeLinear``: ONNX
Runtime fuses that into ``QLinearConv`` / ``QGemm``. A relu output quantized symmetrically (scale
``s``, zero point 0: the activation scale of the next layer) is stored as uint8 with zero point 0
and the same scale, so its QuantizeLinear does the relu and ONNX Runtime drops the Relu; such a
tensor saturates at ``255 s`` where `jaxcompress.compressed` saturates at ``127 s`` (the only
difference, and only for values beyond the calibrated range). A fully-connected with an int8
weight and a float input (a dynamic-range model) quantizes each activation row at run time and
runs ``MatMulInteger`` (int8 x int8 -> int32), as `jaxcompress.compressed` does.

The graph is NHWC; ONNX convs and pools are NCHW, so every 4-D tensor is kept in whichever
layout its producer made and transposed (once, cached) for a consumer that needs the other one.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jaxcompress.export._graph import SAME_QUANT, ExportError, Graph, Op, Quant, Tensor
from jaxcompress.export._tflite import same_padding

__all__ = ["to_model", "OPSET"]

OPSET = 17
_TO_NCHW, _TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)
_UNARY = {"relu": "Relu", "logistic": "Sigmoid", "tanh": "Tanh", "hard_swish": "HardSwish", "exp": "Exp",
          "sqrt": "Sqrt", "neg": "Neg", "abs": "Abs"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "maximum": "Max", "minimum": "Min"}


def _nchw_axis(axis: int) -> int:
    return _TO_NCHW.index(axis % 4)


class _Writer:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes: list = []
        self.initializers: list = []
        self.values: dict[int, tuple[str, str]] = {}  # tensor -> (name, "nhwc" | "nchw")
        self.stored: dict[int, Quant] = {}  # tensor -> the quantization its QDQ pair uses
        self.cache: dict[tuple, str] = {}
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}__{self.count}"

    def node(self, op_type: str, inputs, hint: str, domain: str | None = None, outputs: int = 1, **attrs):
        names = [self.fresh(hint) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type), domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def init(self, hint: str, array) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    # ---- quantization ----------------------------------------------------------------------------
    def qdq(self, name: str, quant: Quant) -> str:
        scale = self.init("scale", np.float32(quant.scale[0]))
        zero = self.init("zero_point", np.uint8(int(quant.zero_point[0]) + 128))
        codes = self.node("QuantizeLinear", [name, scale, zero], "q")
        return self.node("DequantizeLinear", [codes, scale, zero], "dq")

    def dq_const(self, hint: str, codes: np.ndarray, scale: np.ndarray, axis: int | None) -> str:
        codes_name = self.init(hint, codes)
        if axis is None:
            scale_name = self.init(hint + "_scale", np.float32(scale.reshape(-1)[0]))
            zero_name = self.init(hint + "_zero", np.zeros((), codes.dtype))
            return self.node("DequantizeLinear", [codes_name, scale_name, zero_name], hint)
        scale_name = self.init(hint + "_scale", scale.astype(np.float32).reshape(-1))
        zero_name = self.init(hint + "_zero", np.zeros(scale.size, codes.dtype))
        return self.node("DequantizeLinear", [codes_name, scale_name, zero_name], hint, axis=axis)

    def get(self, tensor: Tensor, layout: str = "nhwc", quant: Quant | None = None) -> str:
        """``tensor``'s value in ``layout`` (4-D tensors), re-quantized to ``quant`` if given."""
        if tensor.is_constant:
            data = np.asarray(tensor.data, np.float32)
            if layout == "nchw" and data.ndim == 4:
                data = np.transpose(data, _TO_NCHW)
            elif layout == "nchw" and data.size > 1:  # broadcasts along the channel axis
                data = data.reshape(-1, 1, 1)
            return self.init(tensor.name, data)
        name, stored = self.values[id(tensor)]
        have = self.stored.get(id(tensor), tensor.quant)
        rank4 = len(tensor.shape) == 4
        moved = rank4 and stored != layout
        if quant is not None and have is not None and np.array_equal(quant.scale, have.scale):
            quant = have  # a relu output on [0, 255] steps serves a symmetric consumer of the same scale
        if not moved and (quant is None or quant.same(have)):
            return name
        key = (id(tensor), layout if rank4 else "nhwc", None if quant is None else (quant.scale[0], quant.zero_point[0]))
        if key not in self.cache:
            if moved:
                name = self.node("Transpose", [name], tensor.name, perm=list(_TO_NCHW if layout == "nchw" else _TO_NHWC))
                quant = quant or have
            self.cache[key] = self.qdq(name, quant) if quant is not None else name
        return self.cache[key]

    def produce(self, tensor: Tensor, name: str, layout: str, activation: str | None = None) -> None:
        quant = self.stored.get(id(tensor), tensor.quant)
        if quant is not None and activation in ("relu", "relu6") and int(quant.zero_point[0]) == 0:
            # a relu output quantized symmetrically: store it as uint8 with zero point 0 and the same
            # scale, so the QuantizeLinear clamps at 0 (ONNX Runtime drops the Relu / Clip and the
            # conv's output is its QLinearConv's); it then saturates at 255 steps instead of 127
            quant = Quant(quant.scale, -128)
            if activation == "relu6":
                name = self._activation(name, "relu6")
            self.stored[id(tensor)] = quant
            name = self.qdq(name, quant)
        elif quant is not None:
            name = self.qdq(name, quant)
            if activation is not None:
                name = self.qdq(self._activation(name, activation), quant)
        elif activation is not None:
            name = self._activation(name, activation)
        self.values[id(tensor)] = (name, layout if len(tensor.shape) == 4 else "nhwc")

    def _activation(self, name: str, activation: str) -> str:
        if activation == "relu":
            return self.node("Relu", [name], "relu")
        return self.node("Clip", [name, self.init("zero", np.float32(0)), self.init("six", np.float32(6))], "relu6")

    # ---- ops -------------------------------------------------------------------------------------
    def write(self, op: Op) -> None:
        kind, attrs, out = op.kind, op.attrs, op.outputs[0]
        if kind == "conv2d":
            return self._conv(op)
        if kind == "fully_connected":
            return self._dense(op)
        if kind in ("relu", "relu6") and out.quant is not None:
            x, layout = self._any_layout(op.inputs[0])
            return self.produce(out, x, layout, kind)  # the QuantizeLinear of the output clamps
        if kind in _UNARY or kind in ("relu6", "square", "rsqrt", "gelu", "erfc"):
            x, layout = self._any_layout(op.inputs[0])
            return self.produce(out, self._unary(kind, x, attrs), layout, op.activation)
        if kind in _BINARY:
            layouts = {self.values[id(t)][1] for t in op.inputs if not t.is_constant and len(t.shape) == 4}
            layout = "nchw" if layouts == {"nchw"} and len(out.shape) == 4 else "nhwc"
            args = [self.get(t, layout) for t in op.inputs]
            return self.produce(out, self.node(_BINARY[kind], args, kind), layout, op.activation)
        if kind in ("max_pool2d", "avg_pool2d"):
            x = self.get(op.inputs[0], "nchw")
            source = self.stored.get(id(op.inputs[0]))
            if source is not None and out.quant is not None and np.array_equal(source.scale, out.quant.scale):
                self.stored[id(out)] = source
            pads = [0, 0, 0, 0]
            if attrs.get("padding", "VALID") == "SAME":
                (t, b), (l, r) = (same_padding(op.inputs[0].shape[1 + i], attrs["window"][i], attrs["strides"][i], 1)
                                  for i in range(2))
                pads = [t, l, b, r]
            op_type = "MaxPool" if kind == "max_pool2d" else "AveragePool"
            y = self.node(op_type, [x], kind, kernel_shape=list(attrs["window"]), strides=list(attrs["strides"]), pads=pads)
            return self.produce(out, y, "nchw")
        if kind in ("mean", "sum", "reduce_max"):
            x, layout = self._any_layout(op.inputs[0])
            axes = [(_nchw_axis(a) if layout == "nchw" else a) for a in attrs["axes"]]
            keep = int(bool(attrs.get("keepdims", False)))
            if kind == "sum":
                y = self.node("ReduceSum", [x, self.init("axes", np.asarray(axes, np.int64))], kind, keepdims=keep)
            else:
                y = self.node("ReduceMean" if kind == "mean" else "ReduceMax", [x], kind, axes=axes, keepdims=keep)
            return self.produce(out, y, layout if keep else "nhwc")
        x = "" if kind == "concat" else self.get(op.inputs[0])  # concat reads all its inputs below
        source = self.stored.get(id(op.inputs[0]))
        if kind in SAME_QUANT and source is not None and out.quant is not None and \
                np.array_equal(source.scale, out.quant.scale):
            self.stored[id(out)] = source  # keep the relu output's uint8 form through layout ops
        if kind == "softmax":
            y = self.node("Softmax", [x], kind, axis=-1)
        elif kind == "pad":
            paddings = np.asarray(attrs["paddings"], np.int64)
            y = self.node("Pad", [x, self.init("pads", np.concatenate([paddings[:, 0], paddings[:, 1]]))], kind)
        elif kind == "reshape":
            y = self.node("Reshape", [x, self.init("shape", np.asarray(attrs["shape"], np.int64))], kind)
        elif kind == "transpose":
            y = self.node("Transpose", [x], kind, perm=list(attrs["perm"]))
        elif kind == "concat":
            y = self.node("Concat", [self.get(t) for t in op.inputs], kind, axis=int(attrs["axis"]))
        elif kind == "slice":
            axes = [a for a, size in enumerate(op.inputs[0].shape) if size >= 0]
            arrays = [np.asarray([attrs[k][a] for a in axes], np.int64) for k in ("begin", "end", "strides")]
            args = [self.init(k, a) for k, a in zip(("starts", "ends", "steps"), arrays)]
            y = self.node("Slice", [x, args[0], args[1], self.init("axes", np.asarray(axes, np.int64)), args[2]], kind)
        elif kind == "batch_matmul":
            other = self.get(op.inputs[1])
            if attrs.get("adj_y"):
                perm = list(range(len(op.inputs[1].shape)))
                perm[-1], perm[-2] = perm[-2], perm[-1]
                other = self.node("Transpose", [other], "adj_y", perm=perm)
            y = self.node("MatMul", [x, other], kind)
        else:
            raise ExportError(f"{op.where}: graph op {kind!r} has no ONNX translation")
        self.produce(out, y, "nhwc", op.activation)

    def _any_layout(self, tensor: Tensor) -> tuple[str, str]:
        layout = self.values[id(tensor)][1] if not tensor.is_constant else "nhwc"
        return self.get(tensor, layout), layout

    def _unary(self, kind: str, x: str, attrs) -> str:
        if kind in _UNARY:
            return self.node(_UNARY[kind], [x], kind)
        if kind == "relu6":
            return self._activation(x, "relu6")
        if kind == "square":
            return self.node("Mul", [x, x], kind)
        if kind == "erfc":
            return self.node("Sub", [self.init("one", np.float32(1)), self.node("Erf", [x], "erf")], kind)
        if kind == "rsqrt":
            return self.node("Reciprocal", [self.node("Sqrt", [x], "sqrt")], kind)
        # gelu, from its definition (opset 17 has no Gelu node)
        if attrs.get("approximate", False):
            cube = self.node("Mul", [x, self.node("Mul", [x, x], "sq")], "cube")
            inner = self.node("Add", [x, self.node("Mul", [cube, self.init("c", np.float32(0.044715))], "c3")], "in")
            t = self.node("Tanh", [self.node("Mul", [inner, self.init("k", np.float32(np.sqrt(2 / np.pi)))], "k")], "t")
        else:
            t = self.node("Erf", [self.node("Mul", [x, self.init("r", np.float32(1 / np.sqrt(2)))], "r")], "erf")
        one_plus = self.node("Add", [t, self.init("one", np.float32(1))], "one_plus")
        return self.node("Mul", [self.node("Mul", [x, one_plus], "x1"), self.init("half", np.float32(0.5))], kind)

    def _weights(self, op: Op, integer: bool, weight_data: np.ndarray, axis: int):
        weight = op.inputs[1]
        if weight.quant is None:
            return self.init(weight.name, weight_data.astype(np.float32))
        if integer or True:
            return self.dq_const(weight.name, weight_data.astype(np.int8), weight.quant.scale, axis)

    def _bias(self, op: Op, integer: bool) -> str:
        weight, channels = op.inputs[1], op.inputs[1].shape[0]
        bias = np.asarray(op.inputs[2].data, np.float64) if len(op.inputs) > 2 else np.zeros(channels)
        if not integer:
            return self.init(op.outputs[0].name + "_bias", bias.astype(np.float32))
        if weight.quant is None:
            raise ExportError(f"{op.where}: integer {op.kind} needs an int8 weight")
        scale = float(op.attrs["input_quant"].scale[0]) * np.broadcast_to(weight.quant.scale.astype(np.float64), (channels,))
        codes = np.round(bias / scale)
        if np.max(np.abs(codes), initial=0) >= 2**31:
            raise ExportError(f"{op.where}: {op.kind} bias overflows int32")
        return self.dq_const(op.outputs[0].name + "_bias", codes.astype(np.int32), scale, 0)

    def _conv(self, op: Op) -> None:
        x, weight, out = op.inputs[0], op.inputs[1], op.outputs[0]
        integer = "input_quant" in op.attrs and out.quant is not None
        x_name = self.get(x, "nchw", op.attrs["input_quant"] if integer else None)
        w = self._weights(op, integer, np.transpose(np.asarray(weight.data), (0, 3, 1, 2)), 0)
        (top, bottom), (left, right) = op.attrs["padding"]
        y = self.node("Conv", [x_name, w, self._bias(op, integer)], "conv", strides=list(op.attrs["strides"]),
                      dilations=list(op.attrs["dilation"]), pads=[top, left, bottom, right],
                      group=int(op.attrs.get("groups", 1)), kernel_shape=list(weight.shape[1:3]))
        self.produce(out, y, "nchw", op.activation)

    def _dense(self, op: Op) -> None:
        x, weight, out = op.inputs[0], op.inputs[1], op.outputs[0]
        integer = "input_quant" in op.attrs and out.quant is not None
        x_name = self.get(x, "nhwc", op.attrs["input_quant"] if integer else None)
        features = weight.shape[1]
        flat = len(x.shape) != 2
        if flat:
            x_name = self.node("Reshape", [x_name, self.init("shape", np.asarray([-1, features], np.int64))], "flat")
        if weight.quant is not None and not integer:
            y = self._dynamic_dense(op, x_name)
        else:
            w = self._weights(op, integer, np.asarray(weight.data), 0)
            y = self.node("Gemm", [x_name, w, self._bias(op, integer)], "gemm", transB=1)
        if flat:
            shape = np.asarray(list(x.shape[:-1]) + [weight.shape[0]], np.int64)
            y = self.node("Reshape", [y, self.init("shape", shape)], "unflat")
        self.produce(out, y, "nhwc", op.activation)

    def _dynamic_dense(self, op: Op, x_name: str) -> str:
        """Dynamic-range fully-connected, as `jaxcompress.compressed` runs it: each row of the
        activation quantized at run time to int8 codes in [-127, 127] with its own scale
        ``max|row| / 127`` (round half to even), an int8 x int8 ``MatMulInteger``, both scales on
        the int32 result. (``DynamicQuantizeLinear`` would share one scale over all rows, which
        costs a transformer's tokens most of their precision.)"""
        weight = op.inputs[1]
        if weight.quant is None:
            raise ExportError(f"{op.where}: dynamic-range {op.kind} needs an int8 weight")
        absmax = self.node("ReduceMax", [self.node("Abs", [x_name], "abs")], "absmax", axes=[1], keepdims=1)
        scale = self.node("Div", [self.node("Max", [absmax, self.init("tiny", np.float32(1e-30))], "nonzero"),
                                  self.init("qmax", np.float32(127))], "row_scale")
        rounded = self.node("Round", [self.node("Div", [x_name, scale], "scaled")], "rounded")
        # uint8 codes q + 128 with zero point 128 (the same values): the u8 x s8 kernel
        shifted = self.node("Add", [rounded, self.init("offset", np.float32(128))], "shifted")
        clipped = self.node("Clip", [shifted, self.init("lo", np.float32(1)), self.init("hi", np.float32(255))], "clip")
        codes = self.node("Cast", [clipped], "codes", to=TensorProto.UINT8)
        w_codes = self.init(weight.name, np.ascontiguousarray(np.asarray(weight.data, np.int8).T))
        acc = self.node("MatMulInteger", [codes, w_codes, self.init("x_zero", np.uint8(128))], "matmul_int")
        scaled = self.node("Mul", [self.node("Cast", [acc], "cast", to=TensorProto.FLOAT), scale], "x_scaled")
        w_scale = self.init(weight.name + "_scale", np.broadcast_to(weight.quant.scale, (weight.shape[0],)).astype(np.float32))
        y = self.node("Mul", [scaled, w_scale], "w_scaled")
        bias = np.asarray(op.inputs[2].data, np.float32) if len(op.inputs) > 2 else None
        return y if bias is None else self.node("Add", [y, self.init("bias", bias)], "bias")

    # ---- model -----------------------------------------------------------------------------------
    def finish(self, name: str) -> onnx.ModelProto:
        def info(tensor: Tensor, label: str):
            shape = ["batch" if d < 0 else d for d in tensor.shape]
            return helper.make_tensor_value_info(label, TensorProto.FLOAT, shape)

        inputs = []
        for k, tensor in enumerate(self.graph.inputs):
            label = f"input_{k}"
            inputs.append(info(tensor, label))
            self.values[id(tensor)] = (self.qdq(label, tensor.quant) if tensor.quant is not None else label, "nhwc")
        for op in self.graph.ops:
            self.write(op)
        outputs = []
        for k, tensor in enumerate(self.graph.outputs):
            label = f"output_{k}"
            self.nodes.append(helper.make_node("Identity", [self.get(tensor)], [label], name=self.fresh("out")))
            outputs.append(info(tensor, label))
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="jaxcompress")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def to_model(graph: Graph, name: str = "jaxcompress") -> onnx.ModelProto:
    """Translate ``graph`` to an ONNX ``ModelProto`` (QDQ where quantized)."""
    return _Writer(graph).finish(name)
