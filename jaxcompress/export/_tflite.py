"""Write a `Graph` as a LiteRT / TensorFlow Lite flatbuffer (internal).

Written directly with the schema that ``ai-edge-litert`` ships (``schema_py_generated``, object
API) and ``flatbuffers``: no converter. The TFLite int8 spec: int8 activations with a scale and a
zero point, int8 symmetric per-output-channel weights in ``[-127, 127]`` (quantized dimension 0 for
``CONV_2D`` / ``FULLY_CONNECTED``, 3 for ``DEPTHWISE_CONV_2D``), int32 bias with scale
``input scale x weight scale`` and zero point 0, ``SOFTMAX`` / ``LOGISTIC`` outputs at scale 1/256
(zero point -128), ``TANH`` at 1/128, layout ops and pools with their input's quantization.

Every graph tensor is produced either as int8 (the op ran its integer kernel) or float32; a
consumer that wants the other form, or another quantization, gets a cached ``QUANTIZE`` /
``DEQUANTIZE`` (``QUANTIZE`` int8 -> int8 requantizes). So the model's float inputs pass through
``QUANTIZE``, its outputs through ``DEQUANTIZE``, and an op without an int8 kernel runs in float
inside the integer graph. A conv whose weight is int8 but whose input is float is TFLite's hybrid
(dynamic-range) kernel. A dynamic batch is ``-1`` in ``shape_signature``.
"""

from __future__ import annotations

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from jaxcompress.export._graph import FIXED_OUTPUT_QUANT, ExportError, Graph, Op, Quant, Tensor

__all__ = ["to_flatbuffer", "INT8_KINDS", "same_padding"]

_TYPES = {np.dtype(np.float32): schema.TensorType.FLOAT32, np.dtype(np.int8): schema.TensorType.INT8,
          np.dtype(np.int32): schema.TensorType.INT32, np.dtype(np.int64): schema.TensorType.INT64}
_ACTIVATIONS = {None: schema.ActivationFunctionType.NONE, "relu": schema.ActivationFunctionType.RELU,
                "relu6": schema.ActivationFunctionType.RELU6}
_B = schema.BuiltinOperator
_UNARY = {"relu": _B.RELU, "relu6": _B.RELU6, "logistic": _B.LOGISTIC, "tanh": _B.TANH, "hard_swish": _B.HARD_SWISH,
          "exp": _B.EXP, "rsqrt": _B.RSQRT, "sqrt": _B.SQRT, "neg": _B.NEG, "abs": _B.ABS, "square": _B.SQUARE}
_BINARY = {"add": (_B.ADD, "AddOptions"), "sub": (_B.SUB, "SubOptions"), "mul": (_B.MUL, "MulOptions"),
           "div": (_B.DIV, "DivOptions"), "maximum": (_B.MAXIMUM, None), "minimum": (_B.MINIMUM, None)}
_REDUCE = {"mean": _B.MEAN, "sum": _B.SUM, "reduce_max": _B.REDUCE_MAX}
# graph kinds whose TFLite kernels run on int8 activations
INT8_KINDS = frozenset({
    "conv2d", "fully_connected", "batch_matmul", "add", "sub", "mul", "maximum", "minimum", "relu", "relu6",
    "logistic", "tanh", "hard_swish", "gelu", "softmax", "max_pool2d", "avg_pool2d", "mean", "reduce_max",
    "pad", "reshape", "transpose", "concat", "slice",
})
# the first version of each builtin with int8 kernels (the runtime looks kernels up by version)
_INT8_VERSIONS = {
    _B.CONV_2D: 3, _B.DEPTHWISE_CONV_2D: 3, _B.FULLY_CONNECTED: 4, _B.ADD: 2, _B.SUB: 2, _B.MUL: 2, _B.SOFTMAX: 2,
    _B.LOGISTIC: 2, _B.TANH: 2, _B.MAX_POOL_2D: 2, _B.AVERAGE_POOL_2D: 2, _B.MEAN: 2, _B.PAD: 2, _B.TRANSPOSE: 2,
    _B.CONCATENATION: 2, _B.STRIDED_SLICE: 2, _B.QUANTIZE: 2, _B.DEQUANTIZE: 2, _B.MAXIMUM: 2, _B.MINIMUM: 2,
    _B.RELU: 2, _B.RELU6: 2, _B.REDUCE_MAX: 2, _B.BATCH_MATMUL: 2,
}
_SAME_AS_INPUT = ("reshape", "transpose", "max_pool2d", "avg_pool2d", "pad", "slice", "concat", "relu", "relu6",
                  "reduce_max")


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """The (before, after) padding of TFLite's / JAX's ``SAME`` for one spatial axis."""
    effective = (kernel - 1) * dilation + 1
    total = max((-(-size // stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _quant_params(quant: Quant | None, axis: int | None = None):
    if quant is None:
        return None
    params = schema.QuantizationParametersT()
    params.scale = [float(s) for s in quant.scale]
    params.zeroPoint = [int(z) for z in quant.zero_point]
    params.quantizedDimension = int(axis if axis is not None else (quant.axis or 0))
    return params


class _Writer:
    def __init__(self, graph: Graph, name: str):
        self.graph, self.name = graph, name
        self.tensors: list = []
        self.buffers = [schema.BufferT()]
        self.codes: dict[tuple[int, int], int] = {}
        self.operators: list = []
        self.produced: dict[int, tuple[int, Quant | None]] = {}
        self.cache: dict[tuple, int] = {}

    # ---- tensors -------------------------------------------------------------------------------
    def _tensor(self, name, shape, dtype, quant=None, data=None, axis=None) -> int:
        tensor = schema.TensorT()
        tensor.name = name
        shape = [int(d) for d in shape]
        tensor.shape = [1 if d < 0 else d for d in shape]
        if any(d < 0 for d in shape):
            tensor.shapeSignature = shape
        tensor.type = _TYPES[np.dtype(dtype)]
        tensor.quantization = _quant_params(quant, axis)
        if data is not None:
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data, dtype).tobytes(), np.uint8)
            self.buffers.append(buffer)
            tensor.buffer = len(self.buffers) - 1
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def const(self, name, data, dtype, quant=None, axis=None) -> int:
        data = np.asarray(data, dtype)
        return self._tensor(name, data.shape, dtype, quant, data, axis)

    def value(self, tensor: Tensor, want: Quant | None) -> int:
        """Index of ``tensor`` as float32 (``want=None``) or int8 quantized with ``want``."""
        if tensor.is_constant:
            key = (id(tensor), None if want is None else (tuple(want.scale), tuple(want.zero_point)))
            if key not in self.cache:
                data = np.asarray(tensor.data, np.float64)
                if want is None:
                    self.cache[key] = self.const(tensor.name, data, np.float32)
                else:
                    codes = np.clip(np.round(data / want.scale[0]) + want.zero_point[0], -128, 127)
                    self.cache[key] = self.const(tensor.name, codes, np.int8, want)
            return self.cache[key]
        index, have = self.produced[id(tensor)]
        if (want is None and have is None) or (want is not None and want.same(have)):
            return index
        key = (id(tensor), None if want is None else (tuple(want.scale), tuple(want.zero_point)))
        if key not in self.cache:
            if want is None:
                out = self._tensor(tensor.name + "/dequantized", tensor.shape, np.float32)
                self.operator(_B.DEQUANTIZE, [index], [out], version=2)
            else:
                out = self._tensor(tensor.name + "/quantized", tensor.shape, np.int8, want)
                self.operator(_B.QUANTIZE, [index], [out], version=2)
            self.cache[key] = out
        return self.cache[key]

    def output(self, tensor: Tensor, quant: Quant | None) -> int:
        index = self._tensor(tensor.name, tensor.shape, np.int8 if quant is not None else np.float32, quant)
        self.produced[id(tensor)] = (index, quant)
        return index

    # ---- operators -----------------------------------------------------------------------------
    def operator(self, code: int, inputs, outputs, options=None, options_name=None, version=1) -> None:
        if version > 1:  # an int8 (or hybrid) kernel
            version = _INT8_VERSIONS.get(code, 1) if version == 2 else version
        key = (code, version)
        if key not in self.codes:
            self.codes[key] = len(self.codes)
        op = schema.OperatorT()
        op.opcodeIndex = self.codes[key]
        op.inputs, op.outputs = [int(i) for i in inputs], [int(o) for o in outputs]
        if options is not None:
            op.builtinOptionsType = getattr(schema.BuiltinOptions, options_name)
            op.builtinOptions = options
        self.operators.append(op)

    def write_op(self, op: Op) -> None:
        out = op.outputs[0]
        activations = [t for t in op.inputs if not t.is_constant]
        integer = (
            op.kind in INT8_KINDS and out.quant is not None and all(t.quant is not None for t in activations)
        )
        out_quant = None
        if integer:
            out_quant = out.quant
            if op.kind in FIXED_OUTPUT_QUANT:
                out_quant = Quant(*FIXED_OUTPUT_QUANT[op.kind])
        if op.kind in ("conv2d", "fully_connected"):
            # a float weight (a kernel the rules left unquantized) runs the float kernel in the int8 graph
            integer = integer and op.inputs[1].quant is not None and "input_quant" in op.attrs
            return self._weighted(op, integer, out_quant if integer else None)
        if integer and op.kind in _SAME_AS_INPUT:
            inputs = [self.value(t, out_quant) if not t.is_constant else t for t in op.inputs]
        else:
            inputs = [self.value(t, t.quant if integer else None) if not t.is_constant else t for t in op.inputs]
        self._simple(op, inputs, out_quant)

    def _int_attr(self, name, values) -> int:
        return self.const(name, np.asarray(values, np.int32), np.int32)

    def _weighted(self, op: Op, integer: bool, out_quant: Quant | None) -> None:
        x, weight = op.inputs[0], op.inputs[1]
        bias = op.inputs[2].data if len(op.inputs) > 2 else None
        out_channels = weight.shape[0]
        bias = np.zeros(out_channels) if bias is None else np.asarray(bias, np.float64)
        quantized_weight = weight.quant is not None
        in_quant = op.attrs.get("input_quant", x.quant) if integer else None
        x_index = self.value(x, in_quant)
        if op.kind == "conv2d":
            x_index = self._explicit_pad(op, x, x_index, in_quant)
        weight_data = np.asarray(weight.data)
        depthwise = op.kind == "conv2d" and op.attrs.get("groups", 1) > 1 and weight.shape[3] == 1 \
            and op.attrs["groups"] == x.shape[3]
        axis = 0
        if depthwise:
            weight_data = np.transpose(weight_data, (3, 1, 2, 0))
            axis = 3
        if quantized_weight:
            w_index = self.const(weight.name, weight_data, np.int8, weight.quant, axis)
        else:
            w_index = self.const(weight.name, weight_data, np.float32)
        if integer:
            if in_quant is None or weight.quant is None:
                raise ExportError(f"{op.where}: integer {op.kind} needs a quantized input and int8 weight")
            bias_scale = in_quant.scale[0].astype(np.float64) * weight.quant.scale.astype(np.float64)
            bias_scale = np.broadcast_to(bias_scale, (out_channels,))
            codes = np.round(bias / bias_scale)
            if np.max(np.abs(codes), initial=0) >= 2**31:
                raise ExportError(f"{op.where}: {op.kind} bias overflows int32 at scale {bias_scale.min():.3g}")
            b_index = self.const(op.outputs[0].name + "/bias", codes, np.int32, Quant(bias_scale, np.zeros(out_channels)))
        else:
            b_index = self.const(op.outputs[0].name + "/bias", bias, np.float32)
        o_index = self.output(op.outputs[0], out_quant)
        fused = _ACTIVATIONS[op.activation]
        version = 3 if integer else (2 if quantized_weight else 1)
        if op.kind == "fully_connected":
            options = schema.FullyConnectedOptionsT()
            options.fusedActivationFunction = fused
            options.keepNumDims = len(x.shape) > 2
            options.asymmetricQuantizeInputs = quantized_weight and not integer
            return self.operator(_B.FULLY_CONNECTED, [x_index, w_index, b_index], [o_index], options,
                                 "FullyConnectedOptions", version=4 if integer else version)
        (stride_h, stride_w), (dil_h, dil_w) = op.attrs["strides"], op.attrs["dilation"]
        padding = op.attrs["_tflite_padding"]
        if depthwise:
            options = schema.DepthwiseConv2DOptionsT()
            options.depthMultiplier = out_channels // x.shape[3]
        else:
            options = schema.Conv2DOptionsT()
        options.padding, options.strideH, options.strideW = padding, stride_h, stride_w
        options.dilationHFactor, options.dilationWFactor = dil_h, dil_w
        options.fusedActivationFunction = fused
        if depthwise:
            self.operator(_B.DEPTHWISE_CONV_2D, [x_index, w_index, b_index], [o_index], options,
                          "DepthwiseConv2DOptions", version=version)
        else:
            self.operator(_B.CONV_2D, [x_index, w_index, b_index], [o_index], options, "Conv2DOptions", version=version)

    def _explicit_pad(self, op: Op, x: Tensor, x_index: int, quant: Quant | None) -> int:
        """Map explicit conv padding to SAME / VALID, or a PAD op then VALID."""
        (top, bottom), (left, right) = op.attrs["padding"]
        weight = op.inputs[1]
        sizes = [same_padding(x.shape[1 + i], weight.shape[1 + i], op.attrs["strides"][i], op.attrs["dilation"][i])
                 for i in range(2)]
        if sizes == [(top, bottom), (left, right)]:
            op.attrs["_tflite_padding"] = schema.Padding.SAME
            return x_index
        op.attrs["_tflite_padding"] = schema.Padding.VALID
        if top == bottom == left == right == 0:
            return x_index
        if min(top, bottom, left, right) < 0:
            raise ExportError(f"{op.where}: negative conv padding {op.attrs['padding']} is not supported")
        shape = (x.shape[0], x.shape[1] + top + bottom, x.shape[2] + left + right, x.shape[3])
        out = self._tensor(x.name + "/padded", shape, np.int8 if quant is not None else np.float32, quant)
        paddings = self._int_attr(x.name + "/paddings", [[0, 0], [top, bottom], [left, right], [0, 0]])
        self.operator(_B.PAD, [x_index, paddings], [out], schema.PadOptionsT(), "PadOptions", version=2 if quant else 1)
        return out

    def _simple(self, op: Op, inputs, out_quant: Quant | None) -> None:
        kind, attrs = op.kind, op.attrs
        version = 2 if out_quant is not None else 1
        # constants (e.g. the other operand of an add) are quantized like the output / kept float
        idx = [i if isinstance(i, (int, np.integer)) else self.value(i, self._const_quant(i, out_quant))
               for i in inputs]
        o = lambda: self.output(op.outputs[0], out_quant)  # noqa: E731  (outputs after inputs)
        if kind in _UNARY:
            return self.operator(_UNARY[kind], idx, [o()], version=version)
        if kind in _BINARY:
            code, options_name = _BINARY[kind]
            options = None
            if options_name is not None:
                options = getattr(schema, options_name + "T")()
                options.fusedActivationFunction = _ACTIVATIONS[op.activation]
            elif op.activation is not None:
                raise ExportError(f"{op.where}: {kind} cannot carry a fused {op.activation}")
            name = options_name or "MaximumMinimumOptions"
            return self.operator(code, idx, [o()], options or schema.MaximumMinimumOptionsT(), name, version=version)
        if kind == "gelu":
            options = schema.GeluOptionsT()
            options.approximate = bool(attrs.get("approximate", False))
            return self.operator(_B.GELU, idx, [o()], options, "GeluOptions", version=version)
        if kind == "softmax":
            options = schema.SoftmaxOptionsT()
            options.beta = 1.0
            return self.operator(_B.SOFTMAX, idx, [o()], options, "SoftmaxOptions", version=version)
        if kind in ("max_pool2d", "avg_pool2d"):
            options = schema.Pool2DOptionsT()
            options.filterHeight, options.filterWidth = attrs["window"]
            options.strideH, options.strideW = attrs["strides"]
            options.padding = schema.Padding.SAME if attrs.get("padding", "VALID") == "SAME" else schema.Padding.VALID
            code = _B.MAX_POOL_2D if kind == "max_pool2d" else _B.AVERAGE_POOL_2D
            return self.operator(code, idx, [o()], options, "Pool2DOptions", version=version)
        if kind in _REDUCE:
            options = schema.ReducerOptionsT()
            options.keepDims = bool(attrs.get("keepdims", False))
            axes = self._int_attr(op.outputs[0].name + "/axes", attrs["axes"])
            return self.operator(_REDUCE[kind], [idx[0], axes], [o()], options, "ReducerOptions", version=version)
        if kind == "pad":
            paddings = self._int_attr(op.outputs[0].name + "/paddings", attrs["paddings"])
            return self.operator(_B.PAD, [idx[0], paddings], [o()], schema.PadOptionsT(), "PadOptions", version=version)
        if kind == "reshape":
            options = schema.ReshapeOptionsT()
            options.newShape = [int(d) for d in attrs["shape"]]
            shape = self._int_attr(op.outputs[0].name + "/shape", attrs["shape"])
            return self.operator(_B.RESHAPE, [idx[0], shape], [o()], options, "ReshapeOptions")
        if kind == "transpose":
            perm = self._int_attr(op.outputs[0].name + "/perm", attrs["perm"])
            return self.operator(_B.TRANSPOSE, [idx[0], perm], [o()], schema.TransposeOptionsT(), "TransposeOptions",
                                 version=version)
        if kind == "concat":
            options = schema.ConcatenationOptionsT()
            options.axis = int(attrs["axis"])
            return self.operator(_B.CONCATENATION, idx, [o()], options, "ConcatenationOptions", version=version)
        if kind == "slice":
            return self._slice(op, idx, o, version)
        if kind == "batch_matmul":
            options = schema.BatchMatMulOptionsT()
            options.adjY = bool(attrs.get("adj_y", False))
            return self.operator(_B.BATCH_MATMUL, idx, [o()], options, "BatchMatMulOptions", version=version)
        raise ExportError(f"{op.where}: graph op {kind!r} has no LiteRT translation")

    def _const_quant(self, tensor: Tensor, out_quant: Quant | None) -> Quant | None:
        if out_quant is None or tensor.data is None:
            return None
        return Quant.from_range(float(np.min(tensor.data)), float(np.max(tensor.data)))

    def _slice(self, op: Op, idx, o, version) -> None:
        x = op.inputs[0]
        begin, end, strides = (list(op.attrs[k]) for k in ("begin", "end", "strides"))
        begin_mask = end_mask = 0
        for axis, size in enumerate(x.shape):
            if size < 0:  # the dynamic batch: always whole
                begin_mask |= 1 << axis
                end_mask |= 1 << axis
                begin[axis], end[axis], strides[axis] = 0, 0, 1
        options = schema.StridedSliceOptionsT()
        options.beginMask, options.endMask = begin_mask, end_mask
        name = op.outputs[0].name
        args = [self._int_attr(name + "/" + k, v) for k, v in (("begin", begin), ("end", end), ("strides", strides))]
        self.operator(_B.STRIDED_SLICE, [idx[0]] + args, [o()], options, "StridedSliceOptions", version=version)

    # ---- model ----------------------------------------------------------------------------------
    def finish(self) -> bytes:
        inputs = []
        for tensor in self.graph.inputs:
            inputs.append(self.output(tensor, None))
        for op in self.graph.ops:
            self.write_op(op)
        outputs = [self.value(t, None) for t in self.graph.outputs]
        subgraph = schema.SubGraphT()
        subgraph.tensors, subgraph.inputs, subgraph.outputs = self.tensors, inputs, outputs
        subgraph.operators, subgraph.name = self.operators, "main"
        model = schema.ModelT()
        model.version, model.description = 3, self.name
        codes = []
        for (code, version), _ in sorted(self.codes.items(), key=lambda item: item[1]):
            entry = schema.OperatorCodeT()
            entry.builtinCode, entry.deprecatedBuiltinCode, entry.version = code, min(code, 127), version
            codes.append(entry)
        model.operatorCodes, model.subgraphs, model.buffers = codes, [subgraph], self.buffers
        signature = schema.SignatureDefT()
        signature.signatureKey, signature.subgraphIndex = "serving_default", 0
        signature.inputs = [self._tensor_map(t.name, i) for t, i in zip(self.graph.inputs, inputs)]
        signature.outputs = [self._tensor_map(f"output_{k}", i) for k, i in enumerate(outputs)]
        model.signatureDefs = [signature]
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    @staticmethod
    def _tensor_map(name, index):
        entry = schema.TensorMapT()
        entry.name, entry.tensorIndex = name, index
        return entry


def to_flatbuffer(graph: Graph, name: str = "jaxcompress") -> bytes:
    """Serialize ``graph`` as a ``.tflite`` flatbuffer (bytes)."""
    return _Writer(graph, name).finish()
