"""`examples/qlora.py --quick` runs end to end: NF4 base, adapters trained, saved, reloaded, merged and re-quantized."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_qlora_example_quick(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "qlora.py"), "--quick", "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    numbers = re.search(
        r"nf4 base ([\d.]+) \| nf4 \+ LoRA ([\d.]+) \| reloaded adapters ([\d.]+) \| merged, int4 g64 ([\d.]+)", proc.stdout
    )
    assert numbers, proc.stdout
    base, tuned, reloaded, deployed = map(float, numbers.groups())
    assert reloaded == tuned  # the saved adapters are the trained ones
    assert (tmp_path / "adapters.safetensors").is_file()
    assert all(1.0 < value < 1000.0 for value in (base, tuned, deployed))
