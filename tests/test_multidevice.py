"""Runs the multi-device checks in tests/multidevice/md_*.py in their own process.

XLA's host device count is fixed when jax is first imported, so these checks run in a fresh
interpreter with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before the import.
Each md_*.py file is an ordinary pytest module; this test fails (and prints the child's output)
when any of them fails.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "multidevice"
FILES = sorted(HERE.glob("md_*.py"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_multidevice(path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                        # XLA:CPU aborts a collective that waits over 40 s; a loaded 2-core CI box can.
                        " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        pytest.fail(f"{path.name} failed in its 8-device process:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}")
