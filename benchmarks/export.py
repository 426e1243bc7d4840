"""Deployable int8 files: LiteRT and ONNX Runtime, int8 vs float32, next to JAX.

    python benchmarks/export.py            # full: trained models, the 10k test set
    python benchmarks/export.py --quick    # CI-sized (< 2 min): short training, 1000 test images

Models (Fashion-MNIST, 28x28x1):
  * ``cnn``: the demo CNN (`jaxcompress.demo.pipeline.CNN`: two stride-2 3x3 convs, 32 / 64 channels,
    dense 128, dense 10, relu), trained with Adam;
  * ``minilm``: all-MiniLM-L6-v2's encoder (if the package is installed), dynamic-range: int8
    dense kernels, activations quantized per row at run time; 32 real sentences x 128 tokens;
  * ``mobilenet``: a MobileNetV2-style CNN (stem conv, four inverted-residual blocks with 1x1
    expand -> 3x3 depthwise -> 1x1 project, BatchNorm, relu6, residual adds, global mean pool),
    trained with Adam (in ``--quick`` mode its weights stay at init and only the BatchNorm
    statistics are settled on real batches: depthwise-conv training is slow on a shared CPU).

Each model is quantized W8A8 as `compressed` runs it (int8 per-output-channel kernels, static
activation scales from `jc.calibrate_activations` on 1024 training images) and exported with
`jaxcompress.export.to_tflite` / `to_onnx` (same calibration batches); the float32 files come from
the same exporters with the float params. Variants: JAX fp32 (``jax.jit(model.apply)``), JAX int8
(``jax.jit(jc.compressed(model.apply))``), LiteRT fp32 / int8 (XNNPACK), ONNX Runtime fp32 / int8
(CPU provider, all graph optimizations), every runtime with ``--threads`` threads (default: all
cores).

Latency: batch 1 and 256, the variants called in turn (the order rotates each round) after a
warm-up call, medians per variant. The CPU is shared with other jobs: compare ratios from the
same run, not absolute numbers. ``agree_1step`` / ``top1_agree``: the int8 file's outputs against
``jc.compressed``'s (within one output quantization step; same argmax).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxcompress as jc  # noqa: E402
from benchmarks._common import RESULTS_DIR, environment, format_table, write_json  # noqa: E402
from jaxcompress.export import to_onnx, to_tflite  # noqa: E402
from jaxcompress.export._measure import load_runner  # noqa: E402
from jaxcompress.demo.pipeline import CNN  # noqa: E402
from tests.export.models import MobileNet, fashion_mnist, quantize_static, settle_batch_stats, train  # noqa: E402

BATCHES = (1, 256)


def build(name: str, quick: bool):
    data = fashion_mnist()
    if name == "cnn":
        model = CNN()
        variables = train(model, steps=100 if quick else 1500)
    else:
        model = MobileNet()
        if quick:
            variables = model.init(jax.random.key(0), data.train_images[:2])
            variables = settle_batch_stats(model, variables, [data.train_images[i * 256 : (i + 1) * 256] for i in range(4)])
        else:
            variables = train(model, steps=200, batch=64)
    return model, variables


def output_step(path: str) -> float:
    from ai_edge_litert import schema_py_generated as schema

    graph = schema.ModelT.InitFromPackedBuf(bytearray(Path(path).read_bytes()), 0).subgraphs[0]
    return float(graph.tensors[graph.operators[-1].inputs[0]].quantization.scale[0])


def bench_model(name: str, args, folder: Path) -> list[dict]:
    data = fashion_mnist()
    start = time.perf_counter()
    model, variables = build(name, args.quick)
    train_s = time.perf_counter() - start
    calibration = [data.train_images[i * 256 : (i + 1) * 256] for i in range(1 if args.quick else 4)]
    qparams = quantize_static(model.apply, variables, calibration)
    example = data.test_images[:2]
    files = {}
    start = time.perf_counter()
    files["LiteRT int8"] = to_tflite(model.apply, qparams, example, path=folder / f"{name}_int8.tflite", calibration=calibration)
    files["ORT int8"] = to_onnx(model.apply, qparams, example, path=folder / f"{name}_int8.onnx", calibration=calibration)
    export_s = (time.perf_counter() - start) / 2
    files["LiteRT fp32"] = to_tflite(model.apply, variables, example, path=folder / f"{name}_fp32.tflite")
    files["ORT fp32"] = to_onnx(model.apply, variables, example, path=folder / f"{name}_fp32.onnx")

    jax_fp32 = jax.jit(model.apply)
    jax_int8 = jax.jit(jc.compressed(model.apply))
    runners = {
        "JAX fp32": lambda x: np.asarray(jax_fp32(variables, x)),
        "JAX compressed int8": lambda x: np.asarray(jax_int8(qparams, x)),
    }
    for variant in ("LiteRT fp32", "LiteRT int8", "ORT fp32", "ORT int8"):
        runners[variant] = load_runner(files[variant], threads=args.threads)

    images, labels = data.test_images[: args.test_images], data.test_labels[: args.test_images]
    outputs = {v: np.concatenate([run(images[i : i + 256]) for i in range(0, len(images), 256)]) for v, run in runners.items()}
    step = output_step(files["LiteRT int8"])
    reference = outputs["JAX compressed int8"]

    times = {(v, b): [] for v in runners for b in BATCHES}
    order = list(runners)
    for batch in BATCHES:
        x = np.resize(images, (batch,) + images.shape[1:]).astype(np.float32)
        for run in runners.values():
            run(x)
        rounds = args.repeats if batch == 1 else max(3, args.repeats // 4)
        for r in range(rounds):
            for variant in order[r % len(order) :] + order[: r % len(order)]:
                t = time.perf_counter()
                runners[variant](x)
                times[(variant, batch)].append(time.perf_counter() - t)

    rows = []
    for variant in runners:
        out = outputs[variant]
        row = {
            "model": name,
            "variant": variant,
            "accuracy": float(np.mean(np.argmax(out, -1) == labels)),
            "bytes": os.path.getsize(files[variant]) if variant in files else None,
            **{f"b{b}_ms": 1e3 * statistics.median(times[(variant, b)]) for b in BATCHES},
        }
        if variant.endswith("int8") and variant in files:
            row["agree_1step"] = float(np.mean(np.abs(out - reference) <= step * 1.001))
            row["top1_agree"] = float(np.mean(np.argmax(out, -1) == np.argmax(reference, -1)))
        rows.append(row)
    for runtime in ("LiteRT", "ORT", "JAX"):
        fp32 = next(r for r in rows if r["variant"].startswith(runtime) and "fp32" in r["variant"])
        for row in rows:
            if row["variant"].startswith(runtime) and "int8" in row["variant"]:
                for b in BATCHES:
                    row[f"b{b}_speedup"] = fp32[f"b{b}_ms"] / row[f"b{b}_ms"]
                row["accuracy_delta_pt"] = 100 * (row["accuracy"] - fp32["accuracy"])
                if row["bytes"]:
                    row["size_ratio"] = fp32["bytes"] / row["bytes"]
    for row in rows:
        row["train_s"], row["export_s"] = train_s, export_s
    return rows


def bench_minilm(args, folder: Path) -> list[dict]:
    """all-MiniLM-L6-v2's encoder (hidden states in and out; the embedding lookup stays outside),
    dense kernels int8 dynamic-range, at batch 32 x 128 real sentences; quality is the mean
    cosine of the mean-pooled sentence embeddings to JAX fp32's."""
    from examples.bert import BertEmbeddings, BertEncoder, load_minilm, load_sentences, mean_pool, tokenize

    config, params, tokenizer = load_minilm()
    sentences, _ = load_sentences(32, strict=False)
    batch = tokenize(tokenizer, sentences, pad_to=128)
    hidden = np.asarray(BertEmbeddings(config).apply({"params": params["params"]["embeddings"]},
                                                     batch["input_ids"], batch["token_type_ids"]))
    bias = np.where(batch["attention_mask"][:, None, None, :] > 0, 0.0, -1e9).astype(np.float32)
    encoder = BertEncoder(config)
    variables = {"params": params["params"]["encoder"]}
    rules = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]
    qparams, _ = jc.quantize_params(variables, rules)
    start = time.perf_counter()
    files = {"LiteRT int8": to_tflite(encoder.apply, qparams, hidden[:2], bias[:2], path=folder / "minilm_int8.tflite"),
             "ORT int8": to_onnx(encoder.apply, qparams, hidden[:2], bias[:2], path=folder / "minilm_int8.onnx")}
    export_s = (time.perf_counter() - start) / 2
    files["LiteRT fp32"] = to_tflite(encoder.apply, variables, hidden[:2], bias[:2], path=folder / "minilm_fp32.tflite")
    files["ORT fp32"] = to_onnx(encoder.apply, variables, hidden[:2], bias[:2], path=folder / "minilm_fp32.onnx")
    jax_fp32, jax_int8 = jax.jit(encoder.apply), jax.jit(jc.compressed(encoder.apply))
    runners = {"JAX fp32": lambda h, b: np.asarray(jax_fp32(variables, h, b)),
               "JAX compressed int8": lambda h, b: np.asarray(jax_int8(qparams, h, b))}
    for variant in ("LiteRT fp32", "LiteRT int8", "ORT fp32", "ORT int8"):
        runners[variant] = load_runner(files[variant], threads=args.threads)
    pool = lambda out: np.asarray(mean_pool(out, batch["attention_mask"]))  # noqa: E731
    pooled = {v: pool(run(hidden, bias)) for v, run in runners.items()}
    times = {v: [] for v in runners}
    order = list(runners)
    for r in range(max(3, args.repeats // 4)):
        for variant in order[r % len(order) :] + order[: r % len(order)]:
            t = time.perf_counter()
            runners[variant](hidden, bias)
            times[variant].append(time.perf_counter() - t)
    rows = []
    for variant in runners:
        a, b = pooled[variant], pooled["JAX fp32"]
        cosine = float(np.mean(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))
        rows.append({"model": "minilm", "variant": variant, "cosine_vs_fp32": cosine,
                     "bytes": os.path.getsize(files[variant]) if variant in files else None,
                     "b32x128_ms": 1e3 * statistics.median(times[variant]), "export_s": export_s})
    for runtime in ("LiteRT", "ORT", "JAX"):
        fp32 = next(r for r in rows if r["variant"].startswith(runtime) and "fp32" in r["variant"])
        for row in rows:
            if row["variant"].startswith(runtime) and "int8" in row["variant"]:
                row["b32x128_speedup"] = fp32["b32x128_ms"] / row["b32x128_ms"]
                if row["bytes"]:
                    row["size_ratio"] = fp32["bytes"] / row["bytes"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", default=["cnn", "mobilenet", "minilm"],
                        choices=["cnn", "mobilenet", "minilm"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(RESULTS_DIR / "export.json"))
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (8 if args.quick else 40)
    args.test_images = 1000 if args.quick else 10000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "minilm":
                try:
                    minilm_rows = bench_minilm(args, Path(tmp))
                except FileNotFoundError as error:  # the MiniLM package is not installed
                    print(f"minilm skipped: {error}")
                    minilm_rows = []
                rows += minilm_rows
            else:
                rows += bench_model(name, args, Path(tmp))
    columns = [("model", "model", "s"), ("variant", "variant", "s"), ("accuracy", "accuracy", ".4f"),
               ("bytes", "bytes", ","), ("size_ratio", "fp32/int8 size", ".2f"), ("b1_ms", "b1 ms", ".3f"),
               ("b1_speedup", "b1 vs fp32", ".2f"), ("b256_ms", "b256 ms", ".2f"),
               ("b256_speedup", "b256 vs fp32", ".2f"), ("agree_1step", "agree 1 step", ".4f"),
               ("top1_agree", "top-1 agree", ".4f")]
    images = [r for r in rows if r["model"] != "minilm"]
    if images:
        print(format_table(images, columns))
    minilm = [r for r in rows if r["model"] == "minilm"]
    if minilm:
        print()
        print(format_table(minilm, [("variant", "MiniLM encoder", "s"), ("cosine_vs_fp32", "cosine vs fp32", ".5f"),
                                    ("bytes", "bytes", ","), ("size_ratio", "fp32/int8 size", ".2f"),
                                    ("b32x128_ms", "32x128 ms", ".1f"), ("b32x128_speedup", "vs fp32", ".2f")]))
    write_json(args.out, {"quick": args.quick, "threads": args.threads, "repeats": args.repeats,
                          "test_images": args.test_images, "environment": environment(), "results": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
