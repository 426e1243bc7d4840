"""examples/fashion_mnist.py --quick runs end to end and writes its results JSON."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_fashion_mnist_example_quick(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "fashion_mnist.py"), "--quick", "--no-progress",
         "--sparsity", "0.5", "--out", str(out), "--artifacts", str(tmp_path / "artifacts")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert {"fp32", "PTQ int8", "pruned 50%", "pruned 50% + QAT int8"} <= set(rows)
    assert result["test_images"] == 1000 and result["config"]["sparsity"] == 0.5
    assert abs(rows["pruned 50%"]["sparsity"] - 0.5) < 0.01
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["bytes"] == Path(row["file"]).stat().st_size
    assert result["export"]["max_abs_difference"] < 1e-4
