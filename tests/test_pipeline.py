"""The demo pipeline end to end on a small subset: every stage runs and its invariants hold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.checkpoint.safetensors_io import import_safetensors
from jaxcompress.demo.data import load_digits
from jaxcompress.demo.pipeline import PipelineConfig, format_table, run_pipeline


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    config = PipelineConfig(
        fp32_steps=40, prune_steps=40, qat_steps=20, sparsity=0.8, batch_size=64,
        latency_repeats=2, out_dir=str(tmp_path_factory.mktemp("demo")), progress=False,
    )
    return run_pipeline(config, data=load_digits())


def test_rows_and_sizes(result):
    names = [row["variant"] for row in result["rows"]]
    assert names[:4] == ["fp32", "PTQ int8", "pruned 80%", "pruned 80% + QAT int8"]
    by_name = {row["variant"]: row for row in result["rows"]}
    assert by_name["fp32"]["accuracy"] > 0.5  # 40 steps on digits already learn something
    assert by_name["PTQ int8"]["ratio"] > 3.5
    assert by_name["pruned 80% + QAT int8"]["ratio"] > by_name["PTQ int8"]["ratio"]
    assert abs(by_name["pruned 80%"]["sparsity"] - 0.8) < 0.01
    assert "pruned 80% + QAT int8" in format_table(result)


def test_runtime_rows_are_measured_in_litert_and_onnx_runtime(result):
    """The pruned + QAT int8 model as model.tflite / model.onnx, next to each runtime's float32
    file: a full-integer file about 4x smaller that classifies like the JAX integer model."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("onnxruntime")
    by_name = {row["variant"]: row for row in result["rows"]}
    jax_int8 = by_name["pruned 80% + QAT int8"]
    for runtime, suffix in (("LiteRT", "tflite"), ("ONNX Runtime", "onnx")):
        fp32, int8 = by_name[f"{runtime} fp32"], by_name[f"{runtime} pruned + QAT int8"]
        assert int8["file"].endswith(f"model.{suffix}") and fp32["file"].endswith(f"model_fp32.{suffix}")
        assert abs(fp32["accuracy"] - by_name["fp32"]["accuracy"]) < 0.005  # the same float model
        assert abs(int8["accuracy"] - jax_int8["accuracy"]) < 0.03
        # > 3x here: the digits CNN is small, so the files' fixed part weighs more (the demo's
        # Fashion-MNIST CNN: 3.92x, tests/export/test_export_cnn.py)
        assert int8["ratio"] > 3.0 and int8["latency_ms_b1"] > 0 and int8["latency_ms_b256"] > 0


def test_written_integer_model_keeps_pruned_zeros_and_reloads(result):
    row = {row["variant"]: row for row in result["rows"]}["pruned 80% + QAT int8"]
    params, masks = import_safetensors(row["file"])
    checked = 0
    for layer, leaves in params["params"].items():
        q, mask = leaves["kernel"], masks["params"][layer]["kernel"]
        assert isinstance(q, jc.QArray)
        if hasattr(mask, "shape"):
            assert np.all(np.asarray(q.values.astype(jnp.int8))[~np.asarray(mask)] == 0)
            checked += 1
    assert checked == 3  # Conv_1, Dense_0, Dense_1 (Conv_0 stays dense)


def test_export_reloads_and_matches(result):
    assert result["export"]["bytes"] > 0
    assert result["export"]["max_abs_difference"] < 1e-4
