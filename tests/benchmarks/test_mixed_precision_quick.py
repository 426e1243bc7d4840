"""`benchmarks/mixed_precision.py --quick` runs end to end (the quick tiny LM; two MiniLM layers when
installed) and writes its JSON: exact sizes (never above uniform int4 g128), the proxies' rank
correlations with the end-to-end measure, and the forward-pass counts of each sensitivity."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_mixed_precision_quick_writes_json(tmp_path):
    out = tmp_path / "mixed_precision.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "mixed_precision.py"), "--quick", "--models", "tiny_lm",
         "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = [r for r in data["results"] if r["model"] == "tiny_lm"]
    uniform = next(r for r in rows if r["method"] == "uniform int4 g128")
    mixed = [r for r in rows if r["method"].startswith("mixed")]
    assert len(mixed) == 6  # 3 sensitivities x 2 candidate sets
    for row in mixed:
        assert row["bytes"] <= uniform["bytes"]
        assert 1.0 < row["quality"] < 10 * uniform["quality"]  # perplexity: sane, not broken
    passes = {r["method"]: r["forward_passes"] for r in mixed if r["candidates"] == "default (group sizes)"}
    assert passes["mixed output"] == 0 < passes["mixed scaled"] < passes["mixed model"]
    for entry in data["correlations"]:
        assert -1.0 <= entry["spearman_vs_model"] <= 1.0
