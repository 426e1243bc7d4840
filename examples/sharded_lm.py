"""A small decoder-only transformer, trained data + model parallel with pruning and QAT, then run
on int8 through `compressed` on the same mesh and saved as a sharded checkpoint.

* data: the Lee background corpus that ships with gensim's tests (``test_data/lee_background.cor``,
  ~360k characters of news text; found on disk, gensim itself is never imported), char-level
  tokens, a 90/10 train/validation split;
* model: flax linen, token + position embeddings, pre-norm causal attention blocks with an MLP,
  untied vocabulary head;
* mesh: ``('data', 'model')`` over all devices (on CPU this script asks XLA for 8 virtual devices
  unless ``XLA_FLAGS`` is already set): the batch is split over 'data'; kernels are split
  Megatron-style over 'model' (query / key / value / MLP-up / head along their output axis,
  attention-out / MLP-down along their input axis), the embeddings along their feature axis;
* training: ONE optimizer, ``qat(prune(adamw, gradual magnitude schedule), int8 rules)``, one
  compiled train step; the forward pass sees ``fake_quant(params, rules, ranges=qat_ranges)``;
  masks freeze when pruning ends, clip ranges freeze for the last steps;
* conversion: ``quantize_params(params, rules, ranges=qat_ranges(state))`` (exact), evaluated
  through ``compressed(model.apply)`` (s8 x s8 -> s32 dots on the kernel shards), then
  ``save_checkpoint`` (Orbax, each device writes its shards) and a restore with ``shardings=``.

    python examples/sharded_lm.py                 # a few minutes on 2 CPU cores
    python examples/sharded_lm.py --quick         # CI-sized run (~30 s)
    python examples/sharded_lm.py --mesh 4x2 --sparsity 0.7 --out results/sharded_lm.json

The same script runs on a TPU pod slice after ``jax.distributed.initialize()`` (see
docs/scaling.md): every process loads only its own rows of each batch and builds the global
batch with ``jax.make_array_from_process_local_data``, as done here.
"""

from __future__ import annotations

import os

if "XLA_FLAGS" not in os.environ and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    # before jax is imported: 8 virtual CPU devices; on a busy machine the devices' threads can
    # reach a collective far apart, so allow more than XLA:CPU's default 40 s before aborting.
    os.environ["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=600"
    )
    # XLA:CPU's client thread pool (max(cores, devices) threads) can run dry when several sharded
    # steps are in flight and a collective then never gathers all devices: docs/scaling.md.
    os.environ.setdefault("PJRT_NPROC", "32")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxcompress as jc  # noqa: E402
from jaxcompress.checkpoint.orbax_io import load_checkpoint, save_checkpoint  # noqa: E402
from jaxcompress.quant.arrays import stored_sharding  # noqa: E402


# ---- data -------------------------------------------------------------------------------------

def corpus_path() -> str:
    """gensim's ``test_data/lee_background.cor``, located without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, "test", "test_data", "lee_background.cor")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        "examples/sharded_lm.py trains on gensim's test corpus test_data/lee_background.cor; "
        "install it with `pip install --no-deps gensim` (only the file is read, gensim is not imported)"
    )


class CharData:
    """Char-level tokens of the corpus; vocabulary padded to a multiple of the 'model' axis."""

    def __init__(self, text: str, pad_to: int):
        chars = sorted(set(text))
        self.vocab = {c: i for i, c in enumerate(chars)}
        self.vocab_size = math.ceil(len(chars) / pad_to) * pad_to
        tokens = np.array([self.vocab[c] for c in text], np.int32)
        cut = int(0.9 * len(tokens))
        self.train, self.valid = tokens[:cut], tokens[cut:]

    def windows(self, tokens: np.ndarray, rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
        starts = rng.integers(0, len(tokens) - length - 1, rows)
        return np.stack([tokens[s : s + length + 1] for s in starts])

    def valid_batches(self, rows: int, length: int, count: int) -> list[np.ndarray]:
        stride = (len(self.valid) - length - 1) // (rows * count)
        starts = np.arange(rows * count) * stride
        windows = np.stack([self.valid[s : s + length + 1] for s in starts])
        return [windows[i * rows : (i + 1) * rows] for i in range(count)]


def global_batch(mesh, local_rows: np.ndarray) -> jax.Array:
    """The global batch from this process's rows (multi-host: each host passes its own slice)."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data", None)), local_rows)


# ---- model ------------------------------------------------------------------------------------

class Block(nn.Module):
    width: int
    heads: int
    ffn: int

    @nn.compact
    def __call__(self, x):
        batch, length, _ = x.shape
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (
            nn.Dense(self.width, use_bias=False, name=name)(h).reshape(batch, length, self.heads, -1)
            for name in ("query", "key", "value")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.width // self.heads)
        logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -1e9)
        attention = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(batch, length, -1)
        x = x + nn.Dense(self.width, use_bias=False, name="out")(attention)
        h = nn.gelu(nn.Dense(self.ffn, name="up")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(self.width, name="down")(h)


class DecoderLM(nn.Module):
    vocab_size: int
    context: int
    width: int
    heads: int
    ffn: int
    layers: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
        x = x + self.param("position", nn.initializers.normal(0.02), (self.context, self.width))[: tokens.shape[1]]
        for i in range(self.layers):
            x = Block(self.width, self.heads, self.ffn, name=f"block_{i}")(x)
        return nn.Dense(self.vocab_size, name="head")(nn.LayerNorm(name="ln_final")(x))


# Megatron-style placement by path (first match wins); everything else (the small embeddings,
# LayerNorms, row-parallel biases) is replicated, and so is the residual stream.
SHARDING_RULES = [
    (r".*/(query|key|value|up)/kernel|head/kernel", P(None, "model")),
    (r".*/(up/bias)|head/bias", P("model")),
    (r".*/(out|down)/kernel", P("model", None)),
]
PRUNED = r".*/(query|key|value|out|up|down)/kernel|head/kernel"
QUANTIZED = r".*/(query|key|value|out|up|down)/kernel|head/kernel"


def spec_for(path: str) -> P:
    for pattern, spec in SHARDING_RULES:
        if re.fullmatch(pattern, path):
            return spec
    return P()


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def shard_params(params, mesh):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(x, NamedSharding(mesh, spec_for(path_str(path)))), params
    )


def full_param_gathers(hlo: str, params) -> int:
    """all-gathers whose result has the element count of a sharded param (the batch-carrying
    activations are rank 3 here and are not counted). tests/multidevice/md_scale.py has the
    stricter check on shapes chosen to keep the two apart."""
    sizes = {x.size for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated}
    count = 0
    for line in hlo.splitlines():
        match = re.search(r"=\s*\(?\s*\w+\[([\d,]*)\][^=]*?\ball-gather(-start)?\(", line)
        if match:
            dims = [int(d) for d in match.group(1).split(",") if d]
            count += len(dims) <= 2 and math.prod(dims) in sizes
    return count


# ---- the run ----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument("--mesh", default="2x4", help="DATAxMODEL devices, e.g. 2x4 or 4x2")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.5, help="final sparsity of the kernels")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results JSON path")
    parser.add_argument("--checkpoint", default=None, help="where to save the int8 checkpoint (default: a temp dir)")
    parser.add_argument("--corpus", default=None, help="a UTF-8 text file to train on (default: gensim's Lee corpus)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.steps, args.width, args.context, args.batch_size = 120, 64, 32, 16
    data_size, model_size = (int(n) for n in args.mesh.lower().split("x"))
    if data_size * model_size > jax.device_count():
        print(f"--mesh {args.mesh} needs {data_size * model_size} devices, found {jax.device_count()}", file=sys.stderr)
        return 2
    # Auto axes: XLA's sharding propagation (GSPMD) places the intermediates.
    mesh = jax.make_mesh((data_size, model_size), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    try:
        text = open(args.corpus or corpus_path(), encoding="utf-8", errors="replace").read()
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 3
    data = CharData(text, pad_to=model_size)
    model = DecoderLM(data.vocab_size, args.context, args.width, args.heads, 4 * args.width, args.layers)
    rng = np.random.default_rng(args.seed)
    # Each process would load only its rows; here the one process holds them all.
    local_rows = args.batch_size // jax.process_count()

    params = model.init(jax.random.key(args.seed), jnp.zeros((1, args.context), jnp.int32))["params"]
    params = shard_params(params, mesh)

    quant_rules = [jc.QuantRule(pattern=QUANTIZED, bits=8, channel_axes=(-1,), activation="dynamic")]
    prune_end = int(0.6 * args.steps)
    update_every = max(1, args.steps // 30)
    schedule = jc.polynomial(args.sparsity, begin_step=0, end_step=prune_end, frequency=update_every)
    prune_rules = [jc.PruneRule(pattern=PRUNED, sparsity=schedule)]
    optimizer = jc.qat(
        jc.prune(optax.adamw(args.learning_rate, weight_decay=0.01), prune_rules, update_every=update_every, end_step=prune_end),
        quant_rules,
        freeze_step=int(0.85 * args.steps),
    )
    state = optimizer.init(params)  # masks / moments / ranges follow the params' shardings
    replicated = NamedSharding(mesh, P())  # scalars (step counts, PRNG key) made on one device
    state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), state)

    def cross_entropy(logits, targets):
        # The logits are split over 'model' along the vocabulary (column-parallel head): mask the
        # padding and pick the target by a one-hot product (elementwise + reductions), not by an
        # indexed gather or a slice, which would reassemble the vocabulary axis.
        real = jnp.arange(data.vocab_size) < len(data.vocab)
        log_probs = jax.nn.log_softmax(jnp.where(real, logits, -1e9), axis=-1)
        return -jnp.mean(jnp.sum(log_probs * jax.nn.one_hot(targets, data.vocab_size), axis=-1))

    def loss_fn(params, ranges, batch):
        logits = model.apply({"params": jc.fake_quant(params, quant_rules, ranges=ranges)}, batch[:, :-1])
        return cross_entropy(logits, batch[:, 1:])

    def train_step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, jc.qat_ranges(state), batch)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    def float_loss(params, batch):
        return cross_entropy(model.apply({"params": params}, batch[:, :-1]), batch[:, 1:])

    def int8_loss(qparams, batch):
        return cross_entropy(jc.compressed(model.apply)({"params": qparams}, batch[:, :-1]), batch[:, 1:])

    valid = [global_batch(mesh, rows) for rows in data.valid_batches(local_rows, args.context, 4 if args.quick else 16)]
    evaluate_float = jax.jit(float_loss)

    def mean_loss(fn, tree):
        return float(np.mean([float(fn(tree, batch)) for batch in valid]))

    started = time.perf_counter()
    first = global_batch(mesh, data.windows(data.train, rng, local_rows, args.context))
    # Pin the outputs to the inputs' placement (otherwise XLA may pick other layouts for small
    # leaves, e.g. shard the LayerNorm scales like the residual stream, and the next call re-lays out).
    placement = jax.tree.map(lambda x: x.sharding, (params, state))
    step = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(*placement, None))
    step = step.lower(params, state, first).compile()
    gathers = full_param_gathers(step.as_text(), params)
    any_gathers = step.as_text().count("all-gather(") + step.as_text().count("all-gather-start(")
    before = mean_loss(evaluate_float, params)
    print(f"mesh {dict(mesh.shape)}, {sum(x.size for x in jax.tree.leaves(params)):,} params, vocab {len(data.vocab)} "
          f"chars (padded {data.vocab_size}); validation loss before training {before:.3f} (ppl {math.exp(before):.1f})")

    batch = first
    for i in range(args.steps):
        params, state, loss = step(params, state, batch)
        batch = global_batch(mesh, data.windows(data.train, rng, local_rows, args.context))
        if (i + 1) % max(1, args.steps // 6) == 0:
            print(f"step {i + 1:5d}  train loss {float(loss):.3f}")
    train_seconds = time.perf_counter() - started

    masks = state.inner_state.masks  # qat's state wraps prune's
    kept = sum(int(np.asarray(m).sum()) for m in jax.tree.leaves(masks))
    pruned_total = sum(m.size for m in jax.tree.leaves(masks))
    sparsity = 1 - kept / pruned_total
    after = mean_loss(evaluate_float, params)
    ranges = jc.qat_ranges(state)
    fake = mean_loss(jax.jit(lambda p, b: float_loss(jc.fake_quant(p, quant_rules, ranges=ranges), b)), params)

    qparams, _ = jc.quantize_params(params, quant_rules, ranges=ranges)
    evaluate_int8 = jax.jit(int8_loss).lower(qparams, valid[0]).compile()
    int8 = mean_loss(evaluate_int8, qparams)
    int8_hlo = evaluate_int8.as_text()
    kernel = qparams["block_0"]["up"]["kernel"]
    # quantize_params stores W8A8 Dense codes (out, in): the param's sharding with its axes moved
    expected = stored_sharding(params["block_0"]["up"]["kernel"].sharding, kernel.stored_permutation)
    placement_kept = bool(kernel.values.sharding.is_equivalent_to(expected, 2))

    directory = args.checkpoint or os.path.join(tempfile.mkdtemp(), "sharded_lm_int8")
    save_checkpoint(directory, qparams, masks, force=True)
    restored, _ = load_checkpoint(directory, shardings=lambda path, shape: NamedSharding(mesh, spec_for(path)))
    restored_int8 = mean_loss(evaluate_int8, restored)

    result = {
        "mesh": dict(mesh.shape),
        "steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "validation_loss": {"before": before, "after_float": after, "after_fake_quant": fake, "int8_compressed": int8,
                            "int8_restored_checkpoint": restored_int8},
        "perplexity": {"before": math.exp(before), "after_float": math.exp(after), "int8_compressed": math.exp(int8)},
        "sparsity": sparsity,
        "target_sparsity": args.sparsity,
        "full_param_all_gathers_in_train_step": gathers,
        "all_gathers_in_train_step": any_gathers,
        "full_param_all_gathers_in_int8_eval": full_param_gathers(int8_hlo, params),
        "int8_dots": len(re.findall(r"s32\[[\d,]*\]\{?[\d,]*\}?\s+(dot|convolution)\(", int8_hlo)),
        "int8_values_sharded_like_params": placement_kept,
        "checkpoint": directory,
    }
    print(f"validation loss after: float {after:.3f} (ppl {math.exp(after):.1f}), fake-quant {fake:.3f}, "
          f"int8 through compressed {int8:.3f} (ppl {math.exp(int8):.1f}); restored checkpoint {restored_int8:.3f}")
    print(f"kernel sparsity {sparsity:.1%} (target {args.sparsity:.0%}); all-gathers of a full param: "
          f"train step {gathers} (all-gathers of anything: {any_gathers}), int8 eval {result['full_param_all_gathers_in_int8_eval']}; "
          f"int8 dots in the eval program: {result['int8_dots']}; checkpoint {directory}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
