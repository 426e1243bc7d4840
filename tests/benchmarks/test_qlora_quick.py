"""`benchmarks/qlora.py --quick` runs end to end and writes its JSON.

Perplexities and timings are reported, not asserted (a few steps of a toy model); the byte
counts are exact and checked against what the formats imply.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_qlora_quick_writes_json(tmp_path):
    out = tmp_path / "qlora.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "qlora.py"), "--quick", "--steps", "2", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "recovered" in proc.stdout and "step temp MB" in proc.stdout
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["settings"]["steps"] == 2
    rows = {row["base"]: row for row in data["results"]}
    assert set(rows) == {"fp32", "int4", "nf4"}
    float_bytes = rows["fp32"]["base_bytes"]
    assert float_bytes == 4 * data["model"]["params"]
    for name in ("int4", "nf4"):
        row = rows[name]
        # kernels at 0.5 byte per value plus one float32 scale per 64 inputs: well under a third
        assert row["base_bytes"] < float_bytes / 3
        # the training step takes the base as codes: its arguments shrink with the base
        assert row["memory"]["argument_bytes"] < rows["fp32"]["memory"]["argument_bytes"]
        assert row["adapter_bytes"] == rows["fp32"]["adapter_bytes"] > 0
        for key in ("ppl_before", "ppl_after", "step_median_s", "ppl_vs_fp32_lora"):
            assert row[key] is not None and row[key] > 0
