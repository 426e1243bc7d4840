"""The demo's LiteRT and ONNX Runtime rows: the pruned + QAT integer model and the float32 model
written as ``model.tflite`` / ``model.onnx`` (and ``model_fp32.*``) and run in those runtimes."""

from __future__ import annotations

import os
from typing import Any, Callable

import flax.linen as nn
import numpy as np

__all__ = ["runtime_rows_and_calls"]


def runtime_rows_and_calls(model: nn.Module, fp32: Any, converted: Any, train_x: np.ndarray, test_x: np.ndarray,
                  test_y: np.ndarray, out_dir: str, label: str) -> tuple[list[dict[str, Any]], list[dict[int, Callable[[], object]]]]:
    """``model.tflite`` / ``model.onnx`` of the pruned + QAT integer model (full-integer where the
    QAT activations are static) next to the float32 files, measured IN LiteRT and ONNX Runtime:
    accuracy on the test images and file bytes, plus each file's forward pass at batch 1 / 256
    for the interleaved timing. A runtime that is not installed is skipped, saying so."""
    import importlib.util

    from jaxcompress.export import evaluate_file, to_onnx, to_tflite
    from jaxcompress.export._measure import load_runner

    calibration = [train_x[i * 256 : (i + 1) * 256] for i in range(min(4, max(1, len(train_x) // 256)))]
    sample = test_x[:1]
    writers: list[tuple[str, Callable[..., str], str]] = []
    if importlib.util.find_spec("ai_edge_litert") is not None:
        writers.append(("LiteRT", to_tflite, "tflite"))
    else:
        print("  ai-edge-litert is not installed: no LiteRT rows (pip install 'jaxcompress[litert]')", flush=True)
    if importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None:
        writers.append(("ONNX Runtime", to_onnx, "onnx"))
    else:
        print("  onnx / onnxruntime are not installed: no ONNX rows (pip install 'jaxcompress[onnx]')", flush=True)
    rows: list[dict[str, Any]] = []
    calls: list[dict[int, Callable[[], object]]] = []
    for runtime, write, suffix in writers:
        options: dict[str, Any]
        for name, tree, filename, options in (
            (f"{runtime} fp32", fp32, f"model_fp32.{suffix}", {}),
            (f"{runtime} pruned + QAT {label}", converted, f"model.{suffix}", {"calibration": calibration}),
        ):
            path = write(model.apply, tree, sample, path=os.path.join(out_dir, filename), **options)
            report = evaluate_file(path, test_x, test_y, batch_sizes=(), threads=os.cpu_count())
            rows.append({
                "variant": name,
                "accuracy": report.accuracy,
                "file": path,
                "bytes": report.bytes,
                "sparsity": None,
                "runtime": runtime,
            })
            run = load_runner(path, threads=os.cpu_count())
            inputs = {batch: np.resize(test_x, (batch,) + test_x.shape[1:]).astype(np.float32) for batch in (1, 256)}
            calls.append({batch: _bound(run, x) for batch, x in inputs.items()})
        baseline = rows[-2]["bytes"]  # the same runtime's float32 file
        for row in rows[-2:]:
            row["ratio"] = baseline / row["bytes"]
    return rows, calls


def _bound(run: Callable[..., np.ndarray], x: np.ndarray) -> Callable[[], object]:
    return lambda: run(x)
