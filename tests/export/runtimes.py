"""Run exported files in the real runtimes and inspect what they execute."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
WEIGHTED_TFLITE = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL")
FLOAT_ONNX = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")


def run_tflite(model: bytes | str, *inputs: np.ndarray) -> list[np.ndarray]:
    interpreter = Interpreter(model_content=model) if isinstance(model, bytes) else Interpreter(model_path=model)
    details = interpreter.get_input_details()
    for detail, x in zip(details, inputs):
        interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    for detail, x in zip(details, inputs):
        interpreter.set_tensor(detail["index"], np.ascontiguousarray(x, np.float32))
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def tflite_ops(model: bytes) -> list[tuple[str, list[str]]]:
    """``(op name, [input tensor types])`` of every operator of the flatbuffer."""
    parsed = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    graph = parsed.subgraphs[0]
    ops = []
    for op in graph.operators:
        code = parsed.operatorCodes[op.opcodeIndex]
        name = _NAMES[max(code.builtinCode, code.deprecatedBuiltinCode)]
        ops.append((name, [_TYPES[graph.tensors[i].type] if i >= 0 else None for i in op.inputs]))
    return ops


def session(model: bytes | str, optimized_path: str | None = None) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_onnx(model: bytes | str, *inputs: np.ndarray) -> list[np.ndarray]:
    sess = session(model)
    feeds = {i.name: np.ascontiguousarray(x, np.float32) for i, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)


def optimized_ops(model: bytes | str, tmp_path) -> list[str]:
    """Op types ONNX Runtime executes after its graph optimizations."""
    path = str(tmp_path / "optimized.onnx")
    session(model, path)
    return [node.op_type for node in onnx.load(path).graph.node]
