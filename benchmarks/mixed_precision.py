"""Mixed precision against uniform W4 at equal bytes, on the tiny decoder LM and on MiniLM.

    python benchmarks/mixed_precision.py            # full run: the tiny LM, then all-MiniLM-L6-v2
    python benchmarks/mixed_precision.py --quick    # CI-sized (the quick LM, two MiniLM layers)

For each model the budget is the ``QArray.nbytes`` of the selected kernels quantized uniformly
to int4 g128 (`jaxcompress.quantize_params`, same `QuantSpec` options as the mixed rules), and
`mixed_precision` chooses per kernel with each sensitivity:

* ``"scaled"`` (the default): local ``tr(E H E^T)`` scaled to the model-output error measured at
  one probe candidate per kernel (one forward pass over the calibration set per kernel);
* ``"output"``: the local ``tr(E H E^T)`` alone (no forward pass);
* ``"model"``: the model-output error of every (kernel, candidate) pair (one pass per pair), the
  end-to-end measure the proxies are validated against: the table gives each proxy's Spearman
  rank correlation with it over all (kernel, candidate) pairs.

Candidate sets: the defaults of `mixed_precision` (the group size in the choice: int4
per-channel / g128 / g64 / g32, int8 per-channel) and bit-widths alone (int2/3/4/8 at g128). Quality: the LM's
held-out perplexity (lower is better), MiniLM's mean cosine to the fp32 sentence embeddings on
held-out sentences (higher is better). Wall times of the ``mixed_precision`` call are recorded
(a shared CPU: indicative only).
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
from jaxcompress.oneshot.mixed import candidate_label, mixed_precision  # noqa: E402

BITS_CANDIDATES = (2, 3, 4, 8)  # at group_size=128
DEFAULT_CANDIDATES = None  # mixed_precision's own default: int4 per-channel / g128 / g64 / g32, int8 per-channel
SENSITIVITIES = ("scaled", "output", "model")
CANDIDATE_SETS = {"bits": ("int2/3/4/8 g128", BITS_CANDIDATES), "default": ("default (group sizes)", DEFAULT_CANDIDATES)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument("--models", nargs="*", default=("tiny_lm", "minilm"), choices=("tiny_lm", "minilm"))
    parser.add_argument("--sensitivities", nargs="*", default=SENSITIVITIES, choices=SENSITIVITIES,
                        help="which to run (the Spearman correlations need 'model')")
    parser.add_argument("--candidate-sets", nargs="*", default=tuple(CANDIDATE_SETS), choices=tuple(CANDIDATE_SETS),
                        help="which candidate sets to run (default both)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default results/mixed_precision[_quick].json)")
    args = parser.parse_args(argv)
    args.out = args.out or RESULTS_DIR / ("mixed_precision_quick.json" if args.quick else "mixed_precision.json")
    return args


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of the finite pairs."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[ok], b[ok]).statistic) if ok.sum() > 2 else float("nan")


def kernel_bytes(tree) -> int:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jc.QArray))
    return int(sum(q.nbytes for q in leaves if isinstance(q, jc.QArray)))


def tiny_lm_setup(quick: bool):
    from examples.tiny_lm import calibration_batches, load_or_train_tiny_lm, make_apply, perplexity

    config, params, _, eval_tokens = load_or_train_tiny_lm(quick=quick)
    apply = make_apply(config)
    params = jax.device_put(params)
    calibration = calibration_batches(count=16 if quick else 64, batch_size=8, quick=quick)
    eval_tokens = eval_tokens[:16] if quick else eval_tokens
    quality = lambda p: perplexity(apply, p, eval_tokens)
    return dict(name="tiny_lm", fn=apply, params=params, batches=calibration, select=r"layers_\d+/.*/kernel",
                quality=quality, metric="perplexity", better=lambda a, b: a < b)


def minilm_setup(quick: bool):
    from benchmarks.oneshot_prune import cosines, sentence_batches
    from examples.bert import BertModel, embed, load_minilm, load_sentences

    config, params, tokenizer = load_minilm()
    params = jax.device_put(params)
    model = BertModel(config)
    embed_fn = jax.jit(lambda p, b: embed(model.apply, p, b))
    calibration, source = load_sentences(16 if quick else 128, offset=0, strict=False)
    held_out, _ = load_sentences(32 if quick else 256, offset=2000, strict=False)
    if source == "builtin":
        calibration, held_out = calibration[:16], calibration[16:]
    eval_batches = sentence_batches(tokenizer, held_out)
    calib = [(b["input_ids"], b["attention_mask"], b["token_type_ids"]) for b in sentence_batches(tokenizer, calibration)]
    embed_all = lambda p: np.concatenate([np.asarray(embed_fn(p, b)) for b in eval_batches])
    reference = embed_all(params)
    quality = lambda p: float(cosines(reference, embed_all(p)).mean())
    # fn's outputs must ignore padding for "model" / "scaled": the masked mean-pooled embedding
    fn = lambda p, ids, mask, types: embed(model.apply, p, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    kernels = r"params/encoder/layer_[01]/.*/kernel" if quick else r"params/encoder/layer_\d+/.*/kernel"
    return dict(name="minilm", fn=fn, params=params, batches=calib, select=kernels, quality=quality,
                metric="cosine", better=lambda a, b: a > b, row_mask=lambda batch: batch[1])


def run_model(setup: dict, rows: list, correlations: list, sensitivities=SENSITIVITIES,
              candidate_sets=tuple(CANDIDATE_SETS)) -> dict:
    params, select = setup["params"], setup["select"]
    extra = {"row_mask": setup["row_mask"]} if "row_mask" in setup else {}
    # the same QuantSpec options as mixed_precision's defaults (per output channel, groups along the input)
    qparams, _ = jc.quantize_params(params, [jc.QuantRule(pattern=select, bits=4, group_size=128, channel_axes=(-1,))])
    budget = kernel_bytes(qparams)
    fp32 = setup["quality"](params)
    uniform = setup["quality"](jc.dequantize_params(qparams))
    base = {"model": setup["name"], "metric": setup["metric"]}
    rows.append({**base, "method": "fp32", "candidates": "", "quality": fp32})
    rows.append({**base, "method": "uniform int4 g128", "candidates": "", "quality": uniform, "bytes": budget})
    print(f"{setup['name']}: fp32 {setup['metric']} {fp32:.4f}, uniform int4 g128 {uniform:.4f} ({budget} B)", flush=True)
    goals = {}
    for cand_name, candidates in (CANDIDATE_SETS[name] for name in candidate_sets):
        reports = {}
        for sensitivity in sensitivities:
            kwargs = {} if candidates is None else {"candidates": candidates}
            start = time.perf_counter()
            rules, report = mixed_precision(setup["fn"], params, setup["batches"], select, budget_bytes=budget,
                                            sensitivity=sensitivity, **kwargs, **extra)
            seconds = time.perf_counter() - start
            qmixed, _ = jc.quantize_params(params, rules, on_unused="error")
            assert kernel_bytes(qmixed) == report.total_bytes <= budget
            quality = setup["quality"](jc.dequantize_params(qmixed))
            choices: dict[str, int] = {}
            for layer in report.layers:
                label = candidate_label(layer.chosen_bits, layer.chosen_group_size)
                choices[label] = choices.get(label, 0) + 1
            layers, options = len(report.layers), len(report.layers[0].candidates)
            passes = {"model": layers * options, "scaled": layers, "output": 0}[sensitivity]
            rows.append({**base, "method": f"mixed {sensitivity}", "candidates": cand_name, "quality": quality,
                         "bytes": report.total_bytes, "seconds": seconds, "forward_passes": passes,
                         "choices": choices, "beats_uniform": bool(setup["better"](quality, uniform))})
            reports[sensitivity] = report
            print(f"  {cand_name:<24} {sensitivity:<7} {setup['metric']} {quality:.4f}  {seconds:6.1f} s  {choices}", flush=True)
        model_errors = np.array([layer.errors for layer in reports["model"].layers]) if "model" in reports else None
        for sensitivity in [s for s in ("scaled", "output") if s in reports and model_errors is not None]:
            errors = np.array([layer.errors for layer in reports[sensitivity].layers])
            correlations.append({**base, "candidates": cand_name, "sensitivity": sensitivity,
                                 "spearman_vs_model": spearman(errors, model_errors)})
        default = next((r for r in rows if r["model"] == setup["name"] and r["method"] == "mixed scaled"
                        and r["candidates"] == cand_name), None)
        if default is not None:
            goals[f"{setup['name']} mixed (defaults: scaled) {cand_name} beats uniform int4 g128"] = default["beats_uniform"]
    return goals


def main(argv=None):
    args = parse_args(argv)
    rows: list = []
    correlations: list = []
    goals: dict = {}
    setups = {"tiny_lm": tiny_lm_setup, "minilm": minilm_setup}
    for name in args.models:
        try:
            setup = setups[name](args.quick)
        except (FileNotFoundError, ImportError) as err:  # MiniLM / gensim not installed
            print(f"{name}: skipped ({type(err).__name__}: {err})")
            continue
        goals.update(run_model(setup, rows, correlations, args.sensitivities, args.candidate_sets))
    data = {"benchmark": "mixed_precision", "quick": args.quick, "environment": environment(), "results": rows,
            "correlations": correlations, "goals": goals}
    path = write_json(args.out, data)
    print()
    print(format_table(rows, [
        ("model", "model", ""), ("method", "method", ""), ("candidates", "candidates", ""),
        ("quality", "quality", ".4f"), ("metric", "metric", ""), ("bytes", "bytes", "d"),
        ("forward_passes", "passes", "d"), ("seconds", "seconds", ".1f"), ("choices", "choices", ""),
    ]))
    print()
    print(format_table(correlations, [("model", "model", ""), ("candidates", "candidates", ""),
                                      ("sensitivity", "sensitivity", ""), ("spearman_vs_model", "Spearman vs model", ".3f")]))
    for name, goal in goals.items():
        print(f"goal {name}: {goal}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
