"""`benchmarks/shrink.py --quick` runs end to end and writes its JSON (timings reported, not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_shrink_benchmark_quick(tmp_path):
    out = tmp_path / "shrink.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "shrink.py"), "--quick", "--out", str(out)],
        cwd=tmp_path,  # the script must not depend on the working directory
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "speedup" in proc.stdout and "acc shrunk" in proc.stdout
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["batch"] == 64
    (row,) = data["results"]
    assert row["model"] == "cnn"
    # Exact consequences of removing half of every group: 32/64 filters and 128 hidden units -> half.
    assert row["shrunk_widths"] == {"features": [16, 32], "hidden": 64, "num_classes": 10}
    assert row["params_shrunk"] == 16 * 9 + 16 + 32 * 16 * 9 + 32 + 7 * 7 * 32 * 64 + 64 + 64 * 10 + 10
    assert row["flops_ratio"] > 3.0
    assert row["latency_ms_dense"] > 0 and row["latency_ms_shrunk"] > 0 and row["speedup"] > 0
