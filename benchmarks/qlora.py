"""QLoRA on our tiny decoder LM: how much of the perplexity lost to a 4-bit base LoRA recovers, and the base's memory.

    python benchmarks/qlora.py            # the FULL tiny LM (examples/tiny_lm.py), int4 and nf4 bases
    python benchmarks/qlora.py --quick    # the QUICK toy model, a few steps (CI smoke run)

Model: `examples.tiny_lm` (a Llama-style decoder pre-trained on its ``train`` split). Every
Dense kernel (attention, MLP, LM head) is quantized by round-to-nearest, symmetric absmax, one
scale per group of ``--group`` inputs and output column: ``int4`` codes or ``nf4`` (the QLoRA
code book); the embedding table stays float. Rank-``--rank`` adapters on every kernel
(`jaxcompress.lora`) are trained with Adam for ``--steps`` steps on random windows of the
``tune`` split (text held out from pre-training and from evaluation); perplexity is measured on
the held-out ``eval`` split.

Reported per base:

* ``ppl``: held-out perplexity of the quantized base, then after QLoRA;
* ``recovered``: ``(ppl_quantized - ppl_qlora) / (ppl_quantized - ppl_fp32)`` (1.0: all of the
  loss recovered; > 1: better than the float model);
* the same LoRA run on the FLOAT base (``fp32+lora``) is the control: fine-tuning on new text
  helps the float model too, so ``recovered`` can exceed what the quantized base alone would
  allow. The honest figure for "what the quantized base costs after fine-tuning" is
  ``ppl_qlora / ppl_fp32+lora``, and ``recovered_vs_control``:
  ``(ppl_quantized - ppl_qlora) / (ppl_quantized - ppl_fp32+lora)``;
* memory: bytes of the base tree (float vs quantized), and of the jitted training step's
  compiled program (``memory_analysis()``: arguments and temporaries), float vs quantized base;
* time: median wall time of a training step (after warm-up) on this shared, noisy CPU:
  indicative only, read the ratios.

``--bases fp32,int4 --merge`` runs some bases and replaces their rows in an existing JSON (the
fp32 control is in every run unless ``--bases`` leaves it out and the JSON already has it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxcompress as jc  # noqa: E402
from benchmarks._common import RESULTS_DIR, environment, format_table, write_json  # noqa: E402
from examples.tiny_lm import load_or_train_tiny_lm, make_apply, perplexity, tune_tokens  # noqa: E402
from jaxcompress.lora import LoraRule, lora_apply, lora_init, lora_train_step  # noqa: E402

KERNELS = r".*kernel"
GOAL_RECOVERED = 0.5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the QUICK toy model, a few steps")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 100, quick 4)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam peak rate (2e-3 made even the float model worse on the eval split)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group", type=int, default=64, help="quantization group size along the input axis (0: one scale per output column)")
    parser.add_argument("--bases", default="fp32,int4,nf4", help="comma-separated among fp32 (the control), int4, nf4")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default results/qlora[_quick].json)")
    parser.add_argument("--merge", action="store_true", help="replace this run's rows in an existing --out JSON")
    return parser.parse_args(argv)


def quant_rule(base: str, group: int) -> jc.QuantRule:
    grouping = {"group_size": group} if group else {}
    if base == "int4":
        return jc.QuantRule(pattern=KERNELS, bits=4, channel_axes=(-1,), **grouping)
    if base == "nf4":
        return jc.QuantRule(pattern=KERNELS, qtype="nf4", channel_axes=(-1,), **grouping)
    raise ValueError(f"--bases: unknown base {base!r} (expected int4 or nf4)")


def tree_bytes(tree) -> int:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, jc.QArray))
    return int(sum(leaf.nbytes if isinstance(leaf, jc.QArray) else np.asarray(leaf).nbytes for leaf in leaves))


def batches(stream: np.ndarray, seq_len: int, batch: int, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - seq_len, batch)
        yield jnp.asarray(np.stack([stream[s : s + seq_len] for s in starts]), jnp.int32)


def compile_step(step, adapters, state, base, ids):
    """The step compiled once, and its ``memory_analysis()`` (arguments, temporaries, outputs)."""
    compiled = step.lower(adapters, state, base, ids).compile()
    analysis = compiled.memory_analysis()
    return compiled, {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
    }


def run(base_name: str, base, apply, stream, eval_tokens, seq_len: int, args, steps: int) -> dict:
    forward = lora_apply(apply)

    def loss(adapters, base, ids):
        logits = forward(base, adapters, ids)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    adapters = lora_init(jax.random.key(0), base, LoraRule(pattern=KERNELS), rank=args.rank, alpha=args.alpha)
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, steps))
    state = optimizer.init(adapters)
    step = lora_train_step(loss, optimizer)
    data = list(batches(stream, seq_len, args.batch, steps))
    compiled, mem = compile_step(step, adapters, state, base, data[0])
    evaluate = lambda pair, ids: forward(pair[0], pair[1], ids)  # one compiled program for before and after
    ppl_before = perplexity(evaluate, (base, adapters), eval_tokens)
    losses, times = [], []
    for ids in data:
        start = time.perf_counter()
        adapters, state, value = compiled(adapters, state, base, ids)
        losses.append(float(value))
        times.append(time.perf_counter() - start)
    ppl_after = perplexity(evaluate, (base, adapters), eval_tokens)
    timed = sorted(times[1:]) if len(times) > 1 else times
    return {
        "base": base_name,
        "base_bytes": tree_bytes(base),
        "adapter_bytes": tree_bytes(adapters),
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "step_median_s": timed[len(timed) // 2],
        "first_step_s": times[0],
        "memory": mem,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    steps = args.steps or (4 if args.quick else 100)
    out = args.out or RESULTS_DIR / ("qlora_quick.json" if args.quick else "qlora.json")
    lm = load_or_train_tiny_lm(quick=args.quick)
    config, params, _, eval_tokens = lm
    if args.quick:
        eval_tokens = eval_tokens[:4]
    seq_len = int(eval_tokens.shape[1])
    stream = np.asarray(tune_tokens(quick=args.quick))
    apply = make_apply(config)
    started = time.perf_counter()
    ppl_fp32 = perplexity(apply, params, eval_tokens)
    names = [b.strip() for b in args.bases.split(",") if b.strip()]
    rows = []
    for name in names:
        base = params if name == "fp32" else jc.quantize_params(params, [quant_rule(name, args.group)])[0]
        rows.append(run(name, base, apply, stream, eval_tokens, seq_len, args, steps))
    previous = json.loads(out.read_text()) if args.merge and out.is_file() else None
    if previous is not None:
        if previous["settings"] != {**previous["settings"], "steps": steps, "rank": args.rank, "group": args.group,
                                    "lr": args.lr, "batch": args.batch, "seq_len": seq_len}:
            raise ValueError(f"--merge: {out} was measured with other settings ({previous['settings']})")
        rows = [r for r in previous["results"] if r["base"] not in names] + rows
    rows.sort(key=lambda r: ["fp32", "int4", "nf4"].index(r["base"]))
    if not rows or rows[0]["base"] != "fp32":
        raise ValueError("--bases: the fp32 control is needed (in this run or in the --merge JSON)")
    control = rows[0]["ppl_after"]
    for row in rows:
        lost = row["ppl_before"] - ppl_fp32
        row["recovered"] = None if row["base"] == "fp32" or lost <= 0 else (row["ppl_before"] - row["ppl_after"]) / lost
        lost_vs_control = row["ppl_before"] - control
        row["recovered_vs_control"] = (None if row["base"] == "fp32" or lost_vs_control <= 0 else
                                       (row["ppl_before"] - row["ppl_after"]) / lost_vs_control)
        row["ppl_vs_fp32_lora"] = row["ppl_after"] / control
        row["temp_vs_fp32"] = row["memory"]["temp_bytes"] / max(rows[0]["memory"]["temp_bytes"], 1)
        row["base_bytes_vs_fp32"] = row["base_bytes"] / rows[0]["base_bytes"]
        row["goal_recovered_met"] = None if row["recovered"] is None else row["recovered"] >= GOAL_RECOVERED
    result = {
        "benchmark": "qlora",
        "quick": bool(args.quick),
        "model": {"hidden": config.hidden_size, "layers": config.num_layers, "vocab": config.vocab_size,
                  "params": int(sum(np.asarray(x).size for x in jax.tree_util.tree_leaves(params)))},
        "settings": {"steps": steps, "rank": args.rank, "alpha": args.alpha, "lr": args.lr, "batch": args.batch,
                     "seq_len": seq_len, "group": args.group, "eval_tokens": int(eval_tokens.size)},
        "ppl_fp32": ppl_fp32,
        "goal_recovered": GOAL_RECOVERED,
        "results": rows,
        "wall_s": time.perf_counter() - started + (previous["wall_s"] if previous else 0.0),
        "load_average": os.getloadavg(),
        "environment": environment(),
    }
    write_json(out, result)
    table = [
        {**r, "recovered": r["recovered"], "base_mb": r["base_bytes"] / 1e6, "args_mb": r["memory"]["argument_bytes"] / 1e6,
         "temp_mb": r["memory"]["temp_bytes"] / 1e6, "step_ms": r["step_median_s"] * 1e3}
        for r in rows
    ]
    print(f"tiny LM fp32 held-out perplexity {ppl_fp32:.2f}; {steps} LoRA steps, rank {args.rank}, "
          f"load average {os.getloadavg()[0]:.1f} (shared CPU: times indicative)")
    print(format_table(table, [
        ("base", "base", "s"), ("ppl_before", "ppl base", ".2f"), ("ppl_after", "ppl +LoRA", ".2f"),
        ("recovered", "recovered", ".2f"), ("recovered_vs_control", "vs control", ".2f"),
        ("ppl_vs_fp32_lora", "vs fp32+LoRA", ".3f"), ("base_mb", "base MB", ".2f"),
        ("args_mb", "step args MB", ".2f"), ("temp_mb", "step temp MB", ".2f"), ("step_ms", "step ms", ".0f"),
    ]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
