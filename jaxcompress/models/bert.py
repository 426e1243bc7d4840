"""BERT / MiniLM encoders in Flax linen: the Hugging Face ``BertModel``, parameter for parameter.

Post-LayerNorm, exact erf GELU, absolute position embeddings; no dropout (inference). Its
parameter paths read like the Hugging Face names, so rules written for one read like rules
for the other (`jaxcompress.models.hf` maps the names)::

    params/embeddings/word_embeddings/embedding             (vocab, hidden)
    params/encoder/layer_0/attention/query/kernel           (hidden, hidden)   (in, out)
    params/encoder/layer_0/attention/output/dense/kernel    (hidden, hidden)
    params/encoder/layer_0/intermediate/dense/kernel        (hidden, intermediate)
    params/encoder/layer_0/output/dense/kernel              (intermediate, hidden)
    params/encoder/layer_0/output/LayerNorm/scale           (hidden,)

Sentence-transformers models (all-MiniLM-L6-v2 ...) put mean pooling over the unpadded tokens
and L2 normalisation on top: `mean_pool`, `embed`.

>>> import jax, jax.numpy as jnp
>>> config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
...                     intermediate_size=32, max_position_embeddings=8)
>>> model = BertModel(config)
>>> ids = jnp.array([[2, 7, 9, 0]]); mask = jnp.array([[1, 1, 1, 0]])
>>> params = model.init(jax.random.PRNGKey(0), ids, mask)
>>> model.apply(params, ids, mask).shape
(1, 4, 16)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BertConfig", "BertModel", "BertEmbeddings", "BertEncoder", "BertLayer", "BertAttention", "BertPooler", "mean_pool", "embed"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The BERT hyper-parameters the model needs (defaults: all-MiniLM-L6-v2).

    >>> BertConfig().head_dim
    32
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        if self.hidden_act != "gelu":
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported (only the exact erf 'gelu')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_hf_json(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> "BertConfig":
        """The fields this class knows from a Hugging Face ``config.json`` (a path or its dict).

        >>> BertConfig.from_hf_json({"hidden_size": 128, "num_attention_heads": 2, "model_type": "bert"}).head_dim
        64
        """
        where = "config" if isinstance(path_or_dict, Mapping) else os.fspath(path_or_dict)
        data = dict(path_or_dict) if isinstance(path_or_dict, Mapping) else json.loads(open(where, encoding="utf-8").read())
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{where}: position_embedding_type {data['position_embedding_type']!r}: only 'absolute' is supported")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    from_json = from_hf_json

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


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Average of the hidden states over the real (mask 1) tokens: ``(B, T, H) -> (B, H)``.

    >>> mean_pool(jnp.array([[[1.0], [3.0], [100.0]]]), jnp.array([[1, 1, 0]])).tolist()
    [[2.0]]
    """
    mask = jnp.asarray(attention_mask, hidden.dtype)[..., None]
    return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def embed(apply_fn: Callable, params: Any, batch: dict) -> jax.Array:
    """Sentence embeddings as sentence-transformers computes them: mean pooling + L2 normalise.

    ``apply_fn(params, input_ids, attention_mask, token_type_ids)`` is e.g. ``BertModel.apply``
    (jit it yourself: ``jax.jit(model.apply)``; for a compressed tree
    ``jax.jit(jaxcompress.compressed(model.apply))``).

    >>> fake_apply = lambda params, ids, mask, types: jnp.ones(ids.shape + (4,))
    >>> embed(fake_apply, None, {"input_ids": jnp.zeros((2, 3), int), "attention_mask": jnp.ones((2, 3))}).tolist()[0]
    [0.5, 0.5, 0.5, 0.5]
    """
    hidden = apply_fn(params, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    pooled = mean_pool(hidden, batch["attention_mask"])
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
