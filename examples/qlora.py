"""QLoRA on our tiny decoder LM: quantize the base to NF4, train LoRA adapters, save them, merge and re-quantize.

    python examples/qlora.py            # the FULL tiny LM (examples/tiny_lm.py), 150 steps
    python examples/qlora.py --quick    # the QUICK toy model, a few steps (CI smoke run)

1. load (or train once, cached) the tiny Llama-style LM and quantize every Dense kernel to NF4
   (groups of 64 inputs per output column, the QLoRA layout); the embedding stays float;
2. rank-8 adapters on every kernel (`jaxcompress.lora.lora_init`); train them with Adam on
   the ``tune`` split (text held out from pre-training and evaluation): `lora_apply(apply)` runs the model on the NF4 base (never stored as float)
   plus ``(x @ A) @ B``, `lora_train_step` differentiates the adapters only;
3. held-out (``eval`` split) perplexity of the quantized base before and after;
4. save the adapters alone (a small safetensors file) and load them back against the base;
5. merge them into the float weights (`merge_lora`) and quantize again (int4, g64) for
   deployment with `jaxcompress.compressed`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxcompress as jc  # noqa: E402
from examples.tiny_lm import load_or_train_tiny_lm, make_apply, perplexity, tune_tokens  # noqa: E402
from jaxcompress.lora import LoraRule, load_adapters, lora_apply, lora_init, lora_train_step, merge_lora, save_adapters  # noqa: E402

NF4 = jc.QuantRule(pattern=r".*kernel", qtype="nf4", channel_axes=(-1,), group_size=64)
INT4 = jc.QuantRule(pattern=r".*kernel", bits=4, channel_axes=(-1,), group_size=64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the QUICK toy model, a few steps")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 150, quick 3)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the adapters (default: a temporary folder)")
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 150)

    config, params, _, eval_tokens = load_or_train_tiny_lm(quick=args.quick)
    eval_tokens = eval_tokens[:4] if args.quick else eval_tokens
    apply = make_apply(config)
    base, _ = jc.quantize_params(params, [NF4])
    adapters = lora_init(jax.random.key(0), base, LoraRule(pattern=r".*kernel"), rank=8, alpha=16.0)
    forward = lora_apply(apply)

    def loss(adapters, base, ids):
        logp = jax.nn.log_softmax(forward(base, adapters, ids)[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    optimizer = optax.adam(optax.cosine_decay_schedule(2e-4, steps))  # 2e-3 overshoots a trained model
    state = optimizer.init(adapters)
    step = lora_train_step(loss, optimizer)
    stream = np.asarray(tune_tokens(quick=args.quick))
    rng = np.random.default_rng(0)
    seq_len = eval_tokens.shape[1]

    ppl_fp32 = perplexity(apply, params, eval_tokens)
    evaluate = lambda pair, ids: forward(pair[0], pair[1], ids)  # (base, adapters) -> logits, compiled once
    ppl_base = perplexity(evaluate, (base, adapters), eval_tokens)
    for i in range(steps):
        starts = rng.integers(0, len(stream) - seq_len, 8)
        ids = jnp.asarray(np.stack([stream[s : s + seq_len] for s in starts]), jnp.int32)
        adapters, state, value = step(adapters, state, base, ids)
        if i % max(steps // 5, 1) == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(value):.4f}", flush=True)
    ppl_tuned = perplexity(evaluate, (base, adapters), eval_tokens)

    folder = args.out or Path(tempfile.mkdtemp())
    path = Path(folder) / "adapters.safetensors"
    save_adapters(path, adapters, force=True)
    restored = load_adapters(path, base)
    ppl_restored = perplexity(evaluate, (base, restored), eval_tokens)

    deployed, _ = jc.quantize_params(merge_lora(base, restored), [INT4])
    ppl_deployed = perplexity(jc.compressed(apply), deployed, eval_tokens)

    base_mb = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(base, is_leaf=lambda x: isinstance(x, jc.QArray))) / 1e6
    float_mb = sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(params)) / 1e6
    print(f"held-out perplexity: fp32 {ppl_fp32:.2f} | nf4 base {ppl_base:.2f} | nf4 + LoRA {ppl_tuned:.2f} "
          f"| reloaded adapters {ppl_restored:.2f} | merged, int4 g64 {ppl_deployed:.2f}")
    print(f"base {base_mb:.2f} MB (float {float_mb:.2f} MB); adapters file {os.path.getsize(path) / 1e6:.3f} MB at {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
