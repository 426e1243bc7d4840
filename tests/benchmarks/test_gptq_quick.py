"""`benchmarks/gptq.py --quick` runs end to end on the real MiniLM and writes its JSON.

Numbers are reported, not asserted as goals (timings move on a shared CPU); checked: every case
ran, GPTQ quantized the first layer's six kernels, beat round-to-nearest's output error on every
one of them, and the embeddings stayed close to fp32.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.minilm import needs_minilm

REPO_ROOT = Path(__file__).resolve().parents[2]


@needs_minilm
def test_gptq_quick_writes_json(tmp_path):
    out = tmp_path / "gptq.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gptq.py"), "--quick", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "w4g128 library defaults: cosine" in proc.stdout  # quick runs gptq with nothing but the rule set
    data = json.loads(out.read_text())
    assert data["quick"] is True
    rows = {(row["method"], row["setting"]): row for row in data["results"]}
    rtn = rows[("rtn", "w4g128 absmax")]
    gptq = rows[("gptq", "w4g128 library defaults")]
    assert gptq["layers"] == 6 and gptq["layers_better_than_rtn"] == 6
    assert gptq["output_error_ratio_vs_rtn"] < 1.0
    assert 0.9 < rtn["cosine_mean"] <= 1.0 and 0.9 < gptq["cosine_mean"] <= 1.0
    assert gptq["seconds"] > 0 and gptq["capture_seconds"] > 0
