"""A Llama-style decoder in Flax linen: causal attention with RoPE and grouped-query heads,
a SwiGLU MLP and RMSNorm, no biases, no dropout.

The layers are unrolled (``layers_0``, ``layers_1``, ...; not a ``scan``) so that every weight
reaches its own ``dot_general`` site, which the one-shot methods (`jaxcompress.oneshot.gptq`,
AWQ, Wanda, SparseGPT) and `jaxcompress.compressed` need. The parameter tree maps one to one
onto Hugging Face's Llama names (Flax ``Dense`` kernels are ``(in, out)``, HF's weights are
``(out, in)``)::

    embed_tokens/embedding                 model.embed_tokens.weight
    layers_{i}/input_layernorm/scale       model.layers.{i}.input_layernorm.weight
    layers_{i}/self_attn/q_proj/kernel     model.layers.{i}.self_attn.q_proj.weight (transposed)
        (k_proj, v_proj, o_proj likewise)
    layers_{i}/post_attention_layernorm/scale
    layers_{i}/mlp/gate_proj/kernel        model.layers.{i}.mlp.gate_proj.weight (transposed)
        (up_proj, down_proj likewise)
    norm/scale                             model.norm.weight
    lm_head/kernel                         lm_head.weight (transposed; absent when tied)

Conventions follow HF's ``LlamaForCausalLM``: rotary embeddings in the "rotate half" layout
(the first and second halves of each head's features form the rotated pairs), key / value head
``h // (num_heads // num_kv_heads)`` serves query head ``h``, RMSNorm ``x / sqrt(mean(x^2) + eps)
* scale`` in float32, the MLP ``down(silu(gate(x)) * up(x))``; with ``tie_embeddings`` the logits
are ``h @ embedding.T``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress._errors import ArgumentError

__all__ = ["LlamaConfig", "Llama", "rope_tables"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The shape of a `Llama` decoder.

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_layers: the usual sizes.
      num_heads: query heads; num_kv_heads: key / value heads (grouped-query attention when
        fewer; must divide ``num_heads``).
      head_dim: features per head (``None``: ``hidden_size // num_heads``).
      rope_theta: the rotary base; rms_norm_eps: RMSNorm's epsilon.
      tie_embeddings: logits from the token embedding (no ``lm_head``).
      max_position: the longest sequence `Llama` accepts.

    >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
    ...                      num_heads=4, num_kv_heads=2)
    >>> config.resolved_head_dim
    8
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position: int = 2048

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "max_position"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"LlamaConfig.{field}: expected a positive int, got {value!r}")
        if self.head_dim is not None and (
            isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 1
        ):
            raise ArgumentError(f"LlamaConfig.head_dim: expected a positive int or None, got {self.head_dim!r}")
        if self.num_heads % self.num_kv_heads:
            raise ArgumentError(
                f"LlamaConfig.num_kv_heads: {self.num_kv_heads} does not divide num_heads={self.num_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ArgumentError(
                f"LlamaConfig.head_dim: None needs num_heads={self.num_heads} to divide "
                f"hidden_size={self.hidden_size}; give head_dim explicitly"
            )
        if self.resolved_head_dim % 2:
            raise ArgumentError(f"LlamaConfig.head_dim: rotary embeddings need an even head_dim, got "
                                f"{self.resolved_head_dim}")
        if not self.rope_theta > 0 or not self.rms_norm_eps >= 0:
            raise ArgumentError(
                f"LlamaConfig: expected rope_theta > 0 and rms_norm_eps >= 0, got {self.rope_theta!r}, "
                f"{self.rms_norm_eps!r}"
            )

    @property
    def resolved_head_dim(self) -> int:
        """``head_dim``, or ``hidden_size // num_heads`` when it is ``None``."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @classmethod
    def from_hf_json(cls, path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> "LlamaConfig":
        """A config from a Hugging Face ``config.json`` (its path, its folder, or the parsed dict).

        Reads ``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
        ``num_attention_heads``, ``num_key_value_heads`` (default: ``num_attention_heads``),
        ``head_dim``, ``rope_theta``, ``rms_norm_eps``, ``tie_word_embeddings`` and
        ``max_position_embeddings``. Features this model does not implement (``rope_scaling``,
        attention / MLP biases, an activation other than SiLU) are an `ArgumentError` naming the field.

        >>> LlamaConfig.from_hf_json({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        ...     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}).num_kv_heads
        1
        """
        source = "config"
        if isinstance(path_or_dict, Mapping):
            data = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            with open(path, encoding="utf-8") as file:
                try:
                    data = json.load(file)
                except json.JSONDecodeError as error:
                    raise ArgumentError(f"{path}: not valid JSON ({error})") from error
            if not isinstance(data, dict):
                raise ArgumentError(f"{path}: expected a JSON object, got {type(data).__name__}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [key for key in required if key not in data]
        if missing:
            raise ArgumentError(f"{source}: missing field(s) {', '.join(missing)} of a Llama config.json")
        if data.get("rope_scaling") not in (None, {}):
            raise ArgumentError(f"{source}: rope_scaling={data['rope_scaling']!r} is not supported (plain RoPE only)")
        for key in ("attention_bias", "mlp_bias"):
            if data.get(key):
                raise ArgumentError(f"{source}: {key}=true is not supported (this Llama has no biases)")
        act = data.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ArgumentError(f"{source}: hidden_act={act!r} is not supported (SwiGLU with SiLU only)")
        return cls(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_layers=data["num_hidden_layers"],
            num_heads=data["num_attention_heads"],
            num_kv_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
            head_dim=data.get("head_dim"),
            rope_theta=float(data.get("rope_theta", 10000.0)),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
            max_position=int(data.get("max_position_embeddings", 2048)),
        )


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``positions.shape + (head_dim,)``, in HF's rotate-half layout:
    frequency ``theta ** (-2i / head_dim)`` for feature ``i`` and again for ``i + head_dim / 2``.

    >>> cos, sin = rope_tables(jnp.arange(3), 4, 10000.0)
    >>> cos.shape, float(sin[0].sum())
    ((3, 4), 0.0)
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, kernel_init=nn.initializers.normal(0.02), name=name)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, in float32."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale).astype(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        c = self.config
        batch, length, _ = x.shape
        hd = c.resolved_head_dim
        groups = c.num_heads // c.num_kv_heads
        q = _dense(c.num_heads * hd, "q_proj")(x).reshape(batch, length, c.num_heads, hd)
        k = _dense(c.num_kv_heads * hd, "k_proj")(x).reshape(batch, length, c.num_kv_heads, hd)
        v = _dense(c.num_kv_heads * hd, "v_proj")(x).reshape(batch, length, c.num_kv_heads, hd)
        cos_h, sin_h = cos[:, None, :], sin[:, None, :]  # (T, 1, hd): broadcast over heads
        q = q * cos_h + _rotate_half(q) * sin_h
        k = k * cos_h + _rotate_half(k) * sin_h
        # Query head h = kv * groups + r reads key / value head kv = h // groups.
        q = q.reshape(batch, length, c.num_kv_heads, groups, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / jnp.sqrt(jnp.float32(hd))
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(batch, length, c.num_heads * hd)
        return _dense(c.hidden_size, "o_proj")(out)


class MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = _dense(c.intermediate_size, "gate_proj")(x)
        up = _dense(c.intermediate_size, "up_proj")(x)
        return _dense(c.hidden_size, "down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then the MLP."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        c = self.config
        x = x + Attention(c, name="self_attn")(RMSNorm(c.rms_norm_eps, name="input_layernorm")(x), cos, sin)
        return x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x))


class Llama(nn.Module):
    """The decoder: ``input_ids`` int ``[batch, length]`` -> float32 logits ``[batch, length, vocab]``.

    >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
    ...                      num_heads=4, num_kv_heads=2)
    >>> model = Llama(config)
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> sorted(params), sorted(params["layers_0"]["self_attn"])
    (['embed_tokens', 'layers_0', 'layers_1', 'lm_head', 'norm'], ['k_proj', 'o_proj', 'q_proj', 'v_proj'])
    >>> model.apply({"params": params}, ids).shape
    (1, 5, 64)
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        if input_ids.ndim != 2:
            raise ArgumentError(f"Llama: input_ids: expected [batch, length], got shape {input_ids.shape}")
        length = input_ids.shape[1]
        if length > c.max_position:
            raise ArgumentError(f"Llama: input_ids: length {length} exceeds max_position={c.max_position}")
        embed = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.initializers.normal(0.02),
                         name="embed_tokens")
        x = embed(input_ids.astype(jnp.int32))
        cos, sin = rope_tables(jnp.arange(length), c.resolved_head_dim, c.rope_theta)
        for i in range(c.num_layers):
            x = DecoderLayer(c, name=f"layers_{i}")(x, cos, sin)
        x = RMSNorm(c.rms_norm_eps, name="norm")(x)
        if c.tie_embeddings:
            return embed.attend(x).astype(jnp.float32)
        return _dense(c.vocab_size, "lm_head")(x).astype(jnp.float32)
