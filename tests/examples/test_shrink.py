"""examples/shrink.py --quick runs end to end: the residual network is pruned and shrunk twice."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_shrink_example_quick(tmp_path):
    out = tmp_path / "shrink.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "shrink.py"), "--quick", "--model", "resnet", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["model"] == "resnet" and result["quick"] is True
    # 50% of every group in two rounds: 32 -> 23 -> 16 channels, the residual group as one.
    assert row["shrunk_widths"]["stem"] == 16 and list(row["shrunk_widths"]["inner"]) == [16, 16]
    assert [r["widths"]["stem"] for r in row["rounds"]] == [23, 16]
    assert row["params_shrunk"] < 0.3 * row["params_dense"]
    assert row["flops_shrunk"] < 0.3 * row["flops_dense"]
    assert 0.0 <= row["accuracy_shrunk"] <= 1.0 and row["latency_ms_shrunk"] > 0
