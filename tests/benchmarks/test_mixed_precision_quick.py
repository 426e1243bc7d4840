"""`benchmarks/mixed_precision.py --quick --validate` runs end to end (the quick tiny LM, the default
candidates) and writes its JSON: exact sizes (never above uniform int4 g128), every sensitivity's
forward-pass count, the end-to-end matrix (held-out loss increase per kernel and candidate) and
each sensitivity's rank correlations with it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SENSITIVITIES = ("scaled", "output", "relative", "trace", "model")


def test_mixed_precision_quick_validate_writes_json(tmp_path):
    out = tmp_path / "mixed_precision.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "mixed_precision.py"), "--quick", "--models", "tiny_lm",
         "--validate", "--candidate-sets", "default", "--out", str(out)],
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
    mixed = {r["method"].removeprefix("mixed "): r for r in rows if r["method"].startswith("mixed")}
    oracle = next(r for r in rows if r["method"].startswith("oracle"))
    assert sorted(mixed) == sorted(SENSITIVITIES)
    for row in list(mixed.values()) + [oracle]:
        assert row["bytes"] <= uniform["bytes"]
        assert 1.0 < row["quality"] < 10 * uniform["quality"]  # perplexity: sane, not broken
    passes = {name: row["forward_passes"] for name, row in mixed.items()}
    kernels = passes["scaled"]
    assert passes["output"] == passes["relative"] == passes["trace"] == 0 < kernels < passes["model"]
    correlations = {c["sensitivity"]: c for c in data["correlations"]}
    reference = correlations.pop("(end to end, held out)")
    matrix = reference["end_to_end"]
    assert len(matrix) == kernels == len(reference["kernels"]) and len(matrix[0]) == len(reference["candidate_labels"])
    finite = sum(v is not None and math.isfinite(v) for row in matrix for v in row)  # NaN is written as null
    assert finite == passes["model"] and reference["forward_passes"] == finite + 1  # + the fp32 baseline
    assert len(reference["end_to_end_halves"]) == 2  # the even / odd held-out examples
    assert -1.0 <= reference["split_half_spearman"] <= 1.0
    assert sorted(correlations) == sorted(SENSITIVITIES)
    for entry in correlations.values():
        for key in ("spearman", "kendall", "spearman_across_kernels"):
            assert -1.0 <= entry[key] <= 1.0, (entry["sensitivity"], key, entry[key])
