"""Integer execution speed: W8A8 and weight-only int8 dots vs float32, kernel level and end to end.

    python benchmarks/int8_matmul.py            # full run (goal shapes, all comparators)
    python benchmarks/int8_matmul.py --quick    # CI-sized: < 60 s on 2 CPU cores

Every number is a ratio against float32 measured in the SAME run, side by side: the variants of
one case are called in an interleaved round-robin (rotated each round so no variant always runs
after the same neighbour), and each gets the median over all rounds. The CPU is shared with other
work, so absolute times move between runs; ratios measured this way are much steadier. All runs
are in the JSON. ``speedup`` = median f32 time / median variant time (> 1 is faster).

Kernel level, ``y = x @ w`` with ``x: (M, K)`` float32 and ``w: (K, N)``:
  * ``f32``: the float32 dot.
  * ``w8a8``: `jaxcompress` dynamic W8A8 (``quantized_dot_general``): per-row int8 activation
    quantization at run time + int8 x int8 -> int32 dot + per-channel scales on the output. Codes
    in the Flax ``(in, out)`` layout (``jc.quantize`` / ``quantize_params(layout="logical")``):
    what a Flax kernel ran before the stored layout.
  * ``w8a8_out_in``: the same through ``compressed(lambda w, x: x @ w.T)`` with the weight stored
    ``(out, in)`` (torch layout); the transpose is folded into the s8 dot. XLA's CPU integer
    matmul is much faster when the contracted axis is the weight's minor axis, and for batch 1
    this is the formulation that runs on the integer path fast: rows padded to 8, the weight as
    the dot's left operand (shown from the compiled HLO).
  * ``w8a8_stored``: what a user gets for a Flax ``(in, out)`` kernel: ``{"kernel": w}`` through
    `jaxcompress.quantize_params` (W8A8 rule; its default ``layout="auto"`` stores the codes
    ``(out, in)``, `QArray.stored_permutation`, the logical shape unchanged) and
    ``compressed(lambda p, x: x @ p["kernel"])``.
  * ``w8a8_bf16``: ``w8a8_stored`` with ``policy="integer_bf16"``: the same int8 codes and
    scales, the dot run as bf16 x bf16 -> f32 (`jaxcompress.execute.dot`; bit for bit the integer
    result while the partial sums stay below 2^24).
  * ``raw_s8``: a bare s8 x s8 -> s32 dot on already-quantized operands (the ceiling).
  * ``qwix_ptq``: Qwix 0.1.8 PTQ (``QtRule(weight_qtype=int8, act_qtype=int8)``) of a linen Dense.
  * ``aqt_int8``: AQT 0.9.0 ``config_v4(fwd_bits=8)`` ``dot_general``; note it quantizes the float
    weight on every call (AQT's training-time dot; serving needs its freezer), so it does more work.
  Weight-only (``activation="weight_only"``): ``wo_scale_out`` converts the int8 codes to float
  and applies the per-channel scale to the output; ``wo_dequant`` dequantizes the weight first.
  Per-group int8 (groups of 128 along ``in``): ``group_int`` runs groups as a batch dimension of
  the integer dot (the default) vs ``group_dequant``: dequantize the weight, float dot.

End to end: the real all-MiniLM-L6-v2 (``examples/bert.py``) at batch 32 x 128 tokens, every
encoder Dense kernel int8 per output channel with dynamic int8 activations through
``compressed(model.apply)`` (``quantize_params``' default layout; ``w8a8_logical``: the same with
``layout="logical"``, the codes ``(in, out)``; ``w8a8_bf16``: ``policy="integer_bf16"``, every
encoder dot on bf16 codes), vs the float32 model; plus mean cosine similarity of the sentence
embeddings (mean pooling + L2) on held-out sentences. The full run also calibrates static
activation scales (percentile 99.99 over 4 batches of other sentences) and reports that variant.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxcompress as jc  # noqa: E402
from benchmarks._common import RESULTS_DIR, environment, format_table, write_json  # noqa: E402
from jaxcompress.execute.transform import compressed  # noqa: E402
from jaxcompress.execute import quantized_dot_general  # noqa: E402

DENSE = (((1,), (0,)), ((), ()))
GOALS = {
    "w8a8@32x4096x4096": 2.0,
    "w8a8_stored@32x4096x4096": 3.0,
    "w8a8_stored@1x4096x4096": 1.5,
    "w8a8_out_in@1x4096x4096": 1.0,
    "wo_scale_out@256x1024x1024": 1.0,
    "minilm": 1.5,
    "minilm_bf16": 1.5,
}


def interleaved(fns: dict, args: dict, rounds: int) -> dict:
    """Median wall time of each jitted ``fns[name](*args[name])``, called round-robin."""
    for name, fn in fns.items():  # compile + warm up
        jax.block_until_ready(fn(*args[name]))
        jax.block_until_ready(fn(*args[name]))
    names = list(fns)
    runs = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            jax.block_until_ready(fns[name](*args[name]))
            runs[name].append(time.perf_counter() - start)
    return {name: {"median_s": float(np.median(t)), "runs_s": t} for name, t in runs.items()}


def _random(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _qwix_dense(x, w):
    """(apply, params) of a Qwix-PTQ W8A8 linen Dense with kernel ``w``, or None."""
    try:
        import flax.linen as nn
        import qwix
    except Exception:  # noqa: BLE001 - optional comparator
        return None
    model = nn.Dense(w.shape[1], use_bias=False)
    rules = [qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)]
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(qmodel.init, jax.random.key(0), x)
    qparams = qwix.quantize_params({"kernel": w}, abstract["params"])
    return jax.jit(lambda p, x: qmodel.apply({"params": p}, x)), qparams


def _aqt_dot():
    try:
        from aqt.jax.v2 import config as aqt_config
    except Exception:  # noqa: BLE001 - optional comparator
        return None
    dot = aqt_config.config_v4(fwd_bits=8, dlhs_bits=None, drhs_bits=None)
    return jax.jit(lambda x, w: dot(x, w, DENSE))


def s8_dot_lines(fn, *args) -> list[str]:
    """The compiled HLO instructions of ``fn`` that are dots with an s32 result."""
    hlo = fn.lower(*args).compile().as_text()
    return [line.strip()[:200] for line in hlo.splitlines() if " dot(" in line and "s32[" in line.split("=")[1][:20]]


def dense_case(m, k, n, rounds, comparators=True) -> dict:
    x, w = _random((m, k), 0), _random((k, n), 1, ) * 0.05
    q = jc.quantize(w, channel_axes=(-1,), activation="dynamic")
    q_out_in = jc.quantize(w.T, channel_axes=(0,), activation="dynamic")
    x_codes = jnp.clip(jnp.round(x * 20), -127, 127).astype(jnp.int8)
    fns = {
        "f32": (jax.jit(lambda x, w: x @ w), (x, w)),
        "w8a8": (jax.jit(functools.partial(quantized_dot_general, dimension_numbers=DENSE)), (x, q)),
        "w8a8_out_in": (jax.jit(compressed(lambda w, x: x @ w.T)), (q_out_in, x)),
        "raw_s8": (
            jax.jit(lambda a, b: jax.lax.dot_general(a, b, DENSE, preferred_element_type=jnp.int32)),
            (x_codes, q.values),
        ),
    }
    flax_params, _ = jc.quantize_params({"kernel": w}, [jc.QuantRule(pattern="kernel", channel_axes=(-1,), activation="dynamic")])
    fns["w8a8_stored"] = (jax.jit(compressed(lambda p, x: x @ p["kernel"])), (flax_params, x))
    fns["w8a8_bf16"] = (jax.jit(compressed(lambda p, x: x @ p["kernel"], policy="integer_bf16")), (flax_params, x))
    unavailable = []
    if comparators:
        qwix_dense = _qwix_dense(x, w)
        if qwix_dense is None:
            unavailable.append("qwix_ptq")
        else:
            fns["qwix_ptq"] = (qwix_dense[0], (qwix_dense[1], x))
        aqt = _aqt_dot()
        if aqt is None:
            unavailable.append("aqt_int8")
        else:
            fns["aqt_int8"] = (aqt, (x, w))
    timings = interleaved({k_: v[0] for k_, v in fns.items()}, {k_: v[1] for k_, v in fns.items()}, rounds)
    reference = np.asarray(x @ w, np.float64)
    rows = []
    base = timings["f32"]["median_s"]
    for name, timing in timings.items():
        out = np.asarray(fns[name][0](*fns[name][1]), np.float64)
        error = None if name == "raw_s8" else float(np.abs(out - reference).max() / np.abs(reference).max())
        rows.append(
            {
                "case": f"{name}@{m}x{k}x{n}",
                "variant": name,
                "shape": [m, k, n],
                "median_ms": 1e3 * timing["median_s"],
                "speedup": base / timing["median_s"],
                "rel_max_error": error,
                "runs_s": timing["runs_s"],
            }
        )
    for name in unavailable:
        rows.append({"case": f"{name}@{m}x{k}x{n}", "variant": name, "shape": [m, k, n], "status": "unavailable"})
    hlo_names = [name for name in ("w8a8", "w8a8_out_in", "w8a8_stored") if name in fns]
    return {"rows": rows, "hlo_s32_dots": {name: s8_dot_lines(fns[name][0], *fns[name][1]) for name in hlo_names}}


def weight_only_case(m, k, n, rounds) -> list[dict]:
    x, w = _random((m, k), 0), _random((k, n), 1) * 0.05
    q = jc.quantize(w, channel_axes=(-1,))
    fns = {
        "f32": (jax.jit(lambda x, w: x @ w), (x, w)),
        "wo_scale_out": (jax.jit(functools.partial(quantized_dot_general, dimension_numbers=DENSE)), (x, q)),
        "wo_dequant": (jax.jit(lambda x, q: x @ q.dequantize()), (x, q)),
    }
    timings = interleaved({k_: v[0] for k_, v in fns.items()}, {k_: v[1] for k_, v in fns.items()}, rounds)
    base = timings["f32"]["median_s"]
    return [
        {"case": f"{name}@{m}x{k}x{n}", "variant": name, "shape": [m, k, n], "median_ms": 1e3 * t["median_s"],
         "speedup": base / t["median_s"], "runs_s": t["runs_s"]}
        for name, t in timings.items()
    ]


def grouped_case(m, k, n, rounds, group_size=128) -> list[dict]:
    x, w = _random((m, k), 0), _random((k, n), 1) * 0.05
    q = jc.quantize(w, channel_axes=(-1,), group_size=group_size, activation="dynamic")

    def dequant_then_float(x, q):
        return x @ q.dequantize()

    fns = {
        "f32": (jax.jit(lambda x, w: x @ w), (x, w)),
        "group_int": (jax.jit(functools.partial(quantized_dot_general, dimension_numbers=DENSE)), (x, q)),
        "group_dequant": (jax.jit(dequant_then_float), (x, q)),
    }
    timings = interleaved({k_: v[0] for k_, v in fns.items()}, {k_: v[1] for k_, v in fns.items()}, rounds)
    base = timings["f32"]["median_s"]
    return [
        {"case": f"{name}@{m}x{k}x{n}/g{group_size}", "variant": name, "shape": [m, k, n],
         "median_ms": 1e3 * t["median_s"], "speedup": base / t["median_s"], "runs_s": t["runs_s"]}
        for name, t in timings.items()
    ]


def minilm_case(batch, length, sentences_n, rounds, calibrate_batches=0) -> dict:
    from examples.bert import BertModel, embed, load_minilm, load_sentences, tokenize

    config, params, tokenizer = load_minilm()
    params = jax.tree_util.tree_map(jnp.asarray, params)
    model = BertModel(config)
    rules = [jc.QuantRule(pattern=r"params/encoder/.*/kernel", channel_axes=(-1,), activation="dynamic")]
    qparams, report = jc.quantize_params(params, rules, on_unused="error")
    fp32 = jax.jit(model.apply)
    w8a8 = jax.jit(compressed(model.apply))
    w8a8_bf16 = jax.jit(compressed(model.apply, policy="integer_bf16"))

    timing_sentences, _ = load_sentences(batch, offset=0)
    timing_batch = tokenize(tokenizer, timing_sentences, max_length=length, pad_to=length)
    ids, mask, types = (jnp.asarray(timing_batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    logical, _ = jc.quantize_params(params, rules, on_unused="error", layout="logical")
    variants = {"fp32": fp32, "w8a8": w8a8, "w8a8_logical": w8a8, "w8a8_bf16": w8a8_bf16}
    variant_args = {
        "fp32": (params, ids, mask, types),
        "w8a8": (qparams, ids, mask, types),
        "w8a8_logical": (logical, ids, mask, types),
        "w8a8_bf16": (qparams, ids, mask, types),
    }
    timings = interleaved(variants, variant_args, rounds)

    held_out, source = load_sentences(sentences_n, offset=batch)
    cosines, bf16_cosines, bf16_max_diff = [], [], 0.0
    for start in range(0, sentences_n, batch):
        chunk = held_out[start : start + batch]
        chunk = chunk + [chunk[-1]] * (batch - len(chunk))  # fixed shape: no recompiles
        tokens = tokenize(tokenizer, chunk, max_length=length, pad_to=length)
        reference = np.asarray(embed(fp32, params, tokens), np.float64)
        quantized = np.asarray(embed(w8a8, qparams, tokens), np.float64)
        carried = np.asarray(embed(w8a8_bf16, qparams, tokens), np.float64)
        keep = min(batch, sentences_n - start)
        cosines.extend(np.sum(reference * quantized, axis=-1)[:keep].tolist())
        bf16_cosines.extend(np.sum(reference * carried, axis=-1)[:keep].tolist())
        bf16_max_diff = max(bf16_max_diff, float(np.abs(carried - quantized)[:keep].max()))
    static = None
    if calibrate_batches:
        from jaxcompress.execute import attach_activation_scales, calibrate_activations

        calibration_sentences, _ = load_sentences(batch * calibrate_batches, offset=batch + sentences_n)
        batches = []
        for start in range(0, len(calibration_sentences), batch):
            tokens = tokenize(tokenizer, calibration_sentences[start : start + batch], max_length=length, pad_to=length)
            batches.append(tuple(jnp.asarray(tokens[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
        scales = calibrate_activations(model.apply, qparams, batches, method="percentile", percentile=99.99)
        static_params = attach_activation_scales(qparams, scales, activation="static")
        static_cosines = []
        for start in range(0, sentences_n, batch):
            chunk = held_out[start : start + batch]
            chunk = chunk + [chunk[-1]] * (batch - len(chunk))
            tokens = tokenize(tokenizer, chunk, max_length=length, pad_to=length)
            reference = np.asarray(embed(fp32, params, tokens), np.float64)
            quantized = np.asarray(embed(w8a8, static_params, tokens), np.float64)
            keep = min(batch, sentences_n - start)
            static_cosines.extend(np.sum(reference * quantized, axis=-1)[:keep].tolist())
        static_timing = interleaved(
            {"fp32": fp32, "w8a8_static": w8a8, "w8a8_static_bf16": w8a8_bf16},
            {"fp32": (params, ids, mask, types), "w8a8_static": (static_params, ids, mask, types),
             "w8a8_static_bf16": (static_params, ids, mask, types)},
            rounds,
        )
        static = {
            "calibration": f"percentile 99.99 over {len(batches)} batches of {batch} (sentences not in the held-out set)",
            "speedup": static_timing["fp32"]["median_s"] / static_timing["w8a8_static"]["median_s"],
            "bf16_speedup": static_timing["fp32"]["median_s"] / static_timing["w8a8_static_bf16"]["median_s"],
            "cosine_mean": float(np.mean(static_cosines)),
            "cosine_min": float(np.min(static_cosines)),
        }
    hlo = w8a8.lower(qparams, ids, mask, types).compile().as_text()
    return {
        "static": static,
        "case": "minilm",
        "batch": batch,
        "tokens": length,
        "quantized_leaves": len(report.quantized),
        "fp32_median_ms": 1e3 * timings["fp32"]["median_s"],
        "w8a8_median_ms": 1e3 * timings["w8a8"]["median_s"],
        "speedup": timings["fp32"]["median_s"] / timings["w8a8"]["median_s"],
        "logical_speedup": timings["fp32"]["median_s"] / timings["w8a8_logical"]["median_s"],
        "bf16_median_ms": 1e3 * timings["w8a8_bf16"]["median_s"],
        "bf16_speedup": timings["fp32"]["median_s"] / timings["w8a8_bf16"]["median_s"],
        "bf16_cosine_mean": float(np.mean(bf16_cosines)),
        "bf16_max_abs_diff_vs_w8a8": bf16_max_diff,
        "stored_kernels": sum(1 for q in jax.tree_util.tree_leaves(qparams, is_leaf=lambda x: isinstance(x, jc.QArray))
                              if isinstance(q, jc.QArray) and q.stored_permutation is not None),
        "cosine_mean": float(np.mean(cosines)),
        "cosine_min": float(np.min(cosines)),
        "held_out_sentences": len(cosines),
        "sentence_source": source,
        "s8_dots_in_hlo": sum(1 for line in hlo.splitlines() if " dot(" in line and "= s32[" in line),
        "runs_s": {k: v["runs_s"] for k, v in timings.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (< 60 s on 2 cores)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (default 30, quick 4)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default results/int8_matmul[_quick].json)")
    parser.add_argument("--skip-minilm", action="store_true", help="kernel-level cases only")
    args = parser.parse_args(argv)
    rounds = args.rounds or (4 if args.quick else 30)
    out = args.out or RESULTS_DIR / ("int8_matmul_quick.json" if args.quick else "int8_matmul.json")

    dense_shapes = [(32, 4096, 4096), (256, 1024, 1024), (1, 4096, 4096)]
    if not args.quick:
        dense_shapes.insert(2, (2048, 2048, 2048))
        dense_shapes.insert(2, (4096, 384, 1536))  # a MiniLM FFN dot at 32 x 128 tokens
    started = time.perf_counter()
    rows, hlo = [], {}
    for shape in dense_shapes:
        result = dense_case(*shape, rounds=rounds if shape[0] * shape[1] * shape[2] < 2**31 else max(3, rounds // 5))
        rows += result["rows"]
        hlo["x".join(map(str, shape))] = result["hlo_s32_dots"]
    rows += weight_only_case(256, 1024, 1024, rounds)
    rows += grouped_case(32, 4096, 4096, rounds) if not args.quick else grouped_case(32, 1024, 1024, rounds)
    minilm = None
    if not args.skip_minilm:
        if args.quick:
            minilm = minilm_case(4, 128, 8, 2)
        else:
            minilm = minilm_case(32, 128, 256, 10, calibrate_batches=4)
    by_case = {row["case"]: row for row in rows}
    goals = []
    for case, target in GOALS.items():
        if case.startswith("minilm"):
            measured = None if not minilm else minilm["bf16_speedup" if case == "minilm_bf16" else "speedup"]
        else:
            measured = by_case.get(case, {}).get("speedup")
        goals.append({"case": case, "goal_speedup": target, "measured": measured, "met": None if measured is None else measured >= target})
    data = {
        "quick": args.quick,
        "rounds": rounds,
        "note": "speedup = f32 median / variant median, interleaved in one run on a shared CPU",
        "environment": environment(),
        "results": rows,
        "hlo_s32_dots": hlo,
        "minilm": minilm,
        "goals": goals,
        "wall_s": time.perf_counter() - started,
    }
    path = write_json(out, data)
    columns = [("case", "case", ""), ("median_ms", "median ms", ".3f"), ("speedup", "x f32", ".2f"), ("rel_max_error", "rel err", ".1e"), ("status", "status", "")]
    print(format_table(rows, columns))
    if minilm:
        print(
            f"\nMiniLM-L6 batch {minilm['batch']}x{minilm['tokens']}: fp32 {minilm['fp32_median_ms']:.1f} ms, "
            f"W8A8 {minilm['w8a8_median_ms']:.1f} ms, speedup {minilm['speedup']:.2f}x, cosine mean "
            f"{minilm['cosine_mean']:.5f} (min {minilm['cosine_min']:.5f}) on {minilm['held_out_sentences']} held-out sentences"
        )
        print(f"  ({minilm['stored_kernels']} kernels stored (out, in) by quantize_params' default layout; "
              f"with layout='logical', codes (in, out): speedup {minilm['logical_speedup']:.2f}x)")
        print(f"  policy='integer_bf16' (bf16 codes, f32 sums): {minilm['bf16_median_ms']:.1f} ms, speedup "
              f"{minilm['bf16_speedup']:.2f}x, cosine mean {minilm['bf16_cosine_mean']:.5f}, max |diff| vs W8A8 "
              f"{minilm['bf16_max_abs_diff_vs_w8a8']:.1e}")
        if minilm["static"]:
            st = minilm["static"]
            print(f"  static W8A8 ({st['calibration']}): speedup {st['speedup']:.2f}x (integer_bf16 {st['bf16_speedup']:.2f}x), "
                  f"cosine mean {st['cosine_mean']:.5f} (min {st['cosine_min']:.5f})")
    print("\nbatch-1 integer dot (w8a8_out_in@1x4096x4096) in the compiled HLO:")
    for line in hlo.get("1x4096x4096", {}).get("w8a8_out_in", []):
        print("  " + line)
    print("\ngoals: " + ", ".join(f"{g['case']} {g['measured']:.2f}x (goal {g['goal_speedup']})" for g in goals if g["measured"] is not None))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
