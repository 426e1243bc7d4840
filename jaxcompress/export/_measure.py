"""Run an exported file in its own runtime: accuracy, size, latency (internal; `evaluate_file`).

``.tflite`` files run in ``ai_edge_litert.interpreter.Interpreter`` (XNNPACK, its default CPU
delegate), ``.onnx`` files in an ``onnxruntime.InferenceSession`` on the CPU provider with all
graph optimizations (where QDQ pairs become ``QLinearConv`` / ``QGemm``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import numpy as np

__all__ = ["load_runner", "evaluate_file", "FileReport"]


def load_runner(path: str | os.PathLike, threads: int | None = None) -> Callable[..., np.ndarray]:
    """A function ``run(*inputs)`` returning the file's first output for float32 inputs (any
    batch size); ``threads`` (default: the runtime's own default) sets the CPU threads."""
    path = os.fspath(path)
    if path.endswith(".tflite"):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path, num_threads=threads)
        indices = [detail["index"] for detail in interpreter.get_input_details()]
        output = interpreter.get_output_details()[0]["index"]
        shapes = [None]

        def run_tflite(*inputs):
            inputs = [np.ascontiguousarray(x, np.float32) for x in inputs]
            if shapes[0] != [x.shape for x in inputs]:
                for index, x in zip(indices, inputs):
                    interpreter.resize_tensor_input(index, x.shape)
                interpreter.allocate_tensors()
                shapes[0] = [x.shape for x in inputs]
            for index, x in zip(indices, inputs):
                interpreter.set_tensor(index, x)
            interpreter.invoke()
            return interpreter.get_tensor(output)

        return run_tflite
    if path.endswith(".onnx"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *inputs: session.run(None, {n: np.ascontiguousarray(x, np.float32) for n, x in zip(names, inputs)})[0]
    raise ValueError(f"{path}: expected a .tflite or .onnx file")


@dataclasses.dataclass(frozen=True)
class FileReport:
    """What `evaluate_file` measured: the file, its bytes, top-1 accuracy, median latencies (ms)."""

    path: str
    bytes: int
    accuracy: float
    latency_ms: dict


def evaluate_file(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_sizes: tuple[int, ...] = (1, 256),
    repeats: int = 20,
    threads: int | None = None,
) -> FileReport:
    """Top-1 accuracy of the exported classifier on ``images`` and its median latency at each
    batch size, run in the file's own runtime (see the module docs).

    >>> import tempfile, os, jax, numpy as np, flax.linen as nn
    >>> from jaxcompress.export import to_onnx
    >>> x = np.ones((2, 4), np.float32)
    >>> model = nn.Dense(3)
    >>> path = to_onnx(model.apply, model.init(jax.random.key(0), x), x,
    ...                path=os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> report = evaluate_file(path, x, np.zeros(2, int), batch_sizes=(1,), repeats=2)
    >>> sorted(report.latency_ms)
    [1]
    """
    run = load_runner(path, threads)
    correct = 0
    for start in range(0, len(images), 256):
        correct += int(np.sum(np.argmax(run(images[start : start + 256]), -1) == labels[start : start + 256]))
    latency = {}
    for batch in batch_sizes:
        x = np.resize(images, (batch,) + images.shape[1:]).astype(np.float32)
        run(x)
        times = []
        for _ in range(max(1, repeats if batch < 64 else max(3, repeats // 4))):
            began = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - began)
        latency[batch] = 1e3 * float(np.median(times))
    return FileReport(os.fspath(path), os.path.getsize(path), correct / max(1, len(images)), latency)
