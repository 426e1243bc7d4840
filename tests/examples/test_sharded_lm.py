"""examples/sharded_lm.py --quick: data + model parallel training with prune + QAT on 8 virtual
CPU devices, int8 evaluation through `compressed` on the mesh, sharded checkpoint round trip."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="needs gensim's test corpus (pip install --no-deps gensim)")
def test_sharded_lm_quick(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=600"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "sharded_lm.py"), "--quick", "--out", str(out),
         "--checkpoint", str(tmp_path / "ckpt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mesh"] == {"data": 2, "model": 4}
    loss = result["validation_loss"]
    assert loss["after_float"] < loss["before"] - 1.0  # it learned (ln(81) = 4.39 is chance)
    assert abs(result["sparsity"] - 0.5) < 0.01
    assert abs(loss["int8_compressed"] - loss["after_fake_quant"]) < 0.05
    assert loss["int8_restored_checkpoint"] == loss["int8_compressed"]  # bitwise restore
    assert result["full_param_all_gathers_in_train_step"] == 0
    assert result["full_param_all_gathers_in_int8_eval"] == 0
    assert result["int8_dots"] > 0 and result["int8_values_sharded_like_params"]
    assert (tmp_path / "ckpt").is_dir()
