"""benchmarks/scaling_memory.py: the 7B per-device memory table (arithmetic, checked by hand)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.scaling_memory import MIB, llama_shapes, memory_row, per_device  # noqa: E402


def test_shapes_are_llama_7b():
    total = sum(math.prod(shape) for _, shape, _ in llama_shapes())
    assert total == 6_738_415_616  # LLaMA-7B's published parameter count


def test_rows_by_hand():
    row = memory_row(8, "fsdp")
    norms = sum(math.prod(s) for _, s, role in llama_shapes() if role == "norm")  # replicated
    assert row["bf16_weights"] * MIB == pytest.approx((6_738_415_616 - norms) * 2 / 8 + norms * 2)
    assert row["adamw_moments_f32"] * MIB == pytest.approx((6_738_415_616 - norms) * 8 / 8 + norms * 8)
    linear = sum(math.prod(s) for _, s, role in llama_shapes() if role in ("column", "row"))
    assert row["masks_bool"] * MIB == pytest.approx(linear / 8)
    # per-channel scales: one float32 per output channel, split 8 ways along the output axis
    outs = sum(s[1] for _, s, role in llama_shapes() if role in ("column", "row"))
    assert row["int8_scales"] * MIB == pytest.approx(outs * 4 / 8)
    # tensor parallel: row-parallel kernels split the input axis, so their (1, out) scales are whole
    tp = memory_row(8, "tp8-fsdp")
    assert tp["int8_scales"] > row["int8_scales"]
    assert per_device((1, 4096), (8, 1), 4) == 4096 * 4  # a size-1 dim is never split
    assert per_device((32, 4096), (256, 1), 4) == 32 * 4096 * 4  # 256 does not divide 32 groups


def test_script_quick(tmp_path):
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "scaling_memory.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["devices"] for r in data["rows"]] == [8, 8] and "| 8 | fsdp |" in proc.stdout
