"""The real all-MiniLM-L6-v2: HF file -> compress (w8a8) -> load_hf -> compressed -> embeddings."""

import jax
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.checkpoint import recipes
from jaxcompress.models import hf
from jaxcompress.models.bert import BertConfig, embed
from jaxcompress.qarray import QArray
from tests.minilm import MINILM_FILES as FILES
from tests.minilm import needs_minilm

SENTENCES = ["A man is eating food.", "Someone is eating a piece of bread.", "The stock market fell sharply today.",
             "A cat sleeps on the warm windowsill."]


@pytest.fixture(scope="module")
def compressed_file(tmp_path_factory):
    dst = tmp_path_factory.mktemp("minilm") / "minilm-w8a8.safetensors"
    jc.compress_checkpoint(FILES.model, dst, "w8a8")
    return dst


@needs_minilm
def test_minilm_w8a8_file_runs_in_int8_close_to_fp32(compressed_file):
    from tokenizers import Tokenizer

    from examples.bert import tokenize

    float_params, config = hf.load_hf(FILES.model.parent)
    params, loaded_config = hf.load_hf(compressed_file)  # the config travels in the file's metadata
    assert loaded_config == config == BertConfig()
    query = params["params"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    assert isinstance(query, QArray) and query.shape == (384, 384) and query.channel_axes == (1,) and query.activation == "dynamic"
    batch = tokenize(Tokenizer.from_file(str(FILES.tokenizer)), SENTENCES)
    model = hf.model_for(config)
    reference = embed(jax.jit(model.apply), float_params, batch)
    int8 = embed(jax.jit(jc.compressed(model.apply)), params, batch)
    cosine = np.sum(np.asarray(reference) * np.asarray(int8), axis=-1)  # both unit norm
    assert cosine.min() >= 0.99, cosine


@needs_minilm
def test_minilm_presets_decide_the_same_on_hf_file_and_flax_tree(compressed_file):
    # the HF file compressed by name (encoder.layer.0.attention.self.query.weight, ...) equals
    # the Flax tree from load_hf quantized by name (encoder/layer_0/attention/query/kernel, ...)
    float_params, _ = hf.load_hf(FILES.model.parent)
    from_file, _ = hf.load_hf(compressed_file)
    # load_hf leaves W8A8 kernels' codes (out, in), where quantize_params stores them by default
    from_tree, _ = jc.quantize_params(float_params, recipes.load_recipe("w8a8").quantize, on_unused="ignore")
    flat_file = dict(jax.tree_util.tree_flatten_with_path(from_file, is_leaf=lambda x: isinstance(x, QArray))[0])
    flat_tree = dict(jax.tree_util.tree_flatten_with_path(from_tree, is_leaf=lambda x: isinstance(x, QArray))[0])
    assert flat_file.keys() == flat_tree.keys()
    quantized = 0
    for path, leaf in flat_file.items():
        other = flat_tree[path]
        assert type(leaf) is type(other), jax.tree_util.keystr(path)
        if isinstance(leaf, QArray):
            quantized += 1
            assert jax.tree_util.tree_structure(leaf) == jax.tree_util.tree_structure(other), jax.tree_util.keystr(path)
            np.testing.assert_array_equal(np.asarray(leaf.values), np.asarray(other.values))
            np.testing.assert_array_equal(np.asarray(leaf.scale), np.asarray(other.scale))
        else:
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(other))
    assert quantized == 3 + 6 * 6 + 1  # embedding tables, 6 kernels per layer, pooler
    query = from_file["params"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    assert query.stored_permutation == (1, 0) and query.values.shape == (384, 384)
