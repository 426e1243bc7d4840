"""`benchmarks/llm_quality.py --quick` runs end to end on the quick decoder and writes its JSON.

Numbers are reported, not asserted as goals; checked: every case ran (or, for Qwix, says why
not), the quantized perplexities are finite and near fp32, GPTQ beat round-to-nearest's output
error on the calibration rows, the pruned rows are 50% sparse, and ``--merge`` replaces rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_llm_quality_quick_writes_json(tmp_path):
    out = tmp_path / "llm_quality.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "llm_quality.py"), "--quick", "--skip-minilm", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["lm"]["group_size"] == 64
    rows = {(row["method"], row["setting"]): row for row in data["lm"]["rows"]}
    assert {("fp32", ""), ("rtn", "sym"), ("rtn", "asym"), ("gptq", "defaults"), ("gptq", "asym clip"),
            ("awq", "asym"), ("magnitude", "50%"), ("wanda", "50%"), ("sparsegpt", "50%")} <= set(rows)
    for key, row in rows.items():
        if "skipped" in row:
            assert key[0] == "qwix" and row["skipped"]
            continue
        if key[1] == "50%":  # pruning: exactly half of every kernel, and not a broken model (the 40-step toy
            assert row["sparsity"] == 0.5 and 0.9 < row["ppl_ratio"] < 3.0, (key, row)  # may even gain)
        else:
            assert 0.9 < row["ppl_ratio"] < 1.5, (key, row)
    gptq = rows[("gptq", "asym clip")]
    assert gptq["layers"] == 14 and gptq["output_error_ratio_vs_rtn"] < 1.0
    assert "ppl/fp32" in proc.stdout
    summary = data["summary"]
    assert summary["lm_default_ppl_ratio"] == rows[("gptq", "defaults")]["ppl_ratio"]
    assert summary["lm_sparsegpt_50_ppl_ratio"] == rows[("sparsegpt", "50%")]["ppl_ratio"]

    # --merge: rerun one case; its row is replaced, every other row kept as it was
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "llm_quality.py"), "--quick", "--skip-minilm", "--skip-qwix",
         "--cases", "rtn sym", "--merge", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = {(row["method"], row["setting"]): row for row in json.loads(out.read_text())["lm"]["rows"]}
    assert set(merged) == set(rows)
    assert merged[("rtn", "sym")]["measured_at"] > rows[("rtn", "sym")]["measured_at"]  # measured again
    assert merged[("rtn", "sym")]["perplexity"] == rows[("rtn", "sym")]["perplexity"]  # deterministic
    assert merged[("sparsegpt", "50%")] == rows[("sparsegpt", "50%")]
