"""Train a small Llama-style decoder of our own on the Lee news corpus, for compression work.

The text is the Lee corpus shipped in the ``gensim`` wheel (``gensim/test/test_data``, read as
files, nothing downloaded): ``lee_background.cor`` (300 news articles) is the training split,
``lee.cor`` (50 other articles from the same source) the held-out split. A byte-level BPE
tokenizer (`tokenizers`) is trained on the training split only. The model is
`jaxcompress.models.llama.Llama` with widths that real group sizes do not divide (hidden 192,
intermediate 448: a 128-group leaves a short last group), 4 layers, grouped-query attention.
Training takes a few minutes of CPU (AdamW, cosine schedule, fixed step count so the result
depends only on the config and the corpus).

The trained params, the tokenizer and the held-out tokens are cached under
``$JAXCOMPRESS_CACHE/tiny_lm/<key>`` (default ``~/.cache/jaxcompress/tiny_lm/<key>``), the key a
hash of the config and the corpus bytes, so benchmarks and tests reuse one training run:

    python examples/tiny_lm.py            # train (or load) the full model, print its perplexity
    python examples/tiny_lm.py --quick    # a tiny model trained for a few seconds (CI smoke run)

From code::

    from examples.tiny_lm import load_or_train_tiny_lm, make_apply, perplexity
    config, params, tokenizer, eval_tokens = load_or_train_tiny_lm()
    apply = make_apply(config)                       # apply(params, ids) -> logits
    print(perplexity(apply, params, eval_tokens))
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxcompress.models.llama import Llama, LlamaConfig  # noqa: E402

__all__ = [
    "TrainConfig", "TinyLM", "FULL", "QUICK", "corpus_files", "cache_dir_for", "load_or_train_tiny_lm",
    "make_apply", "perplexity", "train_tokens", "calibration_batches",
]

CACHE_FORMAT = 1  # bump when the cached files change meaning


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The model and its training run (everything the cache key depends on besides the corpus)."""

    vocab_size: int = 1024
    hidden_size: int = 192
    intermediate_size: int = 448
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 250
    learning_rate: float = 3e-3
    warmup_steps: int = 25
    weight_decay: float = 0.1
    seed: int = 0

    def model_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            max_position=self.seq_len,
        )


FULL = TrainConfig()
QUICK = TrainConfig(vocab_size=320, hidden_size=96, intermediate_size=160, num_layers=2, num_heads=3,
                    num_kv_heads=1, seq_len=64, batch_size=8, steps=40, warmup_steps=5)


class TinyLM(NamedTuple):
    """What `load_or_train_tiny_lm` returns: unpack as ``config, params, tokenizer, eval_tokens``."""

    config: LlamaConfig
    params: Any  # the Llama's param tree (the "params" collection, not wrapped)
    tokenizer: Any  # a `tokenizers.Tokenizer`
    eval_tokens: np.ndarray  # int32 [rows, seq_len] held-out text (lee.cor)


def corpus_files() -> tuple[Path, Path]:
    """``(train, held_out)``: gensim's ``lee_background.cor`` and ``lee.cor``."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("examples/tiny_lm.py needs the gensim wheel's test corpus: pip install --no-deps gensim")
    folder = Path(spec.origin).parent / "test" / "test_data"
    files = folder / "lee_background.cor", folder / "lee.cor"
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: the Lee corpus file is missing from the gensim install")
    return files


def _documents(path: Path) -> list[str]:
    text = path.read_text(encoding="latin-1")  # lee.cor holds latin-1 bytes (a pound sign)
    return [line.strip() for line in text.splitlines() if line.strip()]


def cache_dir_for(train: TrainConfig, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder of ``train`` on this corpus: ``<root>/<hash of config + corpus>``."""
    if cache_root is None:
        env = os.environ.get("JAXCOMPRESS_CACHE")
        root = Path(env) / "tiny_lm" if env else Path.home() / ".cache" / "jaxcompress" / "tiny_lm"
    else:
        root = Path(cache_root)
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **dataclasses.asdict(train)}, sort_keys=True).encode())
    for file in corpus_files():
        digest.update(file.read_bytes())
    return root / digest.hexdigest()[:16]


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<doc>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _encode_documents(tokenizer, texts: list[str]) -> np.ndarray:
    """One stream: ``<doc>`` before each document, then its tokens."""
    doc = tokenizer.token_to_id("<doc>")
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        stream.append(doc)
        stream.extend(encoding.ids)
    return np.asarray(stream, np.int32)


def _rows(stream: np.ndarray, length: int) -> np.ndarray:
    count = len(stream) // length
    return stream[: count * length].reshape(count, length)


def make_apply(config: LlamaConfig) -> Callable[[Any, jax.Array], jax.Array]:
    """``apply(params, ids) -> logits`` for the unwrapped param tree (what one-shot methods call)."""
    model = Llama(config)

    def apply(params, ids):
        return model.apply({"params": params}, ids)

    return apply


def _mean_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def perplexity(apply: Callable[[Any, jax.Array], jax.Array], params: Any, tokens: Any, batch_size: int = 16) -> float:
    """``exp`` of the mean next-token negative log-likelihood of ``tokens`` (int ``[rows, length]``;
    each row predicts its tokens 1..length-1 from the ones before), batched by ``batch_size`` rows.

    ``apply(params, ids) -> logits`` may be any function of that shape (e.g. ``compressed(apply)``
    with `QArray` params).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"perplexity: tokens: expected int [rows, length >= 2], got {tokens.dtype} {tokens.shape}")

    @jax.jit
    def nll_sum(params, batch):
        return _mean_nll(apply(params, batch), batch) * (batch.shape[1] - 1) * batch.shape[0]

    total = 0.0
    for start in range(0, len(tokens), batch_size):
        total += float(nll_sum(params, jnp.asarray(tokens[start:start + batch_size], jnp.int32)))
    return math.exp(total / (len(tokens) * (tokens.shape[1] - 1)))


def _train(train: TrainConfig, stream: np.ndarray, verbose: bool) -> tuple[Any, dict]:
    config = train.model_config()
    model = Llama(config)
    key = jax.random.key(train.seed)
    params = model.init(key, jnp.zeros((1, train.seq_len), jnp.int32))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, train.learning_rate, train.warmup_steps, train.steps,
                                                  end_value=train.learning_rate * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b2=0.95, weight_decay=train.weight_decay))
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(lambda p: _mean_nll(model.apply({"params": p}, batch), batch))(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(train.seed)
    starts_max = len(stream) - train.seq_len
    start_time = time.perf_counter()
    losses = []
    for i in range(train.steps):
        starts = rng.integers(0, starts_max, train.batch_size)
        batch = jnp.asarray(np.stack([stream[s:s + train.seq_len] for s in starts]))
        params, state, loss = step(params, state, batch)
        if verbose and (i % 50 == 0 or i == train.steps - 1):
            print(f"  step {i:4d}  loss {float(loss):.3f}  ({time.perf_counter() - start_time:.0f} s)", flush=True)
        if i >= train.steps - 20:
            losses.append(float(loss))
    seconds = time.perf_counter() - start_time
    return jax.device_get(params), {"train_seconds": seconds, "final_train_loss": float(np.mean(losses))}


def _flatten(params: Any) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in flat}


def _unflatten(arrays: Any) -> dict:
    tree: dict = {}
    for name in arrays.files:
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(arrays[name])
    return tree


def _load(folder: Path, train: TrainConfig) -> TinyLM:
    from tokenizers import Tokenizer

    config = train.model_config()
    with np.load(folder / "params.npz") as arrays:
        params = _unflatten(arrays)
    expected = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    want = jax.tree.map(lambda a: (a.shape, a.dtype), expected)
    if got != want:
        raise ValueError(f"{folder / 'params.npz'}: the cached params do not match the config; delete the folder")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return TinyLM(config, params, tokenizer, np.load(folder / "eval_tokens.npy"))


def load_or_train_tiny_lm(
    quick: bool = False,
    *,
    train: TrainConfig | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    retrain: bool = False,
    verbose: bool = False,
) -> TinyLM:
    """The trained tiny decoder: loaded from the cache, or trained (a few minutes; ``quick``: seconds)
    and cached. Returns a `TinyLM` ``(config, params, tokenizer, eval_tokens)``.

    Args:
      quick: the `QUICK` config (a 2-layer toy for smoke tests) instead of `FULL`.
      train: any other `TrainConfig` (overrides ``quick``).
      cache_root: the folder holding one sub-folder per config (see `cache_dir_for`).
      retrain: train even when cached (and replace the cache).
      verbose: print training progress.
    """
    train = train or (QUICK if quick else FULL)
    folder = cache_dir_for(train, cache_root)
    if not retrain and (folder / "done").is_file():
        return _load(folder, train)
    train_file, held_out_file = corpus_files()
    train_texts, held_texts = _documents(train_file), _documents(held_out_file)
    tokenizer = _train_tokenizer(train_texts, train.vocab_size)
    if tokenizer.get_vocab_size() != train.vocab_size:
        raise ValueError(f"the BPE tokenizer learned {tokenizer.get_vocab_size()} tokens, the config asks for "
                         f"{train.vocab_size}: lower vocab_size")
    stream = _encode_documents(tokenizer, train_texts)
    eval_tokens = _rows(_encode_documents(tokenizer, held_texts), train.seq_len)
    if verbose:
        print(f"training {train} on {len(stream)} tokens; held-out {eval_tokens.size} tokens", flush=True)
    params, stats = _train(train, stream, verbose)
    stats["eval_perplexity"] = perplexity(make_apply(train.model_config()), params, eval_tokens)
    stats["train_tokens"] = int(len(stream))
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    try:
        np.savez(staging / "params.npz", **_flatten(params))
        tokenizer.save(str(staging / "tokenizer.json"))
        np.save(staging / "eval_tokens.npy", eval_tokens)
        np.save(staging / "train_tokens.npy", stream)
        (staging / "config.json").write_text(json.dumps(dataclasses.asdict(train), indent=1))
        (staging / "metrics.json").write_text(json.dumps(stats, indent=1))
        (staging / "done").write_text("ok\n")
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished the same run first: keep theirs
            if not (folder / "done").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _load(folder, train)


def train_tokens(quick: bool = False, *, train: TrainConfig | None = None,
                 cache_root: str | os.PathLike[str] | None = None) -> np.ndarray:
    """The training split's token stream (int32, 1-D) of a cached model (trains it if needed)."""
    train = train or (QUICK if quick else FULL)
    load_or_train_tiny_lm(train=train, cache_root=cache_root)
    return np.load(cache_dir_for(train, cache_root) / "train_tokens.npy")


def calibration_batches(count: int = 32, batch_size: int = 8, quick: bool = False, *,
                        train: TrainConfig | None = None, seed: int = 0,
                        cache_root: str | os.PathLike[str] | None = None) -> list[jax.Array]:
    """``count`` random training-split windows of ``seq_len`` tokens, as int32 ``[batch_size, seq_len]``
    batches (calibration data for one-shot methods; never the held-out split)."""
    train = train or (QUICK if quick else FULL)
    stream = train_tokens(train=train, cache_root=cache_root)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - train.seq_len, count)
    windows = np.stack([stream[s:s + train.seq_len] for s in starts])
    return [jnp.asarray(windows[i:i + batch_size]) for i in range(0, count, batch_size)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny smoke-run config")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (default $JAXCOMPRESS_CACHE/tiny_lm)")
    parser.add_argument("--retrain", action="store_true", help="train even when cached")
    args = parser.parse_args(argv)
    train = QUICK if args.quick else FULL
    folder = cache_dir_for(train, args.cache_dir)
    cached = (folder / "done").is_file() and not args.retrain
    start = time.perf_counter()
    config, params, tokenizer, eval_tokens = load_or_train_tiny_lm(
        train=train, cache_root=args.cache_dir, retrain=args.retrain, verbose=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((folder / "metrics.json").read_text())
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    ppl = perplexity(make_apply(config), params, eval_tokens)
    print(f"{'loaded' if cached else 'trained'} {folder} in {seconds:.1f} s "
          f"(training took {metrics['train_seconds']:.1f} s on {metrics['train_tokens']} tokens)")
    print(f"params {n_params}  vocab {config.vocab_size}  held-out tokens {eval_tokens.size}")
    print(f"held-out perplexity {ppl:.3f}  (final train loss {metrics['final_train_loss']:.3f})")
    sample = tokenizer.decode([int(t) for t in eval_tokens[0, :24]])
    print(f"held-out sample: {sample!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
