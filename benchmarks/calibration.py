"""`calibrate_activations` on a 50-site CNN: this checkout vs the code the issue measured.

    python benchmarks/calibration.py                 # full: 3 rounds, baseline = ff5b3c8^
    python benchmarks/calibration.py --quick         # CI-sized: 1 round, no baseline
    python benchmarks/calibration.py --baseline REF  # any git revision as the baseline

The model: a plain-JAX CNN with 50 quantized sites (a 3x3 stem conv 1 -> 32 channels, 48 3x3
convs 32 -> 32 with ReLU and residual adds, a dense head), int8 per output channel with static
activations, calibrated on 4 batches of one 56x56x1 image each (issue 17: "50 sites, 4 images";
56x56x32 activations, 100k values per site).
Per method (``absmax``, ``percentile``, ``mse``) it times the FIRST call (tracing and compiling
included: what a user waits for) and a SECOND call with the same shapes (what a later call
costs; one compilation across calls is part of what is measured).

Each version runs in its own subprocess (``--worker``) with its own source tree on
``PYTHONPATH``: the baseline is ``git archive <REF>`` of this repository unpacked into a
temporary directory (skipped, saying why, when git or the revision is unavailable). The rounds
alternate the versions (order rotating), so load from other processes hits both alike; the table
shows medians and the ratio baseline / current per method. The CPU is shared: read the ratios.
It also times the plain function (jitted, dequantized weights) over the same batches: no
calibration can beat one forward pass per batch, so ``baseline 2nd / forward`` is the largest
second-call speedup possible on this model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

METHODS = ("absmax", "percentile", "mse")
SITES = 50
CHANNELS = 32
IMAGE = 56  # 56x56x32 activations: 100k values per site, as in an ImageNet-style CNN's middle stage
BATCHES = 4
DEFAULT_BASELINE = "ff5b3c8^"  # calibrate_activations before the program layer (a sort per activation, re-jit per call)


# ---- the worker (runs inside the version under test) -------------------------------------------


def _model():
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    params = {"stem": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 1, CHANNELS)) / 3, jnp.float32)}}
    for i in range(SITES - 2):
        params[f"conv_{i}"] = {"kernel": jnp.asarray(rng.standard_normal((3, 3, CHANNELS, CHANNELS)) / 12, jnp.float32)}
    params["head"] = {"kernel": jnp.asarray(rng.standard_normal((IMAGE * IMAGE * CHANNELS, 10)) / 300, jnp.float32)}

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def fn(p, x):
        h = jax.nn.relu(conv(x, p["stem"]["kernel"]))
        for i in range(SITES - 2):
            h = h + jax.nn.relu(conv(h, p[f"conv_{i}"]["kernel"]))
        return h.reshape(h.shape[0], -1) @ p["head"]["kernel"]

    images = [jnp.asarray(rng.standard_normal((1, IMAGE, IMAGE, 1)), jnp.float32) for _ in range(BATCHES)]
    return fn, params, images


def worker(methods) -> dict:
    import jax
    import jaxcompress as jc
    from jaxcompress.execute.calibration import calibrate_activations

    fn, params, images = _model()
    rule = jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="static")
    qparams = jc.quantize_params(params, [rule])
    qparams = qparams[0] if isinstance(qparams, tuple) else qparams
    # the floor: the function itself, jitted, on the dequantized weights over the same batches
    forward = jax.jit(fn)
    dense = jc.dequantize_params(qparams)
    jax.block_until_ready(forward(dense, images[0]))
    start = time.perf_counter()
    jax.block_until_ready([forward(dense, image) for image in images])
    out: dict = {"forward_s": time.perf_counter() - start}
    for method in methods:
        times, scales = [], None
        for _ in range(2):
            start = time.perf_counter()
            scales = calibrate_activations(fn, qparams, images, method=method)
            jax.block_until_ready(scales)
            times.append(time.perf_counter() - start)
        values = [float(v) for v in jax.tree_util.tree_leaves(scales)]
        out[method] = {"first_s": times[0], "second_s": times[1], "scales": len(values), "scale_sum": sum(values)}
    return out


# ---- the driver --------------------------------------------------------------------------------


def _baseline_tree(ref: str, into: Path) -> tuple[Path | None, str]:
    try:
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", ref, "jaxcompress"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        return None, f"baseline {ref!r} unavailable ({type(error).__name__}: {detail.decode(errors='replace').strip()[:200]}): skipped"
    tar_path = into / "baseline.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into / "src", filter="data")
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", ref], capture_output=True, text=True).stdout.strip()
    return into / "src", f"baseline {ref} ({commit})"


def _run_worker(source: Path, methods, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", "--methods", *methods],
        capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {source} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, no baseline (CI)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--baseline", default=None, help=f"git revision to compare with (default {DEFAULT_BASELINE}; 'none' to skip)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.methods)))
        return {}

    from benchmarks._common import RESULTS_DIR, cpu_model, environment, format_table, write_json

    rounds = args.rounds or (1 if args.quick else 3)
    baseline_ref = args.baseline or ("none" if args.quick else DEFAULT_BASELINE)
    out = args.out or RESULTS_DIR / ("calibration_quick.json" if args.quick else "calibration.json")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"current": REPO_ROOT}
        baseline_note = "no baseline (--baseline none)"
        if baseline_ref != "none":
            source, baseline_note = _baseline_tree(baseline_ref, Path(tmp))
            if source is not None:
                versions["baseline"] = source
        print(baseline_note, flush=True)
        names = list(versions)
        runs: dict = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                result = _run_worker(versions[name], args.methods, timeout=1800)
                forward_s = result.pop("forward_s", None)
                runs[name].append({**result, "forward_s": forward_s})
                print(f"round {r + 1}/{rounds} {name}: forward x{BATCHES} {forward_s:.3f} s, " + ", ".join(
                    f"{m} {v['first_s']:.2f}/{v['second_s']:.2f} s" for m, v in result.items()), flush=True)

    def median(values):
        values = sorted(values)
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    rows = []
    for method in args.methods:
        row = {"method": method}
        for name in names:
            for call in ("first_s", "second_s"):
                row[f"{name}_{call}"] = median([run[method][call] for run in runs[name]])
        if "baseline" in versions:
            row["speedup_first"] = row["baseline_first_s"] / row["current_first_s"]
            row["speedup_second"] = row["baseline_second_s"] / row["current_second_s"]
        rows.append(row)
    forward_s = median([run["forward_s"] for run in runs["current"]])
    for row in rows:  # the best any calibration can do is one forward pass per batch
        row["forward_s"] = forward_s
        if "baseline" in versions:
            row["max_possible_speedup_second"] = row["baseline_second_s"] / forward_s
    goals = [{"method": row["method"], "goal_speedup": 10.0, "measured_second_call": row.get("speedup_second"),
              "met": None if "speedup_second" not in row else row["speedup_second"] >= 10.0} for row in rows]
    data = {
        "benchmark": "calibration",
        "quick": args.quick,
        "model": f"plain-JAX CNN, {SITES} quantized sites (3x3 convs, {CHANNELS} channels, residual; dense head), "
                 f"{BATCHES} batches of 1x{IMAGE}x{IMAGE}x1",
        "baseline": baseline_note,
        "rounds": rounds,
        "note": "medians over rounds; each version in its own subprocess, rounds alternate the versions; shared CPU: read ratios",
        "environment": environment(),
        "cpu_model": cpu_model(),
        "results": rows,
        "runs": runs,
        "goals": goals,
        "wall_s": time.perf_counter() - started,
    }
    path = write_json(out, data)
    env = data["environment"]
    print(f"\nCPU: {cpu_model()}, load average {env.get('load_average_1_5_15_min')}")
    columns = [("method", "method", "")]
    for name in names:
        columns += [(f"{name}_first_s", f"{name} 1st call s", ".2f"), (f"{name}_second_s", f"{name} 2nd call s", ".3f")]
    if "baseline" in versions:
        columns += [("speedup_first", "speedup 1st", ".1f"), ("speedup_second", "speedup 2nd", ".1f")]
    columns += [("forward_s", f"plain forward x{BATCHES} s", ".3f")]
    if "baseline" in versions:
        columns += [("max_possible_speedup_second", "baseline 2nd / forward", ".1f")]
    print(format_table(rows, columns))
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
