"""`benchmarks/prune_step.py --quick` and `benchmarks/prune_accuracy.py --quick` run end to end
and write the JSON they document. Timings and accuracies are recorded, never asserted (shared
CPU, tiny quick runs); what is checked is what must hold whatever the machine: the structure,
the exact sparsities, and that the numbers are consistent with each other."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run(script: str, out: Path, tmp_path: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
        cwd=tmp_path,  # must not depend on the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_prune_step_quick(tmp_path):
    data, stdout = run("prune_step.py", tmp_path / "step.json", tmp_path)
    assert "ratio total" in stdout and "prune(adamw)" in stdout
    assert data["quick"] is True and data["model"]["params"] > 5_000_000
    assert data["rounds"] == len(data["per_round_s"]) == len(data["per_round_ratio"])
    rows = {row["variant"]: row for row in data["results"]}
    assert set(rows) == {"adamw", "prune(adamw)"} and rows["adamw"]["ratio"] == 1.0
    for row in rows.values():
        assert row["minor_page_faults_per_step"] >= 0 and row["xla_temp_mb"] > 0
    total = sum(r["prune(adamw)"] for r in data["per_round_s"]) / sum(r["adamw"] for r in data["per_round_s"])
    assert abs(total - data["ratio_total"]) < 1e-9 and data["goal_met"] == (data["ratio_total"] <= 1.05)
    assert data["single_step_s"]["mask_update"] > 0 and data["single_step_s"]["ordinary"] > 0
    # the pruned kernels really are pruned by the polynomial schedule (> 0 after a few updates)
    assert 0.0 < data["final_sparsity"]["total"] < 0.9


def test_prune_accuracy_quick(tmp_path):
    data, stdout = run("prune_accuracy.py", tmp_path / "acc.json", tmp_path)
    assert "test acc" in stdout
    assert data["quick"] is True and data["dataset"] in ("fashion-mnist", "sklearn-digits")
    rows = {(row["method"], row["target_sparsity"]): row for row in data["results"]}
    assert set(rows) == {("dense", 0.0), ("gradual", 0.9), ("one-shot+FT", 0.9), ("SET", 0.9), ("RigL", 0.9), ("2:4+FT", 0.5)}
    for (method, target), row in rows.items():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert abs(row["delta_vs_dense"] - (row["accuracy"] - rows[("dense", 0.0)]["accuracy"])) < 1e-12
        # measured on the params: exact zeros; at least the target, at most a few chance zeros more
        # (ERK rounds each layer to whole weights: the total may miss the target by < 1 weight
        # per layer; chance zeros, e.g. SET weights regrown into dead ReLU units, add a few)
        assert target - 1e-4 <= row["sparsity"] <= target + 0.005, (method, row["sparsity"])
    # a 10-class problem: every trained model is far better than chance
    assert all(row["accuracy"] > 0.3 for row in rows.values())
