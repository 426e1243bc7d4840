"""`compressed(apply)` vs the float forward on three CNNs at batch 1, 32 and 256.

    python benchmarks/cnn_speed.py            # full run
    python benchmarks/cnn_speed.py --quick    # CI-sized (< 60 s on 2 CPU cores)

Models (flax linen, NHWC, float32, random init: speed does not depend on the values):
  * ``demo``: the CNN of `jaxcompress.demo.pipeline` (two stride-2 3x3 convs, 32 and 64 channels,
    Dense 128, Dense 10) on 28x28x1;
  * ``mnist``: an MNIST-style CNN (3x3 convs 32 and 64 with 2x2 max-pools, the first conv on one
    input channel, Dense 128, Dense 10) on 28x28x1;
  * ``mobilenet``: MobileNet-style inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1
    project, BatchNorm, ReLU6, residual adds) on 32x32x3.

Every conv / dense kernel is int8 per output channel with dynamic int8 activations
(``QuantRule(pattern=".*kernel", channel_axes=(-1,), activation="dynamic")``). Variants:
  * ``f32``: ``jax.jit(model.apply)`` on the float params;
  * ``rule``: ``compressed(model.apply)`` (every site on the integer path, as quantized);
  * ``auto``: ``compressed(model.apply, policy="auto")`` (the per-site cost model of
    `jaxcompress.execute.policy`);
  * ``measure``: ``compressed(model.apply, policy=ExecutionPolicy("measure", cache_dir=...))``
    (each path timed once per site on this machine, the fastest kept; the timing happens before
    the timed rounds, with its own cache directory under the results folder);
  * ``tune``: ``compressed(model.apply, policy=ExecutionPolicy("tune", cache_dir=...))`` (whole
    programs timed on this machine: `jaxcompress.execute.tune`; the tuning happens at the first
    call, before the timed rounds, cached beside ``measure``'s timings);
  * ``auto_stored``: ``auto`` with the kernels stored for integer dots
    (`jaxcompress.execute.layout.store_for_integer_dots`; only where `QArray` has the
    ``stored_permutation`` field, the JSON says so otherwise).

Timing: the variants of one (model, batch) are called round-robin, the order rotated every round,
each call timed on its own, for at least ``--rounds`` rounds and until each variant has about
``--min-seconds`` of calls (batch-1 calls take 0.1-0.4 ms: 20 of them are mostly noise); ``speedup`` = median f32 time / median variant time. The CPU is
shared, so absolute times move between runs; the side-by-side ratios are what to read. The JSON
also has each variant's max |difference| to the float output, and the ``auto`` site report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxcompress as jc  # noqa: E402
from benchmarks._common import RESULTS_DIR, environment, format_table, write_json  # noqa: E402
from jaxcompress.execute.transform import compressed  # noqa: E402
from jaxcompress.execute.policy import ExecutionPolicy  # noqa: E402
from jaxcompress.execute.layout import store_for_integer_dots, supports_stored_layout  # noqa: E402
from jaxcompress.demo.pipeline import CNN as DemoCNN  # noqa: E402

GOALS = {"demo@256": 1.3}  # for "auto" and "tune", and >= 1.0 everywhere for both


class MnistCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for features in (32, 64):
            x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


class InvertedResidual(nn.Module):
    features: int
    expand: int = 4
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        hidden = channels * self.expand
        y = nn.relu6(nn.BatchNorm(use_running_average=True)(nn.Conv(hidden, (1, 1), use_bias=False)(x)))
        y = nn.Conv(hidden, (3, 3), strides=self.stride, feature_group_count=hidden, use_bias=False)(y)
        y = nn.relu6(nn.BatchNorm(use_running_average=True)(y))
        y = nn.BatchNorm(use_running_average=True)(nn.Conv(self.features, (1, 1), use_bias=False)(y))
        return x + y if self.stride == 1 and channels == self.features else y


class MobileNetCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu6(nn.Conv(16, (3, 3), strides=2)(x))
        for features, stride in ((16, 1), (24, 2), (24, 1), (32, 2), (32, 1)):
            x = InvertedResidual(features, stride=stride)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(10)(x)


MODELS = {
    "demo": (DemoCNN(10), (28, 28, 1)),
    "mnist": (MnistCNN(), (28, 28, 1)),
    "mobilenet": (MobileNetCNN(), (32, 32, 3)),
}
RULES = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]


def interleaved(fns: dict, args: dict, rounds: int, min_seconds: float = 0.0, max_rounds: int = 2000) -> dict:
    """Per-call seconds of each function, called round-robin (order rotated every round): at
    least ``rounds`` rounds, more (up to ``max_rounds``) until the slowest warm-up call times the
    rounds reaches ``min_seconds``: a 0.2 ms batch-1 call timed 20 times is mostly noise."""
    slowest = 0.0
    for name, fn in fns.items():  # compile + warm up
        jax.block_until_ready(fn(*args[name]))
        start = time.perf_counter()
        jax.block_until_ready(fn(*args[name]))
        slowest = max(slowest, time.perf_counter() - start)
    if min_seconds > 0 and slowest > 0:
        rounds = max(rounds, min(max_rounds, int(np.ceil(min_seconds / slowest))))
    names = list(fns)
    runs = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(fns[name](*args[name]))
            runs[name].append(time.perf_counter() - start)
    return runs


def model_case(name: str, batch: int, rounds: int, cache_dir: Path, min_seconds: float = 0.0) -> dict:
    model, image = MODELS[name]
    x = jax.random.normal(jax.random.key(0), (batch,) + image)
    params = model.init(jax.random.key(1), x[:1])
    qparams, _ = jc.quantize_params(params, RULES, on_unused="error")
    auto = compressed(model.apply, policy="auto")
    measure = compressed(model.apply, policy=ExecutionPolicy("measure", cache_dir=str(cache_dir)))
    tune = compressed(model.apply, policy=ExecutionPolicy("tune", cache_dir=str(cache_dir)))
    fns = {
        "f32": (jax.jit(model.apply), (params, x)),
        "rule": (jax.jit(compressed(model.apply)), (qparams, x)),
        "auto": (jax.jit(auto), (qparams, x)),
        "measure": (jax.jit(measure), (qparams, x)),
        "tune": (jax.jit(tune), (qparams, x)),
    }
    notes = []
    if supports_stored_layout():
        fns["auto_stored"] = (jax.jit(auto), (store_for_integer_dots(qparams), x))
    else:
        notes.append("auto_stored: QArray has no stored_permutation field: skipped")
    runs = interleaved({k: v[0] for k, v in fns.items()}, {k: v[1] for k, v in fns.items()}, rounds, min_seconds)
    reference = np.asarray(fns["f32"][0](*fns["f32"][1]), np.float64)
    base = float(np.median(runs["f32"]))
    rows = []
    for variant, times in runs.items():
        out = np.asarray(fns[variant][0](*fns[variant][1]), np.float64)
        rows.append(
            {
                "case": f"{name}@{batch}",
                "model": name,
                "batch": batch,
                "variant": variant,
                "median_ms": 1e3 * float(np.median(times)),
                "speedup": base / float(np.median(times)),
                "max_abs_diff": float(np.abs(out - reference).max()),
                "runs_s": times,
            }
        )
    sites = [
        {"path": s.path, "primitive": s.primitive, "activation_shape": s.activation_shape, "weight_shape": s.weight_shape,
         "chosen": s.chosen, "reason": s.reason}
        for s in auto.sites(qparams, x)
    ]
    measured = [{"path": s.path, "chosen": s.chosen, "reason": s.reason} for s in measure.sites(qparams, x)]
    tuned = [{"path": s.path, "chosen": s.chosen, "reason": s.reason} for s in tune.sites(qparams, x)]
    return {"rows": rows, "sites": sites, "measured_sites": measured, "tuned_sites": tuned, "notes": notes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument("--rounds", type=int, default=None, help="at least this many interleaved rounds (default 20, quick 3)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="more rounds (up to 2000) until each variant has about this many seconds of calls (default 1.0, quick 0)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="*", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 20)
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.0 if args.quick else 1.0)
    batches = args.batches or ([1, 8] if args.quick else [1, 32, 256])
    out = args.out or RESULTS_DIR / ("cnn_speed_quick.json" if args.quick else "cnn_speed.json")
    started = time.perf_counter()
    rows, sites, notes = [], {}, []
    for name in args.models:
        for batch in batches:
            result = model_case(name, batch, rounds, out.parent / "cnn_speed_site_cache", min_seconds)
            rows += result["rows"]
            sites[f"{name}@{batch}"] = {"auto": result["sites"], "measure": result["measured_sites"], "tune": result["tuned_sites"]}
            notes += [n for n in result["notes"] if n not in notes]
    by = {(r["case"], r["variant"]): r["speedup"] for r in rows}
    goals = [
        {"case": c, "variant": v, "goal_speedup": g, "measured": by.get((c, v))} for c, g in GOALS.items() for v in ("auto", "tune")
    ]
    goals += [
        {"case": r["case"], "variant": r["variant"], "goal_speedup": 1.0, "measured": r["speedup"]}
        for r in rows
        if r["variant"] in ("auto", "measure", "tune", "auto_stored")
    ]
    for goal in goals:
        goal["met"] = None if goal["measured"] is None else goal["measured"] >= goal["goal_speedup"]
    data = {
        "quick": args.quick,
        "rounds": rounds,
        "min_seconds": min_seconds,
        "rounds_per_case": {r["case"]: len(r["runs_s"]) for r in rows},
        "note": "speedup = f32 median / variant median, interleaved in one run on a shared CPU",
        "environment": environment(),
        "results": rows,
        "sites": sites,
        "goals": goals,
        "notes": notes,
        "wall_s": time.perf_counter() - started,
    }
    path = write_json(out, data)
    columns = [("case", "case", ""), ("variant", "variant", ""), ("median_ms", "median ms", ".3f"),
               ("speedup", "x f32", ".2f"), ("max_abs_diff", "max |diff|", ".1e")]
    print(format_table(rows, columns))
    for note in notes:
        print(note)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
