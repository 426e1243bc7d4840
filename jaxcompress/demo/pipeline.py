"""The end-to-end compression pipeline behind ``jaxcompress demo`` and ``examples/fashion_mnist.py``.

fp32 training -> post-training int8 -> gradual magnitude pruning (`prune`) -> quantization-aware
training of the pruned model (`qat` around `prune` with the masks frozen) -> integer conversion
with the ranges QAT used -> compressed safetensors files and a standalone `jax.export` artifact.
Every variant is evaluated on the test set the way it would be deployed: the int8 variants run
through `compressed(model.apply, policy="tune")` (int8 x int8 -> int32 dots and convolutions
where they make the whole program faster on this machine, weight-only float ops elsewhere:
`jaxcompress.execute.tune`, timed once per input shape and cached), the float ones through
``model.apply``. Sizes are the sizes of the files written; latencies are the median and
interquartile range of the jitted forward pass at batch 1 and 256 (the LiteRT / ONNX Runtime
files in their runtimes), all variants timed in the same interleaved rounds
(`jaxcompress.demo.timing`). The files go to ``out_dir``, or to a temporary folder that is
removed when the run ends (``keep=True`` keeps it); a failed run removes a folder it created.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import textwrap
import time
from typing import Any, Callable, Literal, TypedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.checkpoint.safetensors_io import export_safetensors, import_safetensors
from jaxcompress.execute.transform import compressed
from jaxcompress.demo.data import Dataset, load_image_dataset
from jaxcompress.demo.runtimes import runtime_rows_and_calls
from jaxcompress.demo.timing import Spread, interleaved_latency
from jaxcompress.params import quantize_params
from jaxcompress.pruning import PruneRule, polynomial, prune, prune_masks
from jaxcompress.training import convert_qat, fake_quant, fake_quant_activations, qat, qat_activation_ranges, qat_ranges
from jaxcompress.rules import QuantRule

__all__ = ["PipelineConfig", "CNN", "run_pipeline", "format_table", "QUICK_SUBSET", "UNSTRUCTURED_NOTE"]


class _Subset(TypedDict):
    train_subset: int
    test_subset: int
    latency_repeats: int


# What a --quick smoke run trains and evaluates on (the demo and the example share it).
QUICK_SUBSET: _Subset = {"train_subset": 3000, "test_subset": 1000, "latency_repeats": 10}

UNSTRUCTURED_NOTE = (
    "The pruned variants' masks are unstructured: their zeros are stored compactly but still "
    "multiplied by dense kernels, so on CPU they run no faster than the dense model of the same "
    "precision. Unstructured pruning buys file size here, not latency (for speed: structured "
    "pruning + jaxcompress.shrink)."
)


class CNN(nn.Module):
    """Two stride-2 3x3 convolutions (32, 64 channels), a 128-unit hidden layer, the classifier."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for features in (32, 64):
            x = nn.relu(nn.Conv(features, (3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Knobs of the pipeline. ``group_size`` groups every kernel's input axis (a shorter last group where it does not divide)."""

    fp32_steps: int = 1500
    prune_steps: int = 1000
    qat_steps: int = 600
    sparsity: float = 0.8
    bits: int = 8
    group_size: int | None = None
    activation: Literal["dynamic", "static", "weight_only"] = "dynamic"
    # None: "static" for int8 per-channel (a full-integer file), else `activation`
    qat_activation: Literal["dynamic", "static", "weight_only"] | None = None
    export_files: bool = True
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    latency_repeats: int = 50  # interleaved rounds at batch 1; batch 256 gets a third (at least 3)
    out_dir: str | None = None  # None: a temporary folder, removed at the end unless `keep`
    keep: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("fp32_steps", "prune_steps", "qat_steps", "batch_size", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")


def _progress(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="step", file=sys.stdout, mininterval=1.0, leave=False)
        except ImportError:
            pass
    return None


def _quant_rules(params: Any, config: PipelineConfig, activation: str | None = None) -> list[QuantRule]:
    """Kernels to ``config.bits`` per output channel (in groups of ``config.group_size`` along the input axis when set)."""
    rule = QuantRule(
        pattern=r".*kernel", bits=config.bits, channel_axes=(-1,), activation=activation or config.activation,
        calibration="mse" if config.bits < 8 else "absmax",
    )
    if config.group_size:  # any width: a group that does not divide the input axis is ragged
        rule = dataclasses.replace(rule, group_size=config.group_size)
    return [rule]


class _Trainer:
    """Minibatch training with a jitted step. Float training by default; with ``qat_rules``
    (the optimizer then contains a `qat` state) the loss sees fake-quantized weights (the
    state's tracked ranges) and fake-quantized activations (`fake_quant_activations`, the
    activations `compressed` will quantize), and the observed activation ranges go to the
    update."""

    def __init__(self, model: nn.Module, data: Dataset, config: PipelineConfig):
        self.model, self.data, self.config = model, data, config
        self.rng = np.random.default_rng(config.seed)

    def run(self, params, optimizer, steps: int, desc: str, qat_rules: list[QuantRule] | None = None):
        model = self.model
        activation_apply = fake_quant_activations(model.apply, qat_rules, on_unused="ignore") if qat_rules else None

        @jax.jit
        def step(params, opt_state, images, labels):
            def loss_fn(p):
                if activation_apply is None:
                    logits, observed = model.apply(p, images), None
                else:
                    weights = fake_quant(p, qat_rules, ranges=qat_ranges(opt_state), on_unused="ignore")
                    logits, observed = activation_apply(weights, images, ranges=qat_activation_ranges(opt_state))
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), observed

            (loss, observed), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            if activation_apply is None:
                updates, opt_state = optimizer.update(grads, opt_state, params)
            else:
                updates, opt_state = optimizer.update(grads, opt_state, params, activation_stats=observed)
            return optax.apply_updates(params, updates), opt_state, loss

        images, labels = self.data.train_images, self.data.train_labels
        batch = min(self.config.batch_size, len(images))
        opt_state = optimizer.init(params)
        bar = _progress(steps, desc, self.config.progress)
        order, cursor = self.rng.permutation(len(images)), 0
        start = time.perf_counter()
        for i in range(steps):
            if cursor + batch > len(order):
                order, cursor = self.rng.permutation(len(images)), 0
            index = order[cursor : cursor + batch]
            cursor += batch
            params, opt_state, loss = step(params, opt_state, images[index], labels[index])
            if bar is not None:
                bar.update(1)
                if i % 50 == 0:
                    bar.set_postfix(loss=f"{float(loss):.3f}")
        jax.block_until_ready(params)
        if bar is not None:
            bar.close()
        if self.config.progress:
            print(f"  {desc}: {steps} steps in {time.perf_counter() - start:.1f} s, last loss {float(loss):.4f}", flush=True)
        return params, opt_state


def _accuracy(apply: Callable, params: Any, images: np.ndarray, labels: np.ndarray) -> float:
    predict = jax.jit(lambda p, x: jnp.argmax(apply(p, x), axis=-1))
    correct = 0
    for i in range(0, len(images), 1000):
        correct += int(jnp.sum(predict(params, images[i : i + 1000]) == labels[i : i + 1000]))
    return correct / len(images)


def _timed_call(apply: Callable, params: Any, images: np.ndarray, batch: int) -> Callable[[], object]:
    """One jitted forward pass of ``apply(params, x)`` on a batch of ``batch`` test images,
    waiting for its result (compiled on the first call)."""
    fn = jax.jit(apply)
    x = jnp.asarray(np.resize(images, (batch,) + images.shape[1:]))
    return lambda: jax.block_until_ready(fn(params, x))


def _export(apply: Callable, params: Any, file_params: Any, sample: np.ndarray, path: str) -> tuple[int, float]:
    """Serialize ``jax.jit(apply)`` taking ``(params, images)`` (the batch dimension symbolic),
    reload it and run it on ``file_params`` (the params read back from the variant's safetensors
    file); return (file size, max |difference| against ``jax.jit(apply)(params, sample)``).
    Both sides run the same compiled program, so the check cannot flip int8 activation codes
    at rounding boundaries (a program with the weights baked in compiles differently)."""
    (batch,) = jax.export.symbolic_shape("batch")
    x_spec = jax.ShapeDtypeStruct((batch,) + sample.shape[1:], jnp.float32)
    p_spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    fn = jax.jit(apply)
    blob = jax.export.export(fn)(p_spec, x_spec).serialize()
    with open(path, "wb") as f:
        f.write(blob)
    with open(path, "rb") as f:
        reloaded = jax.export.deserialize(bytearray(f.read()))
    x = jnp.asarray(sample)
    difference = float(jnp.max(jnp.abs(reloaded.call(file_params, x) - fn(params, x))))
    return os.path.getsize(path), difference


def run_pipeline(config: PipelineConfig = PipelineConfig(), data: Dataset | None = None) -> dict[str, Any]:
    """Run every stage; return ``{"dataset", "rows", "export", "config", "out_dir", "seconds", ...}``.

    Each row: variant, accuracy, file bytes, ratio vs fp32, latency at batch 1 and 256 (median
    ms ``latency_ms_b*`` and its interquartile range ``latency_iqr_ms_b*``), and for pruned
    variants the measured kernel sparsity. The files go to ``config.out_dir``; without one to
    a temporary folder removed before returning (``out_dir`` and the rows' ``file`` are then
    ``None``) unless ``config.keep``. A run that fails removes the folder if it created it.
    """
    temporary = config.out_dir is None
    out_dir = tempfile.mkdtemp(prefix="jaxcompress-demo-") if config.out_dir is None else config.out_dir
    created = temporary or not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        result = _run(config, data, out_dir)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if temporary and not config.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
        for row in result["rows"]:
            row["file"] = None
        result["export"]["path"] = None
        result["out_dir"] = None
    return result


def _run(config: PipelineConfig, data: Dataset | None, out_dir: str) -> dict[str, Any]:
    start = time.perf_counter()
    data = data if data is not None else load_image_dataset()
    train_x, train_y = data.train_images[: config.train_subset], data.train_labels[: config.train_subset]
    test_x, test_y = data.test_images[: config.test_subset], data.test_labels[: config.test_subset]
    data = Dataset(data.name, train_x, train_y, test_x, test_y, data.num_classes)
    model = CNN(data.num_classes)
    trainer = _Trainer(model, data, config)
    params = model.init(jax.random.key(config.seed), jnp.asarray(train_x[:1]))
    # the int8 variants are evaluated, timed and exported as deployed: each site on the path that
    # makes the whole program fastest here (tuned once per input shape, cached on disk)
    int_apply = compressed(model.apply, policy="tune")

    # 1. fp32.
    fp32, _ = trainer.run(params, optax.adam(config.learning_rate), config.fp32_steps, "fp32 training")
    quant_rules = _quant_rules(fp32, config)

    # 2. post-training quantization of the fp32 model.
    ptq, _ = quantize_params(fp32, quant_rules, on_unused="ignore")

    # 3. gradual magnitude pruning (Zhu & Gupta) from the fp32 model; the 288-weight first conv stays dense.
    end = max(1, int(0.7 * config.prune_steps))
    every = max(1, end // 10)
    prune_rules = [
        PruneRule(pattern=r"params/Conv_0/kernel", skip=True),
        PruneRule(pattern=r".*kernel", sparsity=polynomial(config.sparsity, 0, end, frequency=every)),
    ]
    pruner = prune(optax.adam(config.learning_rate / 2), prune_rules, update_every=every, end_step=end)
    pruned, prune_state = trainer.run(fp32, pruner, config.prune_steps, "gradual pruning")
    masks = prune_masks(prune_state)

    # 4. QAT of the pruned model: masks frozen, weight and activation ranges tracked, then frozen
    #    for the last 20%; the activations compressed() quantizes are fake-quantized too.
    exportable = config.bits == 8 and not config.group_size  # the runtimes' int8 kernels: per-channel int8
    qat_activation = config.qat_activation or ("static" if exportable else config.activation)
    qat_rules = _quant_rules(fp32, config, activation=qat_activation)
    qat_opt = qat(
        prune(optax.adam(config.learning_rate / 4), masks=masks),
        qat_rules,
        freeze_step=int(0.8 * config.qat_steps),
        on_unused="ignore",
    )
    qat_params, qat_state = trainer.run(
        pruned, qat_opt, config.qat_steps, "int8 QAT" if config.bits == 8 else f"int{config.bits} QAT",
        qat_rules=qat_rules,
    )
    converted = convert_qat(qat_params, qat_rules, qat_state)

    # 5. files and accuracy; every variant's forward pass at batch 1 and 256, for the timing below.
    label = f"int{config.bits}" + (f" g{config.group_size}" if config.group_size else "")
    variants = [
        ("fp32", fp32, None, model.apply),
        (f"PTQ {label}", ptq, None, int_apply),
        (f"pruned {config.sparsity:.0%}", pruned, masks, model.apply),
        (f"pruned {config.sparsity:.0%} + QAT {label}", converted, masks, int_apply),
    ]
    rows: list[dict[str, Any]] = []
    calls: list[dict[int, Callable[[], object]]] = []
    for name, tree, tree_masks, apply in variants:
        if config.sparsity == 0.0:
            tree_masks = None  # nothing pruned: a bitmap would only add bytes
        filename = os.path.join(out_dir, name.replace(" ", "_").replace("%", "pct").replace("+", "and") + ".safetensors")
        size = export_safetensors(filename, tree, tree_masks)
        rows.append({
            "variant": name,
            "accuracy": _accuracy(apply, tree, test_x, test_y),
            "file": filename,
            "bytes": size,
            "sparsity": _kernel_sparsity(tree_masks) if tree_masks is not None else None,
        })
        calls.append({batch: _timed_call(apply, tree, test_x, batch) for batch in (1, 256)})
    for row in rows:
        row["ratio"] = rows[0]["bytes"] / row["bytes"]
    export_path = os.path.join(out_dir, "pruned_qat_int.jaxexport")
    file_params, _ = import_safetensors(rows[3]["file"])
    # the artifact has a symbolic batch, which cannot be timed: every site on the integer path the
    # rules asked for (policy "rule"), checked against the same program in process
    export_apply = compressed(model.apply)
    export_bytes, export_difference = _export(export_apply, converted, file_params, test_x[:8], export_path)
    if config.export_files and not exportable:
        print(f"  no LiteRT / ONNX files: the runtimes' integer kernels take per-channel int8, not {label}", flush=True)
    elif config.export_files:
        runtime_rows, runtime_calls = runtime_rows_and_calls(model, fp32, converted, train_x, test_x, test_y, out_dir, label)
        rows += runtime_rows
        calls += runtime_calls

    # 6. latency: all variants in the same interleaved rounds (the machine's drift hits all alike).
    repeats = {1: config.latency_repeats, 256: max(3, config.latency_repeats // 3)}
    for batch, n in repeats.items():
        spreads = interleaved_latency({str(i): c[batch] for i, c in enumerate(calls)}, repeats=n)
        for i, row in enumerate(rows):
            spread: Spread = spreads[str(i)]
            row[f"latency_ms_b{batch}"] = spread.median_ms
            row[f"latency_iqr_ms_b{batch}"] = [spread.p25_ms, spread.p75_ms]
    return {
        "dataset": data.name,
        "train_images": len(train_x),
        "test_images": len(test_x),
        "rows": rows,
        "latency_repeats": {f"b{batch}": n for batch, n in repeats.items()},
        "export": {"path": export_path, "bytes": export_bytes, "max_abs_difference": export_difference},
        "config": dataclasses.asdict(config),
        "out_dir": out_dir,
        "seconds": time.perf_counter() - start,
    }


def _kernel_sparsity(masks: Any) -> float:
    leaves = [m for m in jax.tree_util.tree_leaves(masks) if hasattr(m, "shape")]
    total = sum(m.size for m in leaves)
    return float(sum(int(np.sum(~np.asarray(m))) for m in leaves)) / total


def format_table(result: dict[str, Any]) -> str:
    """The pipeline's result table: latency as the median and interquartile range (ms) of the
    interleaved rounds, and a note when pruned variants are listed (`UNSTRUCTURED_NOTE`).

    >>> row = {"variant": "fp32", "accuracy": 0.9, "bytes": 4000, "ratio": 1.0, "sparsity": None,
    ...        "latency_ms_b1": 0.5, "latency_iqr_ms_b1": [0.48, 0.53],
    ...        "latency_ms_b256": 9.0, "latency_iqr_ms_b256": [8.5, 9.75]}
    >>> print(format_table({"rows": [row], "latency_repeats": {"b1": 50, "b256": 16}}))
    variant                          accuracy   file bytes    ratio  b1 ms     b1 IQR  b256 ms      b256 IQR  sparsity
    ------------------------------------------------------------------------------------------------------------------
    fp32                               90.00%        4,000    1.00x   0.50  0.48-0.53     9.00     8.50-9.75         -
    latency: median and interquartile range (IQR) in ms of 50 (batch 1) / 16 (batch 256) interleaved runs
    per variant on this machine (shared CPUs are noisy: compare ratios, not absolute times).
    """
    header = (f"{'variant':<30} {'accuracy':>10} {'file bytes':>12} {'ratio':>8} {'b1 ms':>6} {'b1 IQR':>10} "
              f"{'b256 ms':>8} {'b256 IQR':>13} {'sparsity':>9}")
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        sparsity = "-" if row["sparsity"] is None else f"{row['sparsity']:.1%}"
        iqr = {b: "{:.2f}-{:.2f}".format(*row[f"latency_iqr_ms_b{b}"]) if f"latency_iqr_ms_b{b}" in row else "-"
               for b in (1, 256)}
        lines.append(
            f"{row['variant']:<30} {row['accuracy']:>10.2%} {row['bytes']:>12,} {row['ratio']:>7.2f}x "
            f"{row['latency_ms_b1']:>6.2f} {iqr[1]:>10} {row['latency_ms_b256']:>8.2f} {iqr[256]:>13} {sparsity:>9}"
        )
    repeats = result.get("latency_repeats")
    if repeats:
        lines.append(
            f"latency: median and interquartile range (IQR) in ms of {repeats['b1']} (batch 1) / {repeats['b256']} "
            f"(batch 256) interleaved runs\nper variant on this machine (shared CPUs are noisy: compare ratios, not "
            f"absolute times)."
        )
    if any(row["sparsity"] for row in result["rows"]):
        lines += textwrap.wrap(UNSTRUCTURED_NOTE, 100)
    return "\n".join(lines)
