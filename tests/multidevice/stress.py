"""Stress test for issue 21: the sharded ``qat(prune(adamw))`` step in many FRESH processes.

A collective deadlock shows only now and then (it depends on how the device threads and the
host interleave), so one run proves little: this runs tests/multidevice/sharded_step.py in
``--trials`` new interpreters, one after another, with XLA:CPU's default collective timeout (a
thread that never reaches an all-reduce aborts the process after 40 s instead of hanging) and a
wall-clock limit per trial, and reports how many finished. tests/test_multidevice.py runs a few
short trials in CI with the client thread pool large enough (``PJRT_NPROC``, see
docs/scaling.md); run many by hand, with and without it:

    python tests/multidevice/stress.py --trials 50 --steps 100 --pool-threads 32
    python tests/multidevice/stress.py --trials 10 --steps 100      # XLA's default pool
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

STEP = Path(__file__).with_name("sharded_step.py")
# XLA:CPU's client thread pool that avoids the deadlock: PJRT_NPROC = this many threads per
# virtual device (the default is max(cores, devices): one per device on a small host).
POOL_THREADS_PER_DEVICE = 4


def run_trials(
    trials: int,
    steps: int,
    timeout: float,
    extra: list[str] = (),
    log_dir: str | None = None,
    pool_threads: int | None = None,
) -> list[tuple[int, str]]:
    """(return code, last output line) of each trial; return code -9 marks a trial past ``timeout``.
    With ``log_dir``, the whole output of every failed trial is written there. ``pool_threads``
    sets ``PJRT_NPROC`` for the trials (``None``: whatever the environment says)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        flag for flag in env.get("XLA_FLAGS", "").split() if "collective_call_terminate_timeout" not in flag
        and "device_count" not in flag
    ) + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    if pool_threads is not None:
        env["PJRT_NPROC"] = str(pool_threads)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    results = []
    for _ in range(trials):
        try:
            done = subprocess.run(
                [sys.executable, str(STEP), "--steps", str(steps), *extra],
                env=env, capture_output=True, text=True, timeout=timeout,
            )
            lines = (done.stdout + done.stderr).strip().splitlines()
            if log_dir and done.returncode != 0:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                Path(log_dir, f"trial_{len(results)}.log").write_text(done.stdout + done.stderr)
            tail = next((line for line in reversed(lines) if "rendezvous" in line or "Termination" in line), None)
            results.append((done.returncode, tail or (lines[-1] if lines else "")))
        except subprocess.TimeoutExpired:
            results.append((-9, f"no result within {timeout:.0f} s"))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per trial")
    parser.add_argument("--log-dir", default=None, help="write the output of failed trials here")
    parser.add_argument("--pool-threads", type=int, default=None,
                        help="PJRT_NPROC for the trials (default: inherit; 32 avoids the deadlock with 8 devices)")
    args, extra = parser.parse_known_args(argv)
    started = time.perf_counter()
    results = run_trials(args.trials, args.steps, args.timeout, extra, args.log_dir, args.pool_threads)
    for i, (code, tail) in enumerate(results):
        print(f"trial {i:3d}: rc {code:4d}  {tail[:160]}")
    failed = sum(code != 0 for code, _ in results)
    print(f"{len(results) - failed}/{len(results)} trials finished ({time.perf_counter() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
