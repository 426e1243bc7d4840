"""Mixed precision against uniform W4 at equal bytes, on the tiny decoder LM and on MiniLM.

    python benchmarks/mixed_precision.py            # full run: the tiny LM, then all-MiniLM-L6-v2
    python benchmarks/mixed_precision.py --quick    # CI-sized (the quick LM, two MiniLM layers)
    python benchmarks/mixed_precision.py --validate --candidate-sets default   # + the end-to-end validation

For each model the budget is the ``QArray.nbytes`` of the selected kernels quantized uniformly
to int4 g128 (`jaxcompress.quantize_params`, same `QuantSpec` options as the mixed rules, all
spelled out in ``SPEC``: symmetric absmax codes, float32 scales), and `mixed_precision` chooses
per kernel with each sensitivity:

* ``"scaled"`` (the default): local ``tr(E H E^T)`` scaled to the model-output error measured at
  one probe candidate per kernel (one forward pass over the calibration set per kernel);
* ``"output"``: the local ``tr(E H E^T)`` alone (no forward pass); ``"relative"`` / ``"trace"``
  (with ``--validate``): the other local proxies;
* ``"model"``: the model-output squared error on the calibration set of every (kernel, candidate)
  pair (one pass per pair).

``--validate`` (default: every sensitivity) measures the END-TO-END cost of every (kernel,
candidate) pair: the held-out loss increase with only that kernel quantized to that candidate
(the LM: mean next-token NLL, i.e. log perplexity; MiniLM: 1 - mean cosine to the fp32
embeddings), one held-out evaluation per pair (its split-half reliability, the Spearman between the
matrices measured on the even and on the odd held-out examples, bounds what any proxy can reach), and reports per sensitivity its Spearman rank
correlation (ties averaged, `jaxcompress.oneshot.mixed.spearman`) and Kendall tau-b with that
matrix over all pairs, the Spearman across kernels within each candidate (averaged over the
candidates: the comparison the knapsack trades on), its forward passes and wall time, and the
quality of its allocation; plus the knapsack run on the end-to-end matrix itself (an oracle: it
is tuned on the held-out set, a ceiling for any additive sensitivity, not a method).

Candidate sets: the defaults of `mixed_precision` (the group size in the choice: int4
per-channel / g128 / g64 / g32, int8 per-channel) and bit-widths alone (int2/3/4/8 at g128). Quality: the LM's
held-out perplexity (lower is better), MiniLM's mean cosine to the fp32 sentence embeddings on
held-out sentences (higher is better). Wall times of the ``mixed_precision`` call are recorded
(a shared CPU: indicative only).
"""

from __future__ import annotations

import argparse
import re
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
from jaxcompress.oneshot.knapsack import choose_bits  # noqa: E402
from jaxcompress.oneshot.mixed import SENSITIVITIES as ALL_SENSITIVITIES  # noqa: E402
from jaxcompress.oneshot.mixed import candidate_label, kendall_tau, mixed_precision, spearman  # noqa: E402

BITS_CANDIDATES = (2, 3, 4, 8)  # at group_size=128
DEFAULT_CANDIDATES = None  # mixed_precision's own default: int4 per-channel / g128 / g64 / g32, int8 per-channel
SENSITIVITIES = ("scaled", "output", "model")
# every QuantSpec option spelled out (mixed rules, the uniform budget and the end-to-end probes alike), so a change
# of the library's defaults cannot move these numbers: symmetric absmax codes, float32 scales per output channel
SPEC = dict(channel_axes=(-1,), symmetric=True, calibration="absmax", scale_dtype="float32")
CANDIDATE_SETS = {"bits": ("int2/3/4/8 g128", BITS_CANDIDATES), "default": ("default (group sizes)", DEFAULT_CANDIDATES)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument("--models", nargs="*", default=("tiny_lm", "minilm"), choices=("tiny_lm", "minilm"))
    parser.add_argument("--sensitivities", nargs="*", default=None, choices=ALL_SENSITIVITIES,
                        help=f"which to run (default {SENSITIVITIES}; with --validate all of {ALL_SENSITIVITIES})")
    parser.add_argument("--validate", action="store_true",
                        help="also measure every (kernel, candidate) end to end on the held-out set (only that kernel "
                             "quantized) and rank-correlate each sensitivity with it")
    parser.add_argument("--candidate-sets", nargs="*", default=tuple(CANDIDATE_SETS), choices=tuple(CANDIDATE_SETS),
                        help="which candidate sets to run (default both)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default results/mixed_precision[_quick].json)")
    args = parser.parse_args(argv)
    if args.sensitivities is None:
        args.sensitivities = ALL_SENSITIVITIES if args.validate else SENSITIVITIES
    args.out = args.out or RESULTS_DIR / ("mixed_precision_quick.json" if args.quick else "mixed_precision.json")
    return args


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

    @jax.jit
    def row_nll(p, batch):  # each row's mean next-token NLL (their mean is log perplexity: rows of one length)
        logp = jax.nn.log_softmax(apply(p, batch)[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)[..., 0], axis=1)

    rows = [jnp.asarray(eval_tokens[i:i + 16], jnp.int32) for i in range(0, len(eval_tokens), 16)]
    losses = lambda p: np.concatenate([np.asarray(row_nll(p, b), np.float64) for b in rows])
    return dict(name="tiny_lm", fn=apply, params=params, batches=calibration, select=r"layers_\d+/.*/kernel",
                quality=quality, metric="perplexity", better=lambda a, b: a < b,
                losses=losses, loss_name="held-out mean NLL (log perplexity)")


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
                metric="cosine", better=lambda a, b: a > b, row_mask=lambda batch: batch[1],
                losses=lambda p: 1.0 - cosines(reference, embed_all(p)), loss_name="held-out mean cosine drop")


def extra_passes(sensitivity: str, report) -> int:
    """Passes over the calibration set beyond the one that captures the input statistics (every
    sensitivity has that one): ``"model"`` one per (kernel, candidate that fits it), ``"scaled"`` one per kernel."""
    if sensitivity == "model":
        return int(sum(np.isfinite(layer.errors).sum() for layer in report.layers))
    return len(report.layers) if sensitivity == "scaled" else 0


def end_to_end(setup: dict, report) -> tuple[np.ndarray, np.ndarray, float, int]:
    """``[kernel, candidate]``: the held-out loss increase with ONLY that kernel quantized to that
    candidate (the rest fp32), through `quantize_params` with the same options as the mixed rules;
    ``nan`` where the candidate does not fit the kernel. ``setup["losses"](params)`` gives one loss
    per held-out example (LM row / sentence); the matrix is their mean, and the same measured on the
    even and on the odd examples alone (``[2, kernel, candidate]``) gives the measure's split-half
    reliability. Returns (matrix, halves, seconds, held-out passes)."""
    params = setup["params"]
    start = time.perf_counter()

    def measure(p):
        losses = np.asarray(setup["losses"](p), np.float64)
        return np.array([losses.mean(), losses[0::2].mean(), losses[1::2].mean()])

    base = measure(params)
    out = np.full((3, len(report.layers), len(report.layers[0].candidates)), np.nan)
    for row, layer in enumerate(report.layers):
        for c, (bits, group) in enumerate(layer.candidates):
            if not np.isfinite(layer.errors[c]):
                continue
            rule = jc.QuantRule(pattern=re.escape(layer.path), bits=bits, group_size=group, **SPEC)
            q, _ = jc.quantize_params(params, [rule], on_unused="error")
            out[:, row, c] = measure(jc.dequantize_params(q)) - base
    return out[0], out[1:], time.perf_counter() - start, int(np.isfinite(out[0]).sum()) + 1


def allocation_quality(setup: dict, report, errors: np.ndarray, budget: int) -> tuple[float, int, dict]:
    """Quality of the knapsack's choice for the errors ``errors`` (same sizes and budget as ``report``)."""
    sizes = np.array([layer.nbytes for layer in report.layers], np.int64)
    chosen, _ = choose_bits(np.where(np.isfinite(errors), errors, np.inf), sizes, budget)
    rules, choices = [], {}
    for layer, c in zip(report.layers, chosen):
        bits, group = layer.candidates[int(c)]
        rules.append(jc.QuantRule(pattern=re.escape(layer.path), bits=bits, group_size=group, **SPEC))
        choices[candidate_label(bits, group)] = choices.get(candidate_label(bits, group), 0) + 1
    q, _ = jc.quantize_params(setup["params"], rules, on_unused="error")
    total = int(sizes[np.arange(len(chosen)), chosen].sum())
    assert kernel_bytes(q) == total <= budget
    return setup["quality"](jc.dequantize_params(q)), total, choices


def correlate(errors: np.ndarray, reference: np.ndarray) -> dict:
    """Rank agreement of a sensitivity with the end-to-end matrix: over all (kernel, candidate)
    pairs, and across kernels within each candidate (the comparison the knapsack trades on; the
    order of one kernel's candidates is nearly always right), averaged over the candidates."""
    columns = [spearman(errors[:, c], reference[:, c]) for c in range(errors.shape[1])]
    columns = [v for v in columns if np.isfinite(v)]
    return {"spearman": spearman(errors, reference), "kendall": kendall_tau(errors, reference),
            "spearman_across_kernels": float(np.mean(columns)) if columns else float("nan")}


def run_model(setup: dict, rows: list, correlations: list, sensitivities=SENSITIVITIES,
              candidate_sets=tuple(CANDIDATE_SETS), validate: bool = False) -> dict:
    params, select = setup["params"], setup["select"]
    extra = {"row_mask": setup["row_mask"]} if "row_mask" in setup else {}
    # the same QuantSpec options as the mixed rules (per output channel, groups along the input, symmetric)
    qparams, _ = jc.quantize_params(params, [jc.QuantRule(pattern=select, bits=4, group_size=128, **SPEC)])
    budget = kernel_bytes(qparams)
    fp32 = setup["quality"](params)
    uniform = setup["quality"](jc.dequantize_params(qparams))
    base = {"model": setup["name"], "metric": setup["metric"]}
    rows.append({**base, "method": "fp32", "candidates": "", "quality": fp32})
    rows.append({**base, "method": "uniform int4 g128", "candidates": "", "quality": uniform, "bytes": budget})
    print(f"{setup['name']}: fp32 {setup['metric']} {fp32:.4f}, uniform int4 g128 {uniform:.4f} ({budget} B)", flush=True)
    goals = {}
    for cand_name, candidates in (CANDIDATE_SETS[name] for name in candidate_sets):
        reports, qualities = {}, {}
        for sensitivity in sensitivities:
            kwargs = {} if candidates is None else {"candidates": candidates}
            start = time.perf_counter()
            rules, report = mixed_precision(setup["fn"], params, setup["batches"], select, budget_bytes=budget,
                                            sensitivity=sensitivity, **SPEC, **kwargs, **extra)
            seconds = time.perf_counter() - start
            qmixed, _ = jc.quantize_params(params, rules, on_unused="error")
            assert kernel_bytes(qmixed) == report.total_bytes <= budget
            quality = setup["quality"](jc.dequantize_params(qmixed))
            choices: dict[str, int] = {}
            for layer in report.layers:
                label = candidate_label(layer.chosen_bits, layer.chosen_group_size)
                choices[label] = choices.get(label, 0) + 1
            passes = extra_passes(sensitivity, report)
            rows.append({**base, "method": f"mixed {sensitivity}", "candidates": cand_name, "quality": quality,
                         "bytes": report.total_bytes, "seconds": seconds, "forward_passes": passes,
                         "choices": choices, "beats_uniform": bool(setup["better"](quality, uniform))})
            reports[sensitivity] = (report, seconds, passes)
            qualities[sensitivity] = quality
            print(f"  {cand_name:<24} {sensitivity:<8} {setup['metric']} {quality:.4f}  {seconds:6.1f} s  "
                  f"{passes:4d} passes  {choices}", flush=True)
        if validate and reports:
            any_report = next(iter(reports.values()))[0]
            reference, halves, e2e_seconds, e2e_passes = end_to_end(setup, any_report)
            reliability = correlate(halves[0], halves[1])
            oracle, total, choices = allocation_quality(setup, any_report, reference, budget)
            rows.append({**base, "method": "oracle: held-out end-to-end errors", "candidates": cand_name,
                         "quality": oracle, "bytes": total, "seconds": e2e_seconds, "forward_passes": e2e_passes,
                         "choices": choices, "beats_uniform": bool(setup["better"](oracle, uniform))})
            print(f"  {cand_name:<24} end-to-end {setup['loss_name']}: {e2e_passes} held-out passes "
                  f"{e2e_seconds:.1f} s; knapsack on it (an oracle, tuned on the held-out set) {setup['metric']} "
                  f"{oracle:.4f} {choices}; split-half Spearman of the measure itself {reliability['spearman']:.3f} "
                  f"(across kernels {reliability['spearman_across_kernels']:.3f})", flush=True)
            for sensitivity, (report, seconds, passes) in reports.items():
                errors = np.array([layer.errors for layer in report.layers])
                correlations.append({**base, "candidates": cand_name, "sensitivity": sensitivity,
                                     "forward_passes": passes, "seconds": seconds,
                                     "quality": qualities[sensitivity], **correlate(errors, reference),
                                     "errors": errors.tolist()})
            correlations.append({**base, "candidates": cand_name, "sensitivity": "(end to end, held out)",
                                 "forward_passes": e2e_passes, "seconds": e2e_seconds, "quality": oracle,
                                 **{f"split_half_{k}": v for k, v in reliability.items()},
                                 "end_to_end": reference.tolist(), "end_to_end_halves": halves.tolist(),
                                 "loss": setup["loss_name"],
                                 "kernels": [layer.path for layer in any_report.layers],
                                 "candidate_labels": [candidate_label(*c) for c in any_report.layers[0].candidates]})
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
        goals.update(run_model(setup, rows, correlations, args.sensitivities, args.candidate_sets, args.validate))
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
    if correlations:
        print(format_table(correlations, [
            ("model", "model", ""), ("candidates", "candidates", ""), ("sensitivity", "sensitivity", ""),
            ("forward_passes", "passes", "d"), ("seconds", "seconds", ".1f"), ("spearman", "Spearman", ".3f"),
            ("kendall", "Kendall", ".3f"), ("spearman_across_kernels", "Spearman across kernels", ".3f"),
            ("quality", "its allocation", ".4f"), ("split_half_spearman", "split-half Spearman", ".3f"),
            ("split_half_spearman_across_kernels", "split-half across kernels", ".3f"),
        ]))
    for name, goal in goals.items():
        print(f"goal {name}: {goal}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
