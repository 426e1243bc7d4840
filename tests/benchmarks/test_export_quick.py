"""`benchmarks/export.py --quick` runs end to end and writes its JSON (timings reported, never
asserted: the CPU is shared); sizes, accuracies and agreement are checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_export_quick_writes_json(tmp_path):
    out = tmp_path / "export.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "export.py"), "--quick", "--models", "cnn", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LiteRT int8" in proc.stdout and "b256 vs fp32" in proc.stdout
    data = json.loads(out.read_text())
    assert data["quick"] is True
    rows = {row["variant"]: row for row in data["results"]}
    assert set(rows) == {"JAX fp32", "JAX compressed int8", "LiteRT fp32", "LiteRT int8", "ORT fp32", "ORT int8"}
    for row in rows.values():
        assert row["b1_ms"] > 0 and row["b256_ms"] > 0
    for variant in ("LiteRT int8", "ORT int8"):
        assert rows[variant]["size_ratio"] >= 3.9  # dense int8 weights + int32 biases vs float32
        assert rows[variant]["agree_1step"] >= 0.99 and rows[variant]["top1_agree"] >= 0.99
        assert abs(rows[variant]["accuracy_delta_pt"]) <= 1.0
    for variant in ("LiteRT fp32", "ORT fp32"):
        assert abs(rows[variant]["accuracy"] - rows["JAX fp32"]["accuracy"]) <= 0.002
