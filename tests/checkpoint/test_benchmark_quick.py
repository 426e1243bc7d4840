"""`benchmarks/checkpoint_size.py --quick` runs on the real MiniLM and meets the size goals."""

import json
import subprocess
import sys
from pathlib import Path

from tests.minilm import needs_minilm

REPO_ROOT = Path(__file__).resolve().parents[2]


@needs_minilm
def test_quick_benchmark(tmp_path):
    out = tmp_path / "checkpoint_size.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "checkpoint_size.py"), "--quick", "--out", str(out),
                           "--presets", "w8a8", "w4-g128-emb-row"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "peak RSS MiB" in proc.stdout
    data = json.loads(out.read_text())
    rows = {row["preset"]: row for row in data["results"]}
    assert data["source"]["largest_leaf"]["shape"] == [30522, 384]
    # exact byte counts: int8 per-channel ~4x, int4 g128 (per-row embedding tables) > 7.5x
    assert rows["w8a8"]["ratio"] >= 3.9
    assert rows["w4-g128-emb-row"]["ratio"] >= 7.5
    for row in rows.values():
        assert row["peak_rss_mib"] > row["imports_baseline_mib"] > 0
        assert row["over_warm_in_leaves"] < 2.0  # memory near one leaf, not the model (~2 leaves)
