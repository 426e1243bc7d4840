"""`benchmarks/cnn_speed.py --quick` runs end to end and writes the JSON (speed is reported, never
asserted: the CPU is shared). Checked: every model / batch / variant ran, the integer variants
stay close to the float model, and the ``auto`` site report covers every quantized kernel."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_cnn_speed_quick_writes_json(tmp_path):
    out = tmp_path / "cnn.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "cnn_speed.py"), "--quick", "--batches", "2", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x f32" in proc.stdout
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["environment"]
    rows = {(row["model"], row["batch"], row["variant"]): row for row in data["results"]}
    for model in ("demo", "mnist", "mobilenet"):
        for variant in ("f32", "rule", "auto", "measure"):
            row = rows[(model, 2, variant)]
            assert row["speedup"] > 0 and len(row["runs_s"]) == data["rounds"]
            assert row["max_abs_diff"] < 0.5  # int8 noise on random-init logits, not a wrong program
        sites = data["sites"][f"{model}@2"]
        assert sites["auto"] and len(sites["auto"]) == len(sites["measure"])
        assert {site["chosen"] for site in sites["auto"]} <= {"integer", "integer_depthwise", "weight_only", "weight_only_depthwise"}
    assert any(site["chosen"] == "integer_depthwise" for site in data["sites"]["mobilenet@2"]["auto"])
