"""`benchmarks/int8_matmul.py --quick` runs end to end and writes the JSON the issue asks for.

Speed ratios are reported, never asserted (the CPU is shared and timings move); what is checked
is that every case ran, the integer programs really contain s8 x s8 -> s32 dots, and the
numerics (relative error of W8A8, MiniLM embedding cosine) are sane.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.minilm import needs_minilm

REPO_ROOT = Path(__file__).resolve().parents[2]


@needs_minilm
def test_int8_matmul_quick_writes_json(tmp_path):
    out = tmp_path / "int8.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "int8_matmul.py"), "--quick", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x f32" in proc.stdout and "MiniLM-L6" in proc.stdout

    data = json.loads(out.read_text())
    assert data["quick"] is True
    rows = {row["case"]: row for row in data["results"]}
    for shape in ("32x4096x4096", "256x1024x1024", "1x4096x4096"):
        for variant in ("f32", "w8a8", "w8a8_out_in", "raw_s8"):
            row = rows[f"{variant}@{shape}"]
            assert row["speedup"] > 0 and len(row["runs_s"]) == data["rounds"]
        assert rows[f"w8a8@{shape}"]["rel_max_error"] < 0.05
        for comparator in ("qwix_ptq", "aqt_int8"):
            row = rows[f"{comparator}@{shape}"]
            assert row.get("status") == "unavailable" or row["speedup"] > 0
        # the W8A8 programs contract int8 codes: an s32-result dot in the compiled HLO
        for variant in ("w8a8", "w8a8_out_in"):
            assert data["hlo_s32_dots"][shape][variant], (shape, variant)
    assert {"wo_scale_out@256x1024x1024", "wo_dequant@256x1024x1024"} <= set(rows)
    assert any(case.startswith("group_int@") for case in rows)

    minilm = data["minilm"]
    assert minilm["quantized_leaves"] == 36           # 6 layers x (q, k, v, attn out, ffn in, ffn out)
    assert minilm["s8_dots_in_hlo"] == 36
    assert minilm["cosine_mean"] > 0.99 and minilm["speedup"] > 0
    assert {goal["case"] for goal in data["goals"]} == {
        "w8a8@32x4096x4096", "w8a8_stored@32x4096x4096", "w8a8_stored@1x4096x4096",
        "w8a8_out_in@1x4096x4096", "wo_scale_out@256x1024x1024", "minilm", "minilm_bf16",
    }
    # the bf16 carrier of the same codes: the same numbers (bit for bit while sums stay < 2^24)
    for shape in ("32x4096x4096", "256x1024x1024"):
        assert rows[f"w8a8_bf16@{shape}"]["rel_max_error"] == rows[f"w8a8_stored@{shape}"]["rel_max_error"]
    assert minilm["bf16_speedup"] > 0 and minilm["bf16_cosine_mean"] > 0.99
    assert minilm["bf16_max_abs_diff_vs_w8a8"] < 1e-3
    # the Flax kernel as quantize_params stores it (codes (out, in)): an s8 dot, sane numbers
    for shape in ("32x4096x4096", "1x4096x4096"):
        row = rows[f"w8a8_stored@{shape}"]
        assert row["speedup"] > 0 and row["rel_max_error"] < 0.05
        assert data["hlo_s32_dots"][shape]["w8a8_stored"], shape
    assert minilm["stored_kernels"] == 36 and minilm["logical_speedup"] > 0
