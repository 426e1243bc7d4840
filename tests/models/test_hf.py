"""jaxcompress.models.hf: Hugging Face names <-> Flax trees, float and compressed; presets give
the same decision per leaf in both namings; QArray transposes are exact."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress._errors import ArgumentError, CheckpointFormatError
from jaxcompress.checkpoint import recipes, treemeta
from jaxcompress.models import hf
from jaxcompress.models.bert import BertConfig, BertModel
from jaxcompress.models.layout import transpose_leaf
from jaxcompress.models.llama import Llama, LlamaConfig
from jaxcompress.pruning import prune_params
from jaxcompress.qarray import QArray

BERT = BertConfig(vocab_size=40, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=256, max_position_embeddings=16)
LLAMA = LlamaConfig(vocab_size=40, hidden_size=128, intermediate_size=192, num_layers=1, num_heads=4, num_kv_heads=2)
LLAMA_TIED = dataclasses.replace(LLAMA, tie_embeddings=True)


def _init(config):
    ids = jnp.array([[1, 5, 7, 2]], jnp.int32)
    if isinstance(config, BertConfig):
        return BertModel(config).init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids))
    return Llama(config).init(jax.random.PRNGKey(0), ids)


def _hf_json(config):
    if isinstance(config, BertConfig):
        return {"model_type": "bert", **dataclasses.asdict(config)}
    return {"model_type": "llama", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
            "tie_word_embeddings": config.tie_embeddings}


def _nested(flat):
    return treemeta.tree_from_records([([["key", part] for part in name.split(".")], leaf) for name, leaf in flat.items()])


def _flat(tree):
    return {treemeta.path_name(tokens, "."): leaf for tokens, leaf in treemeta.flatten_leaves(tree)}


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        x, y = fa[name], fb[name]
        assert type(x) is type(y) or not isinstance(x, QArray), name
        if isinstance(x, QArray):
            assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y), name
        for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
            assert np.asarray(u).dtype == np.asarray(v).dtype and np.array_equal(np.asarray(u), np.asarray(v)), name


# ---- transposing QArrays ----------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(rows=st.sampled_from([2, 5]), cols=st.sampled_from([4, 7]), bits=st.sampled_from([4, 8]), layout=st.sampled_from(["channel0", "channel1", "group", "tensor"]),
       symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_transpose_leaf_is_exact(rows, cols, bits, layout, symmetric, seed):
    w = jnp.asarray(np.random.default_rng(seed).normal(size=(rows, cols)), jnp.float32)
    spec = {"channel0": dict(channel_axes=(0,)), "channel1": dict(channel_axes=(1,)), "tensor": dict(channel_axes=()),
            "group": dict(channel_axes=(0,), group_size=min(3, cols), group_axis=1)}[layout]  # 3 may leave a ragged group
    q = jc.quantize(w, bits=bits, symmetric=symmetric, **spec)
    t = transpose_leaf(q)
    assert t.shape == (cols, rows) and t.bits == q.bits and t.group_size == q.group_size
    np.testing.assert_array_equal(np.asarray(t.dequantize()), np.asarray(q.dequantize()).T)
    np.testing.assert_array_equal(np.asarray(t.values), np.asarray(q.values).T)
    if layout == "group":
        assert t.group_axis == 0 and t.channel_axes == (1,)
    assert transpose_leaf(transpose_leaf(w)).tolist() == w.tolist()
    # move_codes=False: the codes stay put, the permutation records their order; the same QArray logically
    z = transpose_leaf(q, move_codes=False)
    assert z.values is q.values and z.stored_permutation == (1, 0)
    _assert_trees_equal({"z": z.with_layout(None)}, {"z": t})
    back = transpose_leaf(z, move_codes=False)
    assert back.values is q.values and back.stored_permutation is None
    _assert_trees_equal({"q": back}, {"q": q})


def test_transpose_leaf_input_scale_masks_and_errors():
    w = jnp.arange(12.0).reshape(3, 4) - 5
    q = dataclasses.replace(jc.quantize(w, bits=8, channel_axes=(0,), activation="static"),
                            input_scale=jnp.array([[1.0, 2.0, 4.0, 0.5]]), activation_scale=jnp.float32(0.1))
    t = transpose_leaf(q)
    assert t.input_scale.shape == (4, 1) and t.activation_scale.shape == ()
    np.testing.assert_allclose(np.asarray(t.dequantize()), np.asarray(q.dequantize()).T, rtol=0, atol=0)
    mask = np.arange(12).reshape(3, 4) % 2 == 0
    assert transpose_leaf(mask).shape == (4, 3) and transpose_leaf(optax.MaskedNode()) == optax.MaskedNode()
    with pytest.raises(ValueError, match="params/x: axes"):
        transpose_leaf(w, (0, 0), where="params/x")


# ---- the name mapping -------------------------------------------------------------------------


@pytest.mark.parametrize("config", [BERT, LLAMA, LLAMA_TIED], ids=["bert", "llama", "llama-tied"])
def test_flax_hf_round_trip_and_errors(config):
    params = _init(config)
    tensors = hf.flax_to_hf(params, config)
    if isinstance(config, BertConfig):
        assert tensors["encoder.layer.0.intermediate.dense.weight"].shape == (256, 128)  # torch (out, in)
    else:
        assert tensors["model.layers.0.mlp.up_proj.weight"].shape == (192, 128)
        assert ("lm_head.weight" in tensors) != config.tie_embeddings
    _assert_trees_equal(hf.hf_to_flax(tensors, config), params)
    name = next(iter(tensors))
    with pytest.raises(CheckpointFormatError, match="lacks 1 tensor"):
        hf.hf_to_flax({k: v for k, v in tensors.items() if k != name}, config, where="x.safetensors")
    with pytest.raises(CheckpointFormatError, match="does not use.*classifier.weight"):
        hf.hf_to_flax({**tensors, "classifier.weight": np.zeros((2, 2))}, config)
    wrong = dict(tensors)
    big = next(k for k, v in tensors.items() if k.endswith("proj.weight") or k.endswith("query.weight"))
    wrong[big] = np.zeros((7, 3), np.float32)
    with pytest.raises(CheckpointFormatError, match=f"{big} has shape"):
        hf.hf_to_flax(wrong, config)


def test_prefixes_and_buffers_are_accepted():
    params = _init(BERT)
    tensors = {"bert." + k: v for k, v in hf.flax_to_hf(params, BERT).items()}
    tensors["bert.embeddings.position_ids"] = np.arange(16)[None]
    _assert_trees_equal(hf.hf_to_flax(tensors, BERT), params)
    llama = hf.flax_to_hf(_init(LLAMA_TIED), LLAMA_TIED)
    base = {k.removeprefix("model."): v for k, v in llama.items()}  # a LlamaModel saved without "model."
    base["layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(16, np.float32)
    _assert_trees_equal(hf.hf_to_flax(base, LLAMA_TIED), _init(LLAMA_TIED))


@pytest.mark.parametrize("config", [BERT, LLAMA], ids=["bert", "llama"])
def test_load_hf_float_folder_runs_like_the_flax_model(tmp_path, config):
    params = _init(config)
    jc.export_safetensors(tmp_path / "model.safetensors", hf.flax_to_hf(params, config))
    (tmp_path / "config.json").write_text(json.dumps(_hf_json(config)))
    loaded, loaded_config = hf.load_hf(tmp_path)
    assert loaded_config == config
    _assert_trees_equal(loaded, params)
    with pytest.raises(ArgumentError, match="arch='(bert|llama)', but the checkpoint is a"):
        hf.load_hf(tmp_path, arch="bert" if isinstance(config, LlamaConfig) else "llama")
    (tmp_path / "config.json").write_text(json.dumps({**_hf_json(config), "model_type": "gpt2"}))
    with pytest.raises(ArgumentError, match="gpt2"):
        hf.load_hf(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config="):
        hf.load_hf(tmp_path)
    assert hf.load_hf(tmp_path / "model.safetensors", config=config)[1] == config


# ---- presets: one decision per leaf in both namings; compressed files load transposed -------


# Every preset on the Llama tree; on BERT (LayerNorm weight/bias vs scale/bias, three embedding
# tables) the ones whose rules differ in kind: activations, embeddings kept dense, per-row tables.
@pytest.mark.parametrize("preset, config", [(p, LLAMA) for p in recipes.list_presets()]
                         + [(p, BERT) for p in ("w8a8", "2of4-int8", "w4-g128-emb-row")])
def test_presets_decide_the_same_in_hf_and_flax_names(preset, config):
    recipe = recipes.load_recipe(preset)
    flax_tree = _init(config)
    hf_tree = _nested(hf.flax_to_hf(flax_tree, config))

    def compress(tree):
        masks = None
        if recipe.prune:
            tree, masks = prune_params(tree, recipe.prune, key=jax.random.PRNGKey(0), on_unused="ignore")
        return jc.quantize_params(tree, recipe.quantize, on_unused="ignore")[0], masks

    hf_q, hf_masks = compress(hf_tree)
    flax_q, flax_masks = compress(flax_tree)
    # the same decisions and codes, and the same stored layout: quantize_params stores W8A8 Flax kernels
    # (out, in), which is where hf_to_flax leaves the codes of HF weights (zero-copy)
    _assert_trees_equal(hf.hf_to_flax(_flat(hf_q), config), flax_q)
    _assert_trees_equal(hf.flax_to_hf(flax_q, config), _flat(hf_q))
    if recipe.prune:
        _assert_trees_equal(hf.hf_to_flax(_flat(hf_masks), config), flax_masks)
    kinds = {name: (leaf.bits, leaf.activation) if isinstance(leaf, QArray) else None for name, leaf in _flat(flax_q).items()}
    embedding = kinds["params.embed_tokens.embedding" if isinstance(config, LlamaConfig) else "params.embeddings.word_embeddings.embedding"]
    assert embedding is not None and embedding[1] == "weight_only"
    assert all(v is None for k, v in kinds.items() if k.endswith(("scale", "bias")))


def test_compressed_file_loads_with_its_config_and_runs_in_int8(tmp_path):
    # small widths keep the test fast (sliced quantization of larger leaves: tests/checkpoint/test_compress.py)
    config = dataclasses.replace(LLAMA, hidden_size=64, intermediate_size=96)
    params = _init(config)
    (tmp_path / "hf").mkdir()
    jc.export_safetensors(tmp_path / "hf" / "model.safetensors", hf.flax_to_hf(params, config))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(_hf_json(config)))
    jc.compress_checkpoint(tmp_path / "hf" / "model.safetensors", tmp_path / "w8a8.safetensors", "w8a8")
    loaded, loaded_config = hf.load_hf(tmp_path / "w8a8.safetensors")  # config from the file's metadata
    assert loaded_config == config
    expected, _ = jc.quantize_params(params, recipes.load_recipe("w8a8").quantize, on_unused="ignore")
    _assert_trees_equal(loaded, expected)  # W8A8 kernels come back in quantize_params' default (out, in) layout
    assert loaded["params"]["layers_0"]["mlp"]["down_proj"]["kernel"].stored_permutation == (1, 0)
    ids = jnp.array([[3, 9, 1, 4, 4, 2]], jnp.int32)
    model = hf.model_for(config)
    logits = jax.jit(jc.compressed(model.apply))(loaded, ids)
    reference = model.apply(params, ids)
    assert logits.shape == reference.shape == (1, 6, config.vocab_size)
    assert float(jnp.max(jnp.abs(logits - reference))) < 0.1 * float(jnp.max(jnp.abs(reference)))
    hlo = jax.jit(jc.compressed(model.apply)).lower(loaded, ids).compile().as_text()
    # the codes are s8 parameters either way: count the s8 x s8 -> s32 contractions themselves
    assert len(re.findall(r"= s32\[[^\]]*\][^ ]* dot\(", hlo)) >= config.num_layers * 7, "expected int8 dots for every layer's kernels"
