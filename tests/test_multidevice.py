"""Runs the multi-device checks in tests/multidevice/md_*.py in their own process.

XLA's host device count is fixed when jax is first imported, so these checks run in a fresh
interpreter with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before the import.
Each md_*.py file is an ordinary pytest module; this test fails (and prints the child's output)
when any of them fails.

The children also get ``PJRT_NPROC`` (the size of XLA:CPU's client thread pool) of four threads
per virtual device: with the default pool (one thread per device on a host with fewer cores)
sharded steps that are dispatched ahead of each other can starve the pool and deadlock in a
collective (issue 21, docs/scaling.md). `test_sharded_qat_prune_step_in_fresh_processes` is
the stress test for that: the sharded ``qat(prune(adamw))`` step in several new processes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "multidevice"
FILES = sorted(HERE.glob("md_*.py"))
DEVICES = 8

from tests.multidevice import stress  # noqa: E402


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
                        # XLA:CPU aborts a collective that waits over 40 s; a loaded 2-core CI box can.
                        " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("PJRT_NPROC", str(stress.POOL_THREADS_PER_DEVICE * DEVICES))
    return env


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_multidevice(path):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        pytest.fail(f"{path.name} failed in its 8-device process:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}")


def test_sharded_qat_prune_step_in_fresh_processes():
    """Issue 21: the sharded qat(prune(adamw)) step (gradual magnitude pruning to 50%, int8
    fake-quant, run-time checks inside the step) in fresh processes with XLA's default 40 s
    collective timeout: every trial must finish. Without the thread-pool setting the same trials
    deadlocked in 3 of 3 runs of 300 steps on a 2-core host (docs/scaling.md has the numbers)."""
    results = stress.run_trials(trials=4, steps=60, timeout=240, pool_threads=stress.POOL_THREADS_PER_DEVICE * DEVICES)
    failed = [(i, code, tail) for i, (code, tail) in enumerate(results) if code != 0]
    assert not failed, f"{len(failed)}/{len(results)} trials failed: {failed}"
