"""examples/minilm.py --quick runs end to end on the real all-MiniLM-L6-v2 and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

from examples.minilm import spearman
from tests.minilm import needs_minilm

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_spearman_matches_definition():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3], [3, 2, 1]) == -1.0
    # ties get average ranks: ranks (1.5, 1.5, 3) vs (1, 2, 3)
    assert abs(spearman([5, 5, 7], [1, 2, 3]) - 0.8660254) < 1e-6


@needs_minilm
def test_minilm_example_quick(tmp_path):
    out = tmp_path / "minilm.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "minilm.py"), "--quick", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert {"fp32", "rtn_w8a8", "rtn_w4g128"} <= set(rows)
    assert rows["fp32"]["cosine"] > 0.9999
    assert rows["rtn_w8a8"]["cosine"] > 0.99 and rows["rtn_w8a8"]["kernel_bytes"] < rows["fp32"]["kernel_bytes"] / 3
    for method in ("smoothquant_w8a8", "awq_w4g128"):
        assert method in rows or method in result["skipped"]
    if "smoothquant_w8a8" in rows:
        assert rows["smoothquant_w8a8"]["cosine"] > 0.99
    if "awq_w4g128" in rows:
        assert rows["awq_w4g128"]["cosine"] > 0.9
    for name, pairs in result["word_pairs"].items():  # needs the gensim wheel's test data
        for row in rows.values():
            assert pairs == 0 or -1.0 <= row[name] <= 1.0
    assert "| method" in proc.stdout
