"""The Llama decoder against a float64 NumPy reference (RoPE by explicit pair rotation, GQA by
explicit head lookup, causal mask, RMSNorm, SwiGLU), plus its config and error paths."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress._errors import ArgumentError
from jaxcompress.models.llama import Llama, LlamaConfig


def _np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x, theta):
    """x: (T, heads, hd). Feature i and i + hd/2 form a pair rotated by pos * theta^(-2i/hd)."""
    length, _, hd = x.shape
    half = hd // 2
    out = np.empty_like(x)
    for t in range(length):
        for i in range(half):
            angle = t * theta ** (-2.0 * i / hd)
            a, b = x[t, :, i], x[t, :, i + half]
            out[t, :, i] = a * np.cos(angle) - b * np.sin(angle)
            out[t, :, i + half] = b * np.cos(angle) + a * np.sin(angle)
    return out


def _np_llama(params, ids, c: LlamaConfig):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    hd = c.resolved_head_dim
    groups = c.num_heads // c.num_kv_heads
    logits = []
    for row in ids:
        x = p["embed_tokens"]["embedding"][row]  # (T, hidden)
        length = len(row)
        for i in range(c.num_layers):
            layer = p[f"layers_{i}"]
            attn = layer["self_attn"]
            h = _np_rms(x, layer["input_layernorm"]["scale"], c.rms_norm_eps)
            q = _np_rope((h @ attn["q_proj"]["kernel"]).reshape(length, c.num_heads, hd), c.rope_theta)
            k = _np_rope((h @ attn["k_proj"]["kernel"]).reshape(length, c.num_kv_heads, hd), c.rope_theta)
            v = (h @ attn["v_proj"]["kernel"]).reshape(length, c.num_kv_heads, hd)
            out = np.zeros((length, c.num_heads, hd))
            for head in range(c.num_heads):
                kv = head // groups
                for t in range(length):
                    s = np.array([q[t, head] @ k[u, kv] for u in range(t + 1)]) / np.sqrt(hd)
                    w = np.exp(s - s.max())
                    w /= w.sum()
                    out[t, head] = w @ v[: t + 1, kv]
            x = x + out.reshape(length, -1) @ attn["o_proj"]["kernel"]
            mlp = layer["mlp"]
            h = _np_rms(x, layer["post_attention_layernorm"]["scale"], c.rms_norm_eps)
            gate = h @ mlp["gate_proj"]["kernel"]
            up = h @ mlp["up_proj"]["kernel"]
            x = x + (gate / (1 + np.exp(-gate)) * up) @ mlp["down_proj"]["kernel"]
        x = _np_rms(x, p["norm"]["scale"], c.rms_norm_eps)
        head = p["embed_tokens"]["embedding"].T if c.tie_embeddings else p["lm_head"]["kernel"]
        logits.append(x @ head)
    return np.stack(logits)


def _random_params(model, ids, seed):
    params = model.init(jax.random.key(seed), ids)["params"]
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    # Weights large enough that attention is far from uniform, norm scales away from 1.
    return jax.tree.map(
        lambda a: (1 + 0.5 * jax.random.normal(next(keys), a.shape)) if a.ndim == 1
        else 0.4 * jax.random.normal(next(keys), a.shape),
        params,
    )


@pytest.mark.parametrize("tie", [False, True])
def test_matches_float64_reference(tie):
    # GQA (4 query heads over 2 kv heads), head_dim != hidden / heads, 2 layers.
    config = LlamaConfig(vocab_size=23, hidden_size=12, intermediate_size=20, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=6, rope_theta=100.0, rms_norm_eps=1e-5, tie_embeddings=tie)
    model = Llama(config)
    ids = np.array([[3, 7, 1, 22, 0, 5, 9], [1, 1, 2, 3, 5, 8, 13]], np.int32)
    params = _random_params(model, jnp.asarray(ids), seed=int(tie))
    assert ("lm_head" in params) is not tie
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    want = _np_llama(params, ids, config)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_param_tree_shapes_follow_the_interface():
    config = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=4,
                         num_kv_heads=1, head_dim=8)
    params = Llama(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes["embed_tokens"] == {"embedding": (30, 16)}
    assert shapes["layers_2"]["self_attn"] == {
        "q_proj": {"kernel": (16, 32)}, "k_proj": {"kernel": (16, 8)},
        "v_proj": {"kernel": (16, 8)}, "o_proj": {"kernel": (32, 16)},
    }
    assert shapes["layers_0"]["mlp"] == {
        "gate_proj": {"kernel": (16, 24)}, "up_proj": {"kernel": (16, 24)}, "down_proj": {"kernel": (24, 16)},
    }
    assert shapes["layers_1"]["input_layernorm"] == shapes["norm"] == {"scale": (16,)}
    assert shapes["lm_head"] == {"kernel": (16, 30)}
    assert sorted(params) == ["embed_tokens", "layers_0", "layers_1", "layers_2", "lm_head", "norm"]


def test_causal_later_tokens_do_not_change_earlier_logits():
    config = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                         num_kv_heads=2)
    model = Llama(config)
    ids = jnp.asarray([[1, 2, 3, 4, 5]], jnp.int32)
    params = _random_params(model, ids, seed=3)
    a = model.apply({"params": params}, ids)
    b = model.apply({"params": params}, ids.at[0, 3].set(9))
    np.testing.assert_array_equal(np.asarray(a[0, :3]), np.asarray(b[0, :3]))
    assert not np.allclose(np.asarray(a[0, 3:]), np.asarray(b[0, 3:]))


def test_from_hf_json(tmp_path):
    hf = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
          "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": True, "max_position_embeddings": 8192, "hidden_act": "silu",
          "rope_scaling": None, "attention_bias": False}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    for source in (hf, tmp_path, tmp_path / "config.json", str(tmp_path)):
        config = LlamaConfig.from_hf_json(source)
        assert config == LlamaConfig(49152, 576, 1536, 30, 9, 3, None, 100000.0, 1e-5, True, 8192)
    assert config.resolved_head_dim == 64
    assert LlamaConfig.from_hf_json({**hf, "num_key_value_heads": None}).num_kv_heads == 9


@pytest.mark.parametrize("change", [
    {"rope_scaling": {"type": "linear", "factor": 2.0}}, {"attention_bias": True}, {"hidden_act": "gelu"},
    {"num_hidden_layers": None}, {"num_key_value_heads": 4},
])
def test_from_hf_json_rejects_what_it_cannot_run(change):
    hf = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2, **change}
    if change.get("num_hidden_layers", 1) is None:
        del hf["num_hidden_layers"]
    with pytest.raises(ArgumentError):
        LlamaConfig.from_hf_json(hf)


def test_bad_config_and_input_errors(tmp_path):
    with pytest.raises(ArgumentError):
        LlamaConfig(10, 10, 8, 1, num_heads=3, num_kv_heads=3)  # 3 does not divide 10, no head_dim
    with pytest.raises(ArgumentError):
        LlamaConfig(10, 8, 8, 1, num_heads=2, num_kv_heads=1, head_dim=3)  # odd head_dim
    with pytest.raises(ArgumentError):
        LlamaConfig(10, 8, 8, 0, num_heads=2, num_kv_heads=2)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ArgumentError):
        LlamaConfig.from_hf_json(tmp_path)
    config = LlamaConfig(10, 8, 8, 1, num_heads=2, num_kv_heads=2, max_position=4)
    model = Llama(config)
    with pytest.raises(ArgumentError):
        model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ArgumentError):
        model.init(jax.random.key(0), jnp.zeros((5,), jnp.int32))
