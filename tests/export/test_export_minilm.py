"""The real all-MiniLM-L6-v2 encoder, dense kernels int8 with ``activation="dynamic"``, exported as
dynamic-range LiteRT and ONNX models: int8 weights in the runtimes' dynamic kernels, attention,
softmax, gelu and layer norm in float; sentence embeddings match fp32.

The exported function is the encoder (hidden states in, hidden states out): the token-embedding
lookup (an integer ``gather``) and the padding mask stay with the caller."""

import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.export import to_onnx, to_tflite
from tests.export.runtimes import optimized_ops, run_onnx, run_tflite, tflite_ops
from tests.minilm import needs_minilm

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "The new movie is awesome and everyone loved it.",
    "Quantized models run faster on phones.",
    "Stock markets fell sharply on Monday after the announcement.",
    "A cat sits on the warm windowsill.",
    "He cooked pasta for dinner.",
]


@pytest.fixture(scope="module")
def minilm():
    from examples.bert import BertEmbeddings, BertEncoder, load_minilm, mean_pool, tokenize

    config, params, tokenizer = load_minilm()
    batch = tokenize(tokenizer, SENTENCES, pad_to=24)
    embeddings = BertEmbeddings(config).apply({"params": params["params"]["embeddings"]},
                                              batch["input_ids"], batch["token_type_ids"])
    bias = np.where(batch["attention_mask"][:, None, None, :] > 0, 0.0, -1e9).astype(np.float32)
    encoder = BertEncoder(config)
    variables = {"params": params["params"]["encoder"]}
    rules = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]
    qparams, _ = jc.quantize_params(variables, rules)
    pool = lambda hidden: np.asarray(mean_pool(hidden, batch["attention_mask"]))  # noqa: E731
    return dict(apply=encoder.apply, variables=variables, qparams=qparams, hidden=np.asarray(embeddings), bias=bias,
                pool=pool, fp32=pool(encoder.apply(variables, embeddings, bias)))


def cosine(a, b):
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@needs_minilm
@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_dynamic_range_minilm(minilm, fmt, tmp_path):
    writer, run = (to_tflite, run_tflite) if fmt == "tflite" else (to_onnx, run_onnx)
    path = writer(minilm["apply"], minilm["qparams"], minilm["hidden"][:2], minilm["bias"][:2],
                  path=tmp_path / f"minilm.{fmt}")
    out = run(path, minilm["hidden"], minilm["bias"])[0]
    assert np.mean(cosine(minilm["pool"](out), minilm["fp32"])) >= 0.995
    if fmt == "tflite":
        ops = tflite_ops(open(path, "rb").read())
        dense = [types[:2] for name, types in ops if name == "FULLY_CONNECTED"]
        assert dense == [["FLOAT32", "INT8"]] * 36  # 6 layers x (q, k, v, out, ffn in, ffn out)
        assert {"SOFTMAX", "GELU", "BATCH_MATMUL"} <= {name for name, _ in ops}
    else:
        ops = optimized_ops(path, tmp_path)
        assert not {"Gemm", "FusedGemm"} & set(ops)
        integer = sum(ops.count(k) for k in ("MatMulInteger", "MatMulIntegerToFloat"))
        assert integer == 36, ops
