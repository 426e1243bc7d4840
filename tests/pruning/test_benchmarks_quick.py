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
    assert "prune(adamw) / adamw: total" in stdout and "CPU:" in stdout
    assert data["quick"] is True and data["cpu_model"]
    # JaxPruner runs side by side when installed; otherwise the benchmark says it skipped it
    assert data["jaxpruner"].startswith("jaxpruner")
    assert data["jaxpruner"] in stdout
    assert set(data["models"]) == {"mlp", "cnn"}
    assert data["models"]["mlp"]["params"] > 5_000_000 and data["models"]["cnn"]["params"] > 1_000_000
    for model in data["models"].values():
        assert data["rounds"] == len(model["per_round_s"]) == len(model["per_round_ratio"])
        rows = {row["variant"]: row for row in model["results"]}
        assert {"adamw", "prune(adamw)"} <= set(rows) and rows["adamw"]["ratio_total"] == 1.0
        for row in rows.values():
            assert row["minor_page_faults_per_step"] >= 0 and row["xla_temp_mb"] > 0
        total = sum(r["prune(adamw)"] for r in model["per_round_s"]) / sum(r["adamw"] for r in model["per_round_s"])
        assert abs(total - model["ratio_total"]) < 1e-9 and model["goal_met"] == (model["ratio_total"] <= 1.05)
        single = model["single_step_s"]["prune(adamw)"]
        assert single["mask_update_s"] > 0 and single["ordinary_s"] > 0
        # the pruned kernels really are pruned by the polynomial schedule (> 0 after a few updates)
        assert 0.0 < rows["prune(adamw)"]["final_sparsity"] < 0.9
        # the masking floor keeps its fixed 90% masks, side by side in the same rounds
        assert abs(rows["masking floor"]["final_sparsity"] - 0.9) < 0.01
        floor = sum(r["prune(adamw)"] for r in model["per_round_s"]) / sum(r["masking floor"] for r in model["per_round_s"])
        assert abs(floor - model["ratio_to_floor"]) < 1e-9
        # the mask computation adds no temporary buffer to the compiled step (measured, not timed):
        # the only extra is the masks packed to bits for the step's three uses (1/8 byte a weight)
        bits_mb = model["pruned_weights"] / 8 / 1e6
        assert rows["prune(adamw)"]["xla_temp_mb"] <= rows["adamw"]["xla_temp_mb"] + bits_mb + 0.5


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
