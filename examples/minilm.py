"""One-shot compression of the real all-MiniLM-L6-v2 sentence embedder, method by method.

Every encoder Dense kernel (q, k, v, attention output, intermediate, output: 36 kernels, 10.6M
weights) is compressed from a few hundred calibration sentences (the Lee news corpus shipped in
the ``gensim`` wheel, read as a file), then compared with the fp32 model on

* held-out sentences: mean cosine similarity of the sentence embeddings to fp32's;
* WordSim353 and SimLex-999 (``gensim/test/test_data``): each word embedded by the model, the
  cosine between the two words of a pair, Spearman correlation with the human scores (fp32's too);
* size: the stored bytes of the compressed kernels (`QArray.nbytes`; dense float for pruning,
  whose sparsity is reported) and of the whole model.

Methods (each skipped with a message when its implementation or Qwix is not importable):
fp32; RTN W8A8 (per-channel int8 weights, dynamic per-token int8 activations, run through
`jaxcompress.compressed`: int8 x int8 dots); SmoothQuant W8A8; RTN W4 g128 (weight-only);
AWQ W4 g128; GPTQ W4 g128; magnitude / Wanda / SparseGPT 50%; mixed precision at the size of
uniform int4 g128; and Qwix 0.1.8 PTQ W8A8 / W4 g128 plus its contrib GPTQ / AWQ side by side.

    python examples/minilm.py                   # full run, writes results/minilm.json
    python examples/minilm.py --quick           # CI-sized smoke run (a subset of methods)
    python examples/minilm.py --methods fp32,awq_w4g128
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import json
import contextlib
import os
import signal
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
from examples.bert import load_minilm, load_sentences, tokenize  # noqa: E402
from jaxcompress.models.bert import BertModel, mean_pool  # noqa: E402
from jaxcompress.oneshot.ranks import spearman  # noqa: E402  (re-exported: tests import it from here)
from jaxcompress.rules import path_to_str  # noqa: E402

KERNELS = r"params/encoder/layer_\d+/.*/kernel"
QWIX_MODULES = r"encoder/layer_\d+/.*"
ALL_METHODS = (
    "fp32",
    "rtn_w8a8",
    "smoothquant_w8a8",
    "smoothquant_w8a8_search",
    "rtn_w4g128",
    "awq_w4g128",
    "awq_w4g128_clip",
    "gptq_w4g128",
    "magnitude_50",
    "wanda_50",
    "sparsegpt_50",
    "mixed_w4size",
    "qwix_ptq_w8a8",
    "qwix_ptq_w4g128",
    "qwix_gptq_w4g128",
    "qwix_awq_w4g128",
)
QUICK_METHODS = ("fp32", "rtn_w8a8", "smoothquant_w8a8", "rtn_w4g128", "awq_w4g128")


class Skip(Exception):
    """A method that cannot run here (implementation or optional package missing)."""


# ---- data ----------------------------------------------------------------------------------------
def _gensim_test_data() -> Path | None:
    spec = importlib.util.find_spec("gensim")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "test" / "test_data"
        if path.is_dir():
            return path
    return None


def load_word_pairs(name: str, limit: int | None = None) -> list[tuple[str, str, float]]:
    """``(word1, word2, human score)`` rows of ``wordsim353.tsv`` / ``simlex999.txt``."""
    root = _gensim_test_data()
    if root is None:
        return []
    pairs = []
    for line in (root / name).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        first, second, score = line.split("\t")[:3]
        pairs.append((first.strip().lower(), second.strip().lower(), float(score)))
    return pairs[:limit] if limit else pairs


def bucketed_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[tuple]:
    """Batches of texts sorted by length, each padded to its longest rounded up to 16 tokens (few
    shapes to compile, few padding rows in the calibration statistics). Returns
    ``[(indices, (input_ids, attention_mask, token_type_ids)), ...]``."""
    lengths = [len(e.ids) for e in _encode(tokenizer, texts, max_length)]
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(texts), batch_size):
        index = order[start : start + batch_size]
        longest = max(lengths[i] for i in index)
        pad_to = min(max_length, -(-longest // 16) * 16)
        batch = tokenize(tokenizer, [texts[i] for i in index], max_length=max_length, pad_to=pad_to)
        batches.append((index, (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])))
    return batches


def _encode(tokenizer, texts, max_length):
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer.encode_batch(list(texts))


def embed_all(apply: Callable, params: Any, batches: list[tuple], count: int) -> np.ndarray:
    out = np.zeros((count, 384), np.float32)
    for index, (ids, mask, types) in batches:
        pooled = mean_pool(apply(params, ids, mask, types), mask)
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        out[index] = np.asarray(pooled)
    return out


# ---- methods -------------------------------------------------------------------------------------
def _import(module: str, name: str):
    """``module.name``, with ``row_mask`` (padding tokens left out of the calibration statistics)
    bound when the function accepts it."""
    try:
        function = getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError) as err:
        raise Skip(f"{module}.{name} is not available ({err})") from None
    if "row_mask" in inspect.signature(function).parameters:
        return functools.partial(function, row_mask=_attention_mask)
    return function


def _attention_mask(batch):
    return batch[1]  # (input_ids, attention_mask, token_type_ids): 0 on padding tokens


def _quant_rule(**spec):
    return [jc.QuantRule(pattern=KERNELS, channel_axes=(-1,), **spec)]


def _prune_rule():
    return [jc.PruneRule(pattern=KERNELS, sparsity=0.5)]


W8A8 = dict(bits=8, activation="dynamic")
W4G128 = dict(bits=4, group_size=128)


def build(method: str, apply, params, calibration, quick: bool) -> tuple[Any, Callable, dict]:
    """``(params, apply, info)`` of a compressed variant."""
    compressed_apply = jc.compressed(apply)
    if method == "fp32":
        return params, apply, {}
    if method == "rtn_w8a8":
        return jc.quantize_params(params, _quant_rule(**W8A8))[0], compressed_apply, {}
    if method in ("smoothquant_w8a8", "smoothquant_w8a8_search"):
        smoothquant = _import("jaxcompress.oneshot.smoothquant", "smoothquant")
        alpha = 0.5 if method == "smoothquant_w8a8" else tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
        qparams, report = smoothquant(apply, params, calibration, _quant_rule(**W8A8), alpha=alpha)
        alphas = [layer.parameter for layer in report.layers]
        return qparams, compressed_apply, {"alpha_mean": float(np.mean(alphas))}
    if method == "rtn_w4g128":
        return jc.quantize_params(params, _quant_rule(**W4G128))[0], compressed_apply, {}
    if method in ("awq_w4g128", "awq_w4g128_clip"):
        awq = _import("jaxcompress.oneshot.awq", "awq")
        clip = (0.95, 0.9, 0.85, 0.8, 0.75) if method.endswith("clip") else ()
        qparams, report = awq(apply, params, calibration, _quant_rule(**W4G128), grid=5 if quick else 20, clip_grid=clip)
        gain = [l.error / l.error_plain for l in report.layers if l.error_plain > 0]
        return qparams, compressed_apply, {
            "exponent_mean": float(np.mean([l.parameter for l in report.layers])),
            "calibration_error_vs_rtn": float(np.mean(gain)),
        }
    if method == "gptq_w4g128":
        gptq = _import("jaxcompress.oneshot.gptq", "gptq")
        qparams, _ = gptq(apply, params, calibration, _quant_rule(**W4G128), act_order=True)
        return qparams, compressed_apply, {}
    if method == "magnitude_50":
        pruned, _ = jc.prune_params(params, _prune_rule())
        return pruned, apply, {}
    if method == "wanda_50":
        wanda = _import("jaxcompress.oneshot.wanda", "wanda")
        return wanda(apply, params, calibration, _prune_rule())[0], apply, {}
    if method == "sparsegpt_50":
        sparsegpt = _import("jaxcompress.oneshot.sparsegpt", "sparsegpt")
        return sparsegpt(apply, params, calibration, _prune_rule())[0], apply, {}
    if method == "mixed_w4size":
        mixed_precision = _import("jaxcompress.oneshot.mixed", "mixed_precision")
        rtn4, _ = jc.quantize_params(params, _quant_rule(**W4G128))
        budget = _kernel_bytes(rtn4)
        # With (bits, group size) candidates: int2/int3 at g128 cost what int4 does (int3 is stored
        # in an int4 container) and int2 ruins a layer, so the choice that pays on MiniLM is where
        # to spend scale bytes (benchmarks/oneshot_prune.py). The per-layer error proxy tr(E H E^T)
        # misjudged layers here (mixed below uniform); "model" measures the embedding error of each
        # layer at each candidate (one forward pass over the calibration set per pair: slow).
        rules, report = mixed_precision(
            apply, params, calibration, KERNELS, candidates=((4, None), (4, 128), (4, 64), (4, 32), (8, None)),
            budget_bytes=budget, sensitivity="model",
        )
        qparams, _ = jc.quantize_params(params, rules)
        chosen = [f"int{r.bits}" + (f" g{r.group_size}" if r.group_size else "") for r in rules]
        return qparams, compressed_apply, {"choices": {c: chosen.count(c) for c in sorted(set(chosen))}}
    if method.startswith("qwix_"):
        return build_qwix(method, params, calibration)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")


def build_qwix(method: str, params, calibration):
    try:
        import qwix
    except Exception as err:  # noqa: BLE001 - optional comparator (the `bench` extra)
        raise Skip(f"qwix is not importable ({err}); install the bench extra") from None
    model = BertModel(load_minilm()[0])
    sample = calibration[0]
    if method == "qwix_ptq_w8a8":
        rules = [qwix.QtRule(module_path=QWIX_MODULES, weight_qtype=jnp.int8, act_qtype=jnp.int8)]
    else:
        rules = [qwix.QtRule(module_path=QWIX_MODULES, weight_qtype=jnp.int4, tile_size=128)]
    ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), *sample)["params"]
    apply = jax.jit(lambda p, *args: ptq_model.apply(p, *args))
    if method in ("qwix_ptq_w8a8", "qwix_ptq_w4g128"):
        return {"params": qwix.quantize_params(params["params"], abstract)}, apply, {}
    if method == "qwix_gptq_w4g128":
        from qwix.contrib import gptq as contrib

        rule = contrib.GptqRule(module_path=QWIX_MODULES, weight_qtype=jnp.int4, tile_size=128)
        provider = contrib.GptqCalibrationProvider([rule])
        suffix = "gptq"
    else:
        from qwix.contrib import awq as contrib

        rule = contrib.AwqRule(module_path=QWIX_MODULES, weight_qtype=jnp.int4, tile_size=128)
        provider = contrib.AwqCalibrationProvider([rule])
        suffix = "awq"
    with time_limit(CONTRIB_TIME_LIMIT[0], f"qwix.contrib.{suffix} (qwix 0.1.8 runs its per-column loop eagerly)"):
        return _qwix_contrib(qwix, contrib, suffix, model, provider, rules, params, calibration, abstract, apply)


CONTRIB_TIME_LIMIT = [600.0]


def _qwix_contrib(qwix, contrib, suffix, model, provider, rules, params, calibration, abstract, apply):
    calib_model = qwix.quantize_model(model, provider)
    stats_vars = None
    for batch in calibration:
        variables = {"params": params["params"]}
        if stats_vars is not None:
            variables["quant_stats"] = stats_vars
        _, updated = calib_model.apply(variables, *batch, mutable=["quant_stats"])
        stats_vars = updated["quant_stats"]
    if suffix == "gptq":
        qparams = contrib.quantize_params(params["params"], abstract, stats_vars)
    else:
        qparams = contrib.quantize_params(params["params"], abstract, stats_vars)
        inference = qwix.quantize_model(model, contrib.AwqInferenceProvider(rules))
        apply = jax.jit(lambda p, *args: inference.apply(p, *args))
    return {"params": qparams}, apply, {}


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Raise `Skip` if the block runs longer than ``seconds`` (SIGALRM; main thread, POSIX)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise Skip(f"{what} did not finish within {seconds:.0f} s on this machine")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- sizes ---------------------------------------------------------------------------------------
def _kernel_bytes(tree) -> int:
    import re

    pattern = re.compile(KERNELS)
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jc.QArray))[0]:
        if pattern.fullmatch(path_to_str(path)):
            total += _leaf_bytes(leaf)
    return total


def _leaf_bytes(leaf) -> int:
    if isinstance(leaf, jc.QArray):
        return leaf.nbytes
    if hasattr(leaf, "nbytes") and hasattr(leaf, "dtype"):
        return int(leaf.nbytes)
    # Qwix: QArray / WithAux dataclasses: count their array leaves
    return sum(_leaf_bytes(x) for x in jax.tree_util.tree_leaves(leaf) if x is not leaf)


def _qwix_kernel_bytes(tree) -> int:
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        text = jax.tree_util.keystr(path)
        if "encoder" in text and "kernel" in text:
            dtype = jnp.dtype(leaf.dtype)
            bits = 4 if dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else dtype.itemsize * 8
            total += int(np.prod(leaf.shape)) * bits // 8
    return total


def _sparsity(tree) -> float:
    import re

    pattern = re.compile(KERNELS)
    zeros = total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if pattern.fullmatch(path_to_str(path)):
            zeros += int(np.sum(np.asarray(leaf) == 0))
            total += int(np.prod(leaf.shape))
    return zeros / max(total, 1)


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run: few sentences, a subset of methods")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of: {','.join(ALL_METHODS)}")
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=256, help="held-out sentences")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=None, help="use only the first N word pairs of each set")
    parser.add_argument("--out", default="results/minilm.json", help="results JSON path")
    parser.add_argument("--qwix-contrib-limit", type=float, default=600.0,
                        help="seconds allowed to Qwix's contrib GPTQ / AWQ each before they are skipped")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.calibration, args.eval, args.pairs = min(args.calibration, 32), min(args.eval, 32), args.pairs or 40
    methods = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else ALL_METHODS)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        print(f"unknown methods {unknown}; known: {', '.join(ALL_METHODS)}", file=sys.stderr)
        return 2
    CONTRIB_TIME_LIMIT[0] = args.qwix_contrib_limit
    if "fp32" not in methods:
        methods.insert(0, "fp32")

    config, params, tokenizer = load_minilm()
    params = jax.tree_util.tree_map(jnp.asarray, params)
    model = BertModel(config)
    apply = model.apply
    calib_texts, source = load_sentences(args.calibration, offset=0, strict=False)
    eval_texts, _ = load_sentences(args.eval, offset=len(calib_texts), strict=False)
    if len(eval_texts) < 8:  # the small built-in fallback (no gensim wheel): split it in two
        half = len(calib_texts) // 2
        calib_texts, eval_texts = calib_texts[:half], calib_texts[half:]
    calibration = [b for _, b in bucketed_batches(tokenizer, calib_texts, args.batch_size, args.max_length)]
    eval_batches = bucketed_batches(tokenizer, eval_texts, args.batch_size * 2, args.max_length)
    word_sets = {name: load_word_pairs(file, args.pairs) for name, file in (("wordsim353", "wordsim353.tsv"), ("simlex999", "simlex999.txt"))}
    words = sorted({w for pairs in word_sets.values() for a, b, _ in pairs for w in (a, b)})
    word_index = {w: i for i, w in enumerate(words)}
    word_batches = bucketed_batches(tokenizer, words, 256, 16) if words else []
    print(f"all-MiniLM-L6-v2: {len(calib_texts)} calibration / {len(eval_texts)} held-out sentences ({source}); "
          f"{len(words)} words for " + ", ".join(f"{k} ({len(v)} pairs)" for k, v in word_sets.items()))

    reference = None
    rows, skipped = [], {}
    for method in methods:
        start = time.perf_counter()
        try:
            variant, run, info = build(method, apply, params, calibration, args.quick)
        except Skip as err:
            print(f"  {method:<24} skipped: {err}")
            skipped[method] = str(err)
            continue
        except Exception as err:  # noqa: BLE001 - one method failing must not hide the others
            print(f"  {method:<24} FAILED: {type(err).__name__}: {err}")
            traceback.print_exc(limit=3)
            skipped[method] = f"failed: {type(err).__name__}: {err}"
            continue
        build_s = time.perf_counter() - start
        run = jax.jit(run)
        sentences = embed_all(run, variant, eval_batches, len(eval_texts))
        word_vectors = embed_all(run, variant, word_batches, len(words)) if words else None
        if reference is None:
            reference = sentences
        row = {
            "method": method,
            "cosine": float(np.mean(np.sum(sentences * reference, axis=1))),
            "cosine_min": float(np.min(np.sum(sentences * reference, axis=1))),
            "build_s": round(build_s, 2),
        }
        for name, pairs in word_sets.items():
            if pairs:
                sims = [float(word_vectors[word_index[a]] @ word_vectors[word_index[b]]) for a, b, _ in pairs]
                row[name] = spearman(sims, [s for _, _, s in pairs])
        if method.startswith("qwix_"):
            row["kernel_bytes"] = _qwix_kernel_bytes(variant)
        else:
            row["kernel_bytes"] = _kernel_bytes(variant)
            row["model_bytes"] = sum(_leaf_bytes(x) for x in jax.tree_util.tree_leaves(variant, is_leaf=lambda x: isinstance(x, jc.QArray)))
        if method.endswith("_50"):
            row["sparsity"] = _sparsity(variant)
        row.update(info)
        rows.append(row)
        _write(args.out, calib_texts, eval_texts, source, word_sets, args.quick, rows, skipped)
        print(f"  {method:<24} cosine {row['cosine']:.5f}  " + "  ".join(
            f"{k} {row[k]:.4f}" for k in word_sets if k in row) + f"  kernels {row['kernel_bytes'] / 2**20:.2f} MiB  ({build_s:.1f} s)")

    print()
    print(format_table(rows, list(word_sets)))
    _write(args.out, calib_texts, eval_texts, source, word_sets, args.quick, rows, skipped)
    print(f"wrote {args.out}")
    return 0


def _write(path, calib_texts, eval_texts, source, word_sets, quick, rows, skipped) -> None:
    """Write the results so far (after every method: a long run keeps what it measured)."""
    result = {
        "model": "all-MiniLM-L6-v2",
        "calibration_sentences": len(calib_texts),
        "eval_sentences": len(eval_texts),
        "sentence_source": source,
        "word_pairs": {k: len(v) for k, v in word_sets.items()},
        "quick": quick,
        "rows": rows,
        "skipped": skipped,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def format_table(rows: list[dict], word_sets: list[str]) -> str:
    """A markdown table of the rows."""
    columns = ["method", "cosine", *word_sets, "kernels MiB", "sparsity"]
    widths = [24, 7, *(10 for _ in word_sets), 11, 8]
    lines = ["| " + " | ".join(f"{c:<{w}}" for c, w in zip(columns, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        cells = [row["method"], f"{row['cosine']:.4f}"]
        cells += [f"{row[k]:.4f}" if k in row else "-" for k in word_sets]
        cells.append(f"{row['kernel_bytes'] / 2**20:.2f}")
        cells.append(f"{row['sparsity']:.3f}" if "sparsity" in row else "-")
        lines.append("| " + " | ".join(f"{c:<{w}}" for c, w in zip(cells, widths)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
