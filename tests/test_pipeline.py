"""The demo pipeline end to end on a small subset: every stage runs and its invariants hold."""

import os
import shutil

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
            assert np.all(np.asarray(q.logical_values.astype(jnp.int8))[~np.asarray(mask)] == 0)
            checked += 1
    assert checked == 3  # Conv_1, Dense_0, Dense_1 (Conv_0 stays dense)


def test_export_reloads_and_matches(result):
    assert result["export"]["bytes"] > 0
    # the reloaded artifact, fed the params read back from the file, runs the same program as
    # jit(compressed(apply))(params, x) in process: bit-identical, no int8 code flips
    assert result["export"]["max_abs_difference"] == 0.0


def test_every_row_has_a_latency_spread_from_the_same_rounds(result):
    assert result["latency_repeats"] == {"b1": 2, "b256": 3}
    for row in result["rows"]:
        for batch in (1, 256):
            low, high = row[f"latency_iqr_ms_b{batch}"]
            assert 0 < low <= row[f"latency_ms_b{batch}"] <= high, row
    assert "no faster than the dense model" in format_table(result)


# ---- the output folder's lifecycle and the interleaved timing (no training: fast) ----------------

from jaxcompress.demo import pipeline as pipeline_module
from jaxcompress.demo.timing import Spread, interleaved_latency


def _fake_run(seen, fail=False):
    def run(config, data, out_dir):
        seen.append(out_dir)
        path = os.path.join(out_dir, "fp32.safetensors")
        with open(path, "wb") as f:
            f.write(b"x")
        if fail:
            raise RuntimeError("training diverged")
        return {"rows": [{"file": path}], "export": {"path": os.path.join(out_dir, "e.jaxexport")}, "out_dir": out_dir}
    return run


def test_default_temporary_folder_is_removed_after_the_run(monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline_module, "_run", _fake_run(seen))
    out = run_pipeline(PipelineConfig(progress=False))
    assert not os.path.exists(seen[0]) and out["out_dir"] is None
    assert out["rows"][0]["file"] is None and out["export"]["path"] is None


def test_keep_keeps_the_temporary_folder(monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline_module, "_run", _fake_run(seen))
    out = run_pipeline(PipelineConfig(progress=False, keep=True))
    try:
        assert out["out_dir"] == seen[0] and os.path.exists(out["rows"][0]["file"])
    finally:
        shutil.rmtree(seen[0])


@pytest.mark.parametrize("where", ["temporary", "new", "existing"])
def test_a_failed_run_removes_only_a_folder_it_created(monkeypatch, tmp_path, where):
    seen = []
    monkeypatch.setattr(pipeline_module, "_run", _fake_run(seen, fail=True))
    out_dir = {"temporary": None, "new": str(tmp_path / "new"), "existing": str(tmp_path)}[where]
    with pytest.raises(RuntimeError, match="diverged"):
        run_pipeline(PipelineConfig(progress=False, out_dir=out_dir))
    assert os.path.exists(seen[0]) == (where == "existing")


def test_interleaved_latency_times_every_variant_in_every_round_in_rotating_order():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    spreads = interleaved_latency(calls, repeats=4, warmup=1)
    timed = order[3:]  # after one warm-up call each
    rounds = [timed[i : i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a"]
    assert {name: s.repeats for name, s in spreads.items()} == {"a": 4, "b": 4, "c": 4}


def test_spread_is_the_median_and_quartiles_in_ms():
    seconds = list(np.random.default_rng(0).exponential(1e-3, size=37))
    spread = Spread.of(seconds)
    reference = np.percentile(np.asarray(seconds, np.float64) * 1e3, [25, 50, 75])
    np.testing.assert_allclose([spread.p25_ms, spread.median_ms, spread.p75_ms], reference, rtol=1e-12)
    assert spread.p25_ms <= spread.median_ms <= spread.p75_ms and spread.repeats == 37
