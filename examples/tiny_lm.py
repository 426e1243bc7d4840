"""Train a small Llama-style decoder of our own on gensim's text corpora, for compression work.

The text ships in the ``gensim`` wheel (``gensim/test/test_data``, read as files, nothing
downloaded): ``lee_background.cor`` (300 news articles), ``lee.cor`` (49 other articles from the
same source) and, for `FULL`, ``head500.noblanks.cor`` (250 Wikipedia articles, one per line,
lowercased, stemmed, without stop words or punctuation). Three splits of whole documents that
never overlap (`split_documents`):

* ``train`` (pre-training, calibration): ``lee_background`` articles 0-249 (+ wiki lines 0-229
  and 244-249);
* ``tune`` (held out from pre-training, for fine-tuning such as QLoRA): ``lee_background``
  articles 250-299 (+ wiki lines 230-239);
* ``eval`` (held-out perplexity): all of ``lee.cor`` (+ wiki lines 240-243).

A byte-level BPE tokenizer (`tokenizers`) is trained on the train split only. The model is
`jaxcompress.models.llama.Llama`. `FULL` (3.4M params): hidden 256, intermediate 768, 4 layers,
4 query heads of 64, 2 key / value heads, vocabulary 512 (every kernel width a multiple of 128,
so 128-groups and Qwix's 128-tiles apply); 750 AdamW steps of 12 x 128 tokens on a cosine
schedule, no weight decay (about 7 minutes of this 2-core CPU), in chunks that resume from a
checkpoint (``--chunk-seconds``), so the result depends only on the config and the corpus.
Held-out perplexity 48.91. It is still robust to 4-bit weights: round-to-nearest int4 g128 costs
0.23% (int3 g128 0.55%), so W4 methods separate only at noise level; 50% pruning separates them. `QUICK` (CI): 2 layers, hidden 96 (ragged at g64), the Lee text only,
seconds of CPU.

The trained params, the tokenizer and the token streams are cached under
``$JAXCOMPRESS_CACHE/tiny_lm/<key>`` (default ``~/.cache/jaxcompress/tiny_lm/<key>``), the key a
hash of the config and the corpus bytes, so benchmarks and tests reuse one training run:

    python examples/tiny_lm.py                       # train (or load) the full model, print its perplexity
    python examples/tiny_lm.py --chunk-seconds 330   # train at most 330 s, checkpoint, exit 3 if not done
    python examples/tiny_lm.py --quick               # the tiny model trained for a few seconds (CI smoke run)

From code::

    from examples.tiny_lm import load_or_train_tiny_lm, make_apply, perplexity
    config, params, tokenizer, eval_tokens = load_or_train_tiny_lm()
    apply = make_apply(config)                       # apply(params, ids) -> logits
    print(perplexity(apply, params, eval_tokens))
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
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
from typing import Any, Callable, Literal, NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxcompress.models.llama import Llama, LlamaConfig  # noqa: E402

__all__ = [
    "TrainConfig", "TinyLM", "TrainingPaused", "FULL", "QUICK", "corpus_files", "split_documents", "cache_dir_for",
    "load_or_train_tiny_lm", "make_apply", "perplexity", "train_tokens", "tune_tokens", "calibration_batches",
]

CACHE_FORMAT = 2  # bump when the cached files change meaning
Corpus = Literal["lee", "lee+wiki"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The model and its training run (everything the cache key depends on besides the corpus)."""

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 128
    batch_size: int = 12
    steps: int = 750
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    seed: int = 0
    corpus: Corpus = "lee+wiki"

    def model_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            max_position=self.seq_len,
        )


FULL = TrainConfig()
QUICK = TrainConfig(vocab_size=320, hidden_size=96, intermediate_size=160, num_layers=2, num_heads=3,
                    num_kv_heads=1, seq_len=64, batch_size=8, steps=40, warmup_steps=5, weight_decay=0.1,
                    corpus="lee")


class TrainingPaused(RuntimeError):
    """Training stopped at ``max_train_seconds`` with a checkpoint; calling again resumes it."""

    def __init__(self, folder: Path, step: int, steps: int) -> None:
        super().__init__(f"{folder}: training paused at step {step} of {steps}; call again to resume")
        self.folder, self.step, self.steps = folder, step, steps


class TinyLM(NamedTuple):
    """What `load_or_train_tiny_lm` returns: unpack as ``config, params, tokenizer, eval_tokens``."""

    config: LlamaConfig
    params: Any  # the Llama's param tree (the "params" collection, not wrapped)
    tokenizer: Any  # a `tokenizers.Tokenizer`
    eval_tokens: np.ndarray  # int32 [rows, seq_len] the held-out eval split


_FILES = {"lee_background": "lee_background.cor", "lee": "lee.cor", "wiki": "head500.noblanks.cor"}
# (file, first document, end) per split; documents are non-empty lines
_SPLITS: dict[str, dict[str, list[tuple[str, int, int | None]]]] = {
    "lee": {"train": [("lee_background", 0, 250)], "tune": [("lee_background", 250, None)], "eval": [("lee", 0, None)]},
    "lee+wiki": {
        "train": [("lee_background", 0, 250), ("wiki", 0, 230), ("wiki", 244, None)],
        "tune": [("lee_background", 250, None), ("wiki", 230, 240)],
        "eval": [("lee", 0, None), ("wiki", 240, 244)],
    },
}


def corpus_files(corpus: Corpus = "lee+wiki") -> dict[str, Path]:
    """The gensim test-data files ``corpus`` reads, by name (``lee_background``, ``lee``, ``wiki``)."""
    if corpus not in _SPLITS:
        raise ValueError(f"corpus: expected one of {sorted(_SPLITS)}, got {corpus!r}")
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("examples/tiny_lm.py needs the gensim wheel's test corpus: pip install --no-deps gensim")
    folder = Path(spec.origin).parent / "test" / "test_data"
    names = sorted({name for parts in _SPLITS[corpus].values() for name, _, _ in parts})
    files = {name: folder / _FILES[name] for name in names}
    for file in files.values():
        if not file.is_file():
            raise FileNotFoundError(f"{file}: the corpus file is missing from the gensim install")
    return files


def _documents(path: Path) -> list[str]:
    text = path.read_text(encoding="latin-1")  # lee.cor holds latin-1 bytes (a pound sign)
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_documents(corpus: Corpus = "lee+wiki") -> dict[str, list[str]]:
    """``{"train", "tune", "eval"}``: the documents of each split (disjoint; see the module doc)."""
    documents = {name: _documents(path) for name, path in corpus_files(corpus).items()}
    return {split: [doc for name, start, end in parts for doc in documents[name][start:end]]
            for split, parts in _SPLITS[corpus].items()}


def cache_dir_for(train: TrainConfig, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder of ``train`` on this corpus: ``<root>/<hash of config + corpus>``."""
    if cache_root is None:
        env = os.environ.get("JAXCOMPRESS_CACHE")
        root = Path(env) / "tiny_lm" if env else Path.home() / ".cache" / "jaxcompress" / "tiny_lm"
    else:
        root = Path(cache_root)
    key = {"format": CACHE_FORMAT, "splits": _SPLITS[train.corpus], **dataclasses.asdict(train)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for _, file in sorted(corpus_files(train.corpus).items()):
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
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        total += float(_nll_sum(apply, params, jnp.asarray(tokens[start:start + batch_size], jnp.int32)))
    return math.exp(total / (len(tokens) * (tokens.shape[1] - 1)))


@functools.partial(jax.jit, static_argnums=0)  # compiled once per (apply, params structure, batch shape)
def _nll_sum(apply: Callable[[Any, jax.Array], jax.Array], params: Any, batch: jax.Array) -> jax.Array:
    return _mean_nll(apply(params, batch), batch) * (batch.shape[1] - 1) * batch.shape[0]


def _optimizer(train: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, train.learning_rate, train.warmup_steps, train.steps,
                                                  end_value=train.learning_rate * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b2=0.95, weight_decay=train.weight_decay))


def _save_state(path: Path, params: Any, state: Any, progress: dict) -> None:
    leaves = jax.tree.leaves((params, state))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, *[np.asarray(leaf) for leaf in leaves], progress=np.frombuffer(json.dumps(progress).encode(), np.uint8))
    os.replace(tmp, path)


def _load_state(path: Path, params: Any, state: Any) -> tuple[Any, Any, dict]:
    treedef = jax.tree.structure((params, state))
    with np.load(path) as arrays:
        leaves = [jnp.asarray(arrays[f"arr_{i}"]) for i in range(treedef.num_leaves)]
        progress = json.loads(arrays["progress"].tobytes().decode())
    params, state = jax.tree.unflatten(treedef, leaves)
    return params, state, progress


@functools.lru_cache(maxsize=4)
def _trainer(train: TrainConfig) -> tuple[Callable, Callable, Callable]:
    """``(init() -> params, optimizer init, jitted step)`` of ``train``, compiled once per process."""
    model = Llama(train.model_config())
    optimizer = _optimizer(train)

    @jax.jit
    def init():
        return model.init(jax.random.key(train.seed), jnp.zeros((1, train.seq_len), jnp.int32))["params"]

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(lambda p: _mean_nll(model.apply({"params": p}, batch), batch))(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return init, jax.jit(optimizer.init), step


def _train(train: TrainConfig, stream: np.ndarray, verbose: bool, checkpoint: Path,
           max_seconds: float | None) -> tuple[Any, dict]:
    """Train from scratch or from ``checkpoint``; batch ``i`` depends only on (seed, i), so a run
    resumed from a checkpoint is the uninterrupted run. Raises `TrainingPaused` after ``max_seconds``."""
    init, optimizer_init, step = _trainer(train)
    params = init()
    state = optimizer_init(params)
    progress: dict = {"step": 0, "train_seconds": 0.0, "losses": []}
    if checkpoint.is_file():
        params, state, progress = _load_state(checkpoint, params, state)
        if verbose:
            print(f"  resuming at step {progress['step']} of {train.steps}", flush=True)

    starts_max = len(stream) - train.seq_len
    start_time = time.perf_counter()
    first = progress["step"]
    for i in range(first, train.steps):
        starts = np.random.default_rng((train.seed, i)).integers(0, starts_max, train.batch_size)
        batch = jnp.asarray(np.stack([stream[s:s + train.seq_len] for s in starts]))
        params, state, loss = step(params, state, batch)
        if verbose and (i % 50 == 0 or i == train.steps - 1):
            print(f"  step {i:4d}  loss {float(loss):.3f}  ({time.perf_counter() - start_time:.0f} s)", flush=True)
        if i >= train.steps - 20:
            progress["losses"].append(float(loss))
        elapsed = time.perf_counter() - start_time
        if max_seconds is not None and elapsed > max_seconds and i + 1 < train.steps:
            progress.update(step=i + 1, train_seconds=progress["train_seconds"] + elapsed)
            _save_state(checkpoint, params, state, progress)
            raise TrainingPaused(checkpoint.parent, i + 1, train.steps)
    seconds = progress["train_seconds"] + time.perf_counter() - start_time
    return jax.device_get(params), {"train_seconds": seconds, "final_train_loss": float(np.mean(progress["losses"])),
                                    "resumed_chunks": int(first > 0)}


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
    max_train_seconds: float | None = None,
) -> TinyLM:
    """The trained tiny decoder: loaded from the cache, or trained (minutes; ``quick``: seconds)
    and cached. Returns a `TinyLM` ``(config, params, tokenizer, eval_tokens)``.

    Args:
      quick: the `QUICK` config (a 2-layer toy for smoke tests) instead of `FULL`.
      train: any other `TrainConfig` (overrides ``quick``).
      cache_root: the folder holding one sub-folder per config (see `cache_dir_for`).
      retrain: train even when cached (and replace the cache and any checkpoint).
      verbose: print training progress.
      max_train_seconds: stop training after this long with a checkpoint next to the cache folder
        and raise `TrainingPaused`; the next call resumes from it (the same result as one run).
    """
    train = train or (QUICK if quick else FULL)
    folder = cache_dir_for(train, cache_root)
    if not retrain and (folder / "done").is_file():
        return _load(folder, train)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One trainer per cache root across processes (parallel test workers share the cache): the
    # others wait on a lock on the root folder itself (no lock file left behind), then load what
    # the first one cached.
    lock = os.open(folder.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not retrain and (folder / "done").is_file():
            return _load(folder, train)
        return _train_and_cache(train, folder, verbose, max_train_seconds, retrain)
    finally:
        os.close(lock)  # releases the lock


def _train_and_cache(train: TrainConfig, folder: Path, verbose: bool, max_train_seconds: float | None,
                     retrain: bool) -> TinyLM:
    """`load_or_train_tiny_lm`'s training half, run under the cache folder's lock."""
    partial = folder.parent / f"{folder.name}.partial"
    if retrain:
        shutil.rmtree(partial, ignore_errors=True)
    if not (partial / "streams.npz").is_file():
        splits = split_documents(train.corpus)
        tokenizer = _train_tokenizer(splits["train"], train.vocab_size)
        if tokenizer.get_vocab_size() != train.vocab_size:
            raise ValueError(f"the BPE tokenizer learned {tokenizer.get_vocab_size()} tokens, the config asks for "
                             f"{train.vocab_size}: lower vocab_size")
        partial.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(partial / "tokenizer.json"))
        streams = {name: _encode_documents(tokenizer, splits[name]) for name in ("train", "tune", "eval")}
        np.savez(partial / "streams.tmp.npz", **streams)
        os.replace(partial / "streams.tmp.npz", partial / "streams.npz")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(partial / "tokenizer.json"))
    with np.load(partial / "streams.npz") as arrays:
        stream, tune, eval_stream = arrays["train"], arrays["tune"], arrays["eval"]
    eval_tokens = _rows(eval_stream, train.seq_len)
    if verbose:
        print(f"training {train} on {len(stream)} tokens; held-out {eval_tokens.size} tokens", flush=True)
    params, stats = _train(train, stream, verbose, partial / "state.npz", max_train_seconds)
    stats["eval_perplexity"] = perplexity(make_apply(train.model_config()), params, eval_tokens)
    stats.update(train_tokens=int(len(stream)), tune_tokens=int(len(tune)), eval_tokens=int(eval_tokens.size))
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    try:
        np.savez(staging / "params.npz", **_flatten(params))
        tokenizer.save(str(staging / "tokenizer.json"))
        np.save(staging / "eval_tokens.npy", eval_tokens)
        np.save(staging / "train_tokens.npy", stream)
        np.save(staging / "tune_tokens.npy", tune)
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
    shutil.rmtree(partial, ignore_errors=True)
    return _load(folder, train)


def train_tokens(quick: bool = False, *, train: TrainConfig | None = None,
                 cache_root: str | os.PathLike[str] | None = None) -> np.ndarray:
    """The training split's token stream (int32, 1-D) of a cached model (trains it if needed)."""
    train = train or (QUICK if quick else FULL)
    load_or_train_tiny_lm(train=train, cache_root=cache_root)
    return np.load(cache_dir_for(train, cache_root) / "train_tokens.npy")


def tune_tokens(quick: bool = False, *, train: TrainConfig | None = None,
                cache_root: str | os.PathLike[str] | None = None) -> np.ndarray:
    """The tune split's token stream (int32, 1-D): text held out from pre-training and from the
    eval split, for fine-tuning (QLoRA) a cached model (trains it if needed)."""
    train = train or (QUICK if quick else FULL)
    load_or_train_tiny_lm(train=train, cache_root=cache_root)
    return np.load(cache_dir_for(train, cache_root) / "tune_tokens.npy")


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
    parser.add_argument("--chunk-seconds", type=float, default=None,
                        help="train at most this long, checkpoint and exit with status 3 (run again to resume)")
    args = parser.parse_args(argv)
    train = QUICK if args.quick else FULL
    folder = cache_dir_for(train, args.cache_dir)
    cached = (folder / "done").is_file() and not args.retrain
    start = time.perf_counter()
    try:
        config, params, tokenizer, eval_tokens = load_or_train_tiny_lm(
            train=train, cache_root=args.cache_dir, retrain=args.retrain, verbose=True,
            max_train_seconds=args.chunk_seconds)
    except TrainingPaused as paused:
        print(f"paused at step {paused.step} of {paused.steps} after {time.perf_counter() - start:.0f} s "
              f"(checkpoint in {paused.folder}); run again to resume")
        return 3
    seconds = time.perf_counter() - start
    metrics = json.loads((folder / "metrics.json").read_text())
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    ppl = perplexity(make_apply(config), params, eval_tokens)
    print(f"{'loaded' if cached else 'trained'} {folder} in {seconds:.1f} s "
          f"(training took {metrics['train_seconds']:.1f} s, {train.steps} steps of {train.batch_size} x "
          f"{train.seq_len} tokens, on {metrics['train_tokens']} tokens)")
    print(f"params {n_params}  vocab {config.vocab_size}  held-out tokens {eval_tokens.size}")
    print(f"held-out perplexity {ppl:.3f}  (final train loss {metrics['final_train_loss']:.3f})")
    sample = tokenizer.decode([int(t) for t in eval_tokens[0, :24]])
    print(f"held-out sample: {sample!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
