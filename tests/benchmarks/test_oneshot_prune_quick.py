"""`benchmarks/oneshot_prune.py --quick` runs end to end on the real MiniLM and writes its JSON.

Quality numbers are checked loosely (the quick run prunes two layers with 16 calibration
sentences); sparsities are exact, including OWL's non-uniform allocation.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.minilm import needs_minilm

REPO_ROOT = Path(__file__).resolve().parents[2]


@needs_minilm
def test_oneshot_prune_quick_writes_json(tmp_path):
    out = tmp_path / "oneshot_prune.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "oneshot_prune.py"), "--quick", "--out", str(out)],
        cwd=tmp_path,  # the script must not depend on the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cosine mean" in proc.stdout and "sparsegpt" in proc.stdout

    data = json.loads(out.read_text())
    assert data["quick"] is True and data["sentences"]["calibration"] > 0
    rows = {(row["method"], row["setting"]): row for row in data["results"]}
    for method in ("magnitude", "wanda", "wanda+ls", "sparsegpt"):
        for setting in ("50% unstructured", "2:4"):
            row = rows[(method, setting)]
            assert abs(row["sparsity"] - 0.5) < 1e-9  # exact counts
            assert 0.0 < row["cosine_mean"] <= 1.0 + 1e-6
    assert abs(rows[("sparsegpt owl+ls", "50% unstructured")]["sparsity"] - 0.5) < 1e-9  # OWL keeps the total
    assert ("sparsegpt owl+ls", "2:4") not in rows  # OWL is for unstructured sparsity only
    for setting in ("50% unstructured", "2:4"):  # activation-aware beats magnitude (by a wide margin)
        assert rows[("wanda", setting)]["cosine_mean"] > rows[("magnitude", setting)]["cosine_mean"]
        assert rows[("sparsegpt", setting)]["cosine_mean"] > rows[("magnitude", setting)]["cosine_mean"]
        # (no claim that +ls beats the plain method here: with 16 sentences a 1536-input kernel sees fewer
        # calibration rows than inputs and the re-fit overfits them; the full run measures the gain)
        assert rows[("wanda+ls", setting)]["cosine_mean"] > rows[("magnitude", setting)]["cosine_mean"]
    assert set(data["goals"]) >= {"sparsegpt 50% unstructured", "sparsegpt 2:4"}
    lm = {(row["method"], row["setting"]): row for row in data["tiny_lm"]["results"]}  # the quick decoder LM
    assert lm[("sparsegpt", "50% unstructured")]["sparsity"] == 0.5 and lm[("sparsegpt", "2:4")]["sparsity"] == 0.5
    assert all(1.0 < row["perplexity"] < 10 * lm[("fp32", "")]["perplexity"] for row in lm.values())
