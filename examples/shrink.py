"""Structured pruning that physically shrinks the model: train -> (prune -> shrink -> fine-tune) x N.

Two networks on Fashion-MNIST (scikit-learn digits if the Debian package is missing):

* ``cnn``: the CNN of ``jaxcompress.demo.pipeline`` (conv 32 -> conv 64 -> flatten -> dense 128 ->
  10); the flatten couples each conv-64 channel with its 7x7 = 49 rows of the dense kernel;
* ``resnet``: a small ResNet (stride-2 stem conv, two residual blocks conv-BN-relu-conv-BN +
  skip, global pool, classifier): the stem and the second conv of each block share the residual
  stream's channels, so they are pruned as ONE group (found from the traced program).

Each round ranks the channels of every coupled group by the summed L1 norm of the members'
filters (`channel_masks`), removes the lowest ones from every leaf that holds them (`shrink`:
kernels, biases, BatchNorm scale/bias/mean/var, consumers' input rows) and fine-tunes the
SMALLER network (BatchNorm statistics are re-estimated first, forward passes only). Training the shrunk network is masked fine-tuning with every position of the
removed channels held at zero -- the same thing, at the smaller network's cost.

    python examples/shrink.py                       # both models, 50% of the filters, 2 rounds
    python examples/shrink.py --model resnet --target 0.75 --rounds 3
    python examples/shrink.py --quick               # CI-sized smoke run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxcompress.demo.data import Dataset, load_image_dataset  # noqa: E402
from jaxcompress.demo.pipeline import CNN as PipelineCNN  # noqa: E402
from jaxcompress.structured import analyze_channels, channel_masks_with, shrink_with  # noqa: E402

QUICK = dict(train_subset=2000, test_subset=500, steps=60, finetune_steps=30, latency_repeats=5)


class CNN(nn.Module):
    """`jaxcompress.demo.pipeline.CNN` with its widths as attributes (same parameter names), so a
    shrunk params tree of the pipeline's CNN runs in ``CNN(features=..., hidden=...)``."""

    features: Sequence[int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for features in self.features:
            x = nn.relu(nn.Conv(features, (3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class ResNet(nn.Module):
    """Stride-2 stem conv + BN, residual blocks (conv-BN-relu-conv-BN + skip), pool, classifier."""

    stem: int = 32
    inner: Sequence[int] = (32, 32)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        x = nn.relu(norm()(nn.Conv(self.stem, (3, 3), strides=(2, 2))(x)))
        for width in self.inner:
            y = nn.relu(norm()(nn.Conv(width, (3, 3))(x)))
            y = norm()(nn.Conv(self.stem, (3, 3))(y))
            x = nn.relu(x + y)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn": CNN,
    "resnet": ResNet,  # 32 channels: halved, every conv has <= 16 channels (see README)
    "resnet64": lambda: ResNet(stem=64, inner=(64, 64)),
}


def rebuild(model: nn.Module, features: dict[str, int]) -> nn.Module:
    """The same architecture with the feature counts `shrink` reported (others unchanged)."""
    if isinstance(model, CNN):
        return CNN(
            features=(features.get("params/Conv_0", model.features[0]), features.get("params/Conv_1", model.features[1])),
            hidden=features.get("params/Dense_0", model.hidden),
            num_classes=model.num_classes,
        )
    if isinstance(model, ResNet):
        inner = tuple(features.get(f"params/Conv_{2 * i + 1}", width) for i, width in enumerate(model.inner))
        return ResNet(stem=features.get("params/Conv_0", model.stem), inner=inner, num_classes=model.num_classes)
    raise TypeError(f"no rebuild rule for {type(model).__name__}")


def widths(model: nn.Module) -> dict[str, Any]:
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("parent", "name")}


def train(model: nn.Module, variables: dict, data: Dataset, steps: int, *, learning_rate: float = 2e-3,
          batch_size: int = 128, seed: int = 0) -> dict:
    """Adam on softmax cross-entropy; BatchNorm statistics (``batch_stats``) updated when present."""
    has_stats = "batch_stats" in variables
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(variables, opt_state, images, labels):
        def loss_fn(params):
            inputs = {**variables, "params": params}
            if has_stats:
                logits, updates = model.apply(inputs, images, train=True, mutable=["batch_stats"])
            else:
                logits, updates = model.apply(inputs, images), {}
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        changes, opt_state = optimizer.update(grads, opt_state, variables["params"])
        return {**variables, **updates, "params": optax.apply_updates(variables["params"], changes)}, opt_state, loss

    rng = np.random.default_rng(seed)
    images, labels = data.train_images, data.train_labels
    batch = min(batch_size, len(images))
    opt_state = optimizer.init(variables["params"])
    order, cursor = rng.permutation(len(images)), 0
    for _ in range(steps):
        if cursor + batch > len(order):
            order, cursor = rng.permutation(len(images)), 0
        index = order[cursor : cursor + batch]
        cursor += batch
        variables, opt_state, loss = step(variables, opt_state, images[index], labels[index])
    return jax.block_until_ready(variables)


def recalibrate(model: nn.Module, variables: dict, data: Dataset, batches: int = 30, batch_size: int = 256,
                seed: int = 0) -> dict:
    """Re-estimate BatchNorm running statistics of a freshly shrunk network (forward passes in
    training mode, no gradient step): removing channels shifts the inputs of the next BN layers,
    and stale statistics cost far more accuracy than the removed channels themselves."""
    if "batch_stats" not in variables:
        return variables
    step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1])
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        index = rng.choice(len(data.train_images), min(batch_size, len(data.train_images)), replace=False)
        variables = {**variables, **step(variables, data.train_images[index])}
    return variables


def accuracy(model: nn.Module, variables: dict, images: np.ndarray, labels: np.ndarray) -> float:
    predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x), axis=-1))
    correct = sum(int(jnp.sum(predict(variables, images[i : i + 1000]) == labels[i : i + 1000]))
                  for i in range(0, len(images), 1000))
    return correct / len(images)


def interleaved_latency(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each (already compiled) function, timed in alternating order."""
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def count(variables: Any) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(variables)))


def prune_and_shrink(model: nn.Module, variables: dict, data: Dataset, *, target: float, rounds: int,
                     finetune_steps: int, learning_rate: float, seed: int = 0, log=print) -> dict:
    """``rounds`` x (channel_masks -> shrink -> fine-tune), removing ``target`` of every group's
    channels in total; returns the final model, variables and a per-round log."""
    per_round = 1.0 - (1.0 - target) ** (1.0 / rounds)
    history = []
    example = jnp.asarray(data.test_images[:2])
    for r in range(rounds):
        coupling = analyze_channels(model.apply, variables, example)
        masks = channel_masks_with(coupling, variables, sparsity=per_round)
        result = shrink_with(coupling, variables, masks)
        model, variables = rebuild(model, result.features), result.params
        shrunk_accuracy = accuracy(model, variables, data.test_images, data.test_labels)
        variables = recalibrate(model, variables, data, seed=seed + r)
        recalibrated_accuracy = accuracy(model, variables, data.test_images, data.test_labels)
        variables = train(model, variables, data, finetune_steps, learning_rate=learning_rate, seed=seed + r + 1)
        tuned_accuracy = accuracy(model, variables, data.test_images, data.test_labels)
        history.append({"round": r + 1, "widths": widths(model), "params": count(variables["params"]),
                        "accuracy_after_shrink": shrunk_accuracy, "accuracy_after_bn_recalibration": recalibrated_accuracy,
                        "accuracy_after_finetune": tuned_accuracy})
        log(f"  round {r + 1}: widths {widths(model)}  params {count(variables['params']):,}  "
            f"accuracy {shrunk_accuracy:.2%} after shrink -> {recalibrated_accuracy:.2%} BN recalibrated -> "
            f"{tuned_accuracy:.2%} after {finetune_steps} steps")
    return {"model": model, "variables": variables, "history": history}


def run(name: str, data: Dataset, *, steps: int, finetune_steps: int, target: float, rounds: int,
        learning_rate: float, latency_repeats: int, latency_batch: int = 64, seed: int = 0, log=print) -> dict:
    """Train one network dense, prune+shrink it iteratively, compare accuracy and CPU latency."""
    start = time.perf_counter()
    model = MODELS[name]()
    init_model = PipelineCNN(data.num_classes) if name == "cnn" else model  # the pipeline's CNN, same names
    variables = init_model.init(jax.random.key(seed), jnp.asarray(data.train_images[:1]))
    variables = train(model, variables, data, steps, learning_rate=learning_rate, seed=seed)
    dense_accuracy = accuracy(model, variables, data.test_images, data.test_labels)
    log(f"{name}: dense {widths(model)}  params {count(variables['params']):,}  accuracy {dense_accuracy:.2%}")
    out = prune_and_shrink(model, variables, data, target=target, rounds=rounds, finetune_steps=finetune_steps,
                           learning_rate=learning_rate / 2, seed=seed, log=log)
    small, small_variables = out["model"], out["variables"]
    x = jnp.asarray(np.resize(data.test_images, (latency_batch,) + data.test_images.shape[1:]))
    dense_fn, small_fn = jax.jit(model.apply), jax.jit(small.apply)
    jax.block_until_ready((dense_fn(variables, x), small_fn(small_variables, x)))
    jax.block_until_ready((dense_fn(variables, x), small_fn(small_variables, x)))
    medians = interleaved_latency({"dense": lambda: dense_fn(variables, x), "shrunk": lambda: small_fn(small_variables, x)},
                                  latency_repeats)
    from jaxcompress.checkpoint.analysis import cost_analysis

    flops_dense = cost_analysis(model.apply, variables, x).flops
    flops_small = cost_analysis(small.apply, small_variables, x).flops
    final = out["history"][-1]["accuracy_after_finetune"]
    row = {
        "model": name,
        "dense_widths": widths(model),
        "shrunk_widths": widths(small),
        "params_dense": count(variables["params"]),
        "params_shrunk": count(small_variables["params"]),
        "accuracy_dense": dense_accuracy,
        "accuracy_shrunk": final,
        "accuracy_drop_pt": 100 * (dense_accuracy - final),
        "flops_dense": flops_dense,
        "flops_shrunk": flops_small,
        "latency_batch": latency_batch,
        "latency_ms_dense": 1e3 * medians["dense"],
        "latency_ms_shrunk": 1e3 * medians["shrunk"],
        "speedup": medians["dense"] / medians["shrunk"],
        "rounds": out["history"],
        "seconds": time.perf_counter() - start,
    }
    log(f"{name}: shrunk {widths(small)}  params {row['params_dense']:,} -> {row['params_shrunk']:,}  "
        f"FLOPs {flops_dense / flops_small:.2f}x fewer  batch-{latency_batch} latency "
        f"{row['latency_ms_dense']:.2f} -> {row['latency_ms_shrunk']:.2f} ms ({row['speedup']:.2f}x)  "
        f"accuracy {dense_accuracy:.2%} -> {final:.2%}")
    return row


def subset(data: Dataset, train_subset: int | None, test_subset: int | None) -> Dataset:
    return Dataset(data.name, data.train_images[:train_subset], data.train_labels[:train_subset],
                   data.test_images[:test_subset], data.test_labels[:test_subset], data.num_classes)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run on a subset with few steps")
    parser.add_argument("--model", choices=(*MODELS, "both"), default="both", help="both = cnn and resnet")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of each group's channels removed in total")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1500, help="dense training steps")
    parser.add_argument("--finetune-steps", type=int, default=500, help="fine-tuning steps per round")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/shrink_example.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = dict(steps=args.steps, finetune_steps=args.finetune_steps, latency_repeats=args.latency_repeats)
    data = load_image_dataset()
    if args.quick:
        options = {k: QUICK[k] for k in options}
        data = subset(data, QUICK["train_subset"], QUICK["test_subset"])
    names = ("cnn", "resnet") if args.model == "both" else (args.model,)
    rows = [run(name, data, target=args.target, rounds=args.rounds, learning_rate=args.learning_rate,
                seed=args.seed, **options) for name in names]
    result = {"dataset": data.name, "quick": args.quick, "target": args.target, "rounds": args.rounds,
              "train_images": len(data.train_images), "test_images": len(data.test_images), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
