"""Test accuracy of pruned small CNNs on the full Fashion-MNIST (60k train / 10k test).

    python benchmarks/prune_accuracy.py            # full run (~15 min on 2 CPU cores)
    python benchmarks/prune_accuracy.py --quick    # CI-sized: 3k-image subset, 2 epochs, sparsity 0.9, < 60 s

Model: Conv(8, 3x3) - ReLU - avgpool 2 - Conv(16, 3x3) - ReLU - avgpool 2 - Dense(128) - ReLU -
Dense(10), 103,018 params, Adam (lr 1e-3), batch 128. Pruned: every kernel except the first conv
(72 weights), with per-layer sparsities from ERK (`erk_sparsities`) so that the pruned kernels
as a whole have the target sparsity. Methods, each trained from the same initialisation:

* dense: the baseline, ``EPOCHS`` epochs.
* gradual: magnitude pruning during training, polynomial (cubic) schedule from 0 to the target
  over the first 2/3 of the steps, masks updated every 100 steps; ``EPOCHS`` epochs.
* one-shot+FT: the trained dense model, pruned once by magnitude (`prune_params`), then
  fine-tuned with the masks fixed (``prune(adam, masks=...)``) for ``FINETUNE_EPOCHS``.
  (It gets the dense run's epochs plus the fine-tuning: more compute than the others.)
* SET / RigL: sparse from the start (magnitude masks at step 0), drop/regrow every 100 steps with
  drop fraction 0.3 cosine-decayed to 0 at 3/4 of training; ``EPOCHS`` epochs.
* 2:4: the trained dense model, 2 of every 4 weights along each kernel's contracting axis kept
  (50%), then fine-tuned like one-shot (the usual recipe for N:M sparse tensor cores).

Every run prints and records test accuracy and the measured sparsity of the pruned kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxcompress.pruning as jp  # noqa: E402
from benchmarks._common import RESULTS_DIR, environment, format_table, write_json  # noqa: E402
from jaxcompress.demo.data import load_image_dataset  # noqa: E402

EPOCHS = 3
FINETUNE_EPOCHS = 1
BATCH = 128
LEARNING_RATE = 1e-3
UPDATE_EVERY = 100
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
PRUNED = r"params/(Conv_1|Dense_0|Dense_1)/kernel"


class CNN(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(self.num_classes)(x)


def loss_fn(params, model, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(model, params, opt, data, epochs, seed):
    """``epochs`` of training; returns (params, opt_state, seconds). ``data`` is NumPy."""
    x_train, y_train = data
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, model, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    steps_per_epoch = len(x_train) // BATCH
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(steps_per_epoch):
            idx = order[i * BATCH : (i + 1) * BATCH]
            params, state = step(params, state, x_train[idx], y_train[idx])
    jax.block_until_ready(params)
    return params, state, time.perf_counter() - start


def accuracy(model, params, x_test, y_test):
    predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), -1))
    correct = 0
    for i in range(0, len(x_test), 1000):
        correct += int(jnp.sum(predict(params, x_test[i : i + 1000]) == y_test[i : i + 1000]))
    return correct / len(x_test)


def pruned_sparsity(params):
    """Fraction of exact zeros in the pruned kernels (measured on the params, not the masks)."""
    plan = jp.plan_pruning(params, jp.PruneRule(pattern=PRUNED, sparsity=0.0), on_unused="ignore")
    leaves = plan.leaves_of(params)
    zeros = sum(int(np.sum(np.asarray(leaves[i]) == 0)) for i in plan.pruned_indices)
    total = sum(int(leaves[i].size) for i in plan.pruned_indices)
    return zeros / total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3k-image subset, 2 epochs, sparsity 0.9 (CI)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "prune_accuracy.json")
    args = parser.parse_args(argv)

    dataset = load_image_dataset()
    x_train, y_train = dataset.train_images, dataset.train_labels
    x_test, y_test = dataset.test_images, dataset.test_labels
    epochs, finetune_epochs, sparsities = args.epochs or EPOCHS, FINETUNE_EPOCHS, SPARSITIES
    update_every = UPDATE_EVERY
    if args.quick:  # 24 steps per epoch: update masks every 4 steps so every method really prunes
        x_train, y_train, x_test, y_test = x_train[:3072], y_train[:3072], x_test[:1000], y_test[:1000]
        epochs, finetune_epochs, sparsities, update_every = args.epochs or 2, 1, (0.9,), 4
    data = (np.asarray(x_train), np.asarray(y_train))
    steps = epochs * (len(x_train) // BATCH)
    print(f"{dataset.name}: {len(x_train)} train / {len(x_test)} test, {epochs} epochs = {steps} steps", flush=True)

    model = CNN(dataset.num_classes)
    init = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + x_train.shape[1:]))
    n_params = sum(int(p.size) for p in jax.tree.leaves(init))
    adam = lambda: optax.adam(LEARNING_RATE)  # noqa: E731
    rows = []

    def record(method, sparsity, params, seconds, target):
        acc = accuracy(model, params, x_test, y_test)
        row = {"method": method, "target_sparsity": target, "sparsity": pruned_sparsity(params), "accuracy": acc, "train_s": seconds}
        rows.append(row)
        print(f"  {method:12s} target {target:4.0%}  measured {row['sparsity']:.4f}  acc {acc:.4f}  ({seconds:.0f} s)", flush=True)
        return row

    dense_params, _, seconds = train(model, init, adam(), data, epochs, seed=0)
    dense = record("dense", 0.0, dense_params, seconds, 0.0)

    def erk(sparsity_or_schedule):
        return jp.PruneRule(pattern=PRUNED, sparsity=sparsity_or_schedule, distribution="erk")

    for sparsity in sparsities:
        gradual = erk(jp.polynomial(sparsity, 0, (2 * steps) // 3, frequency=update_every))
        opt = jp.prune(adam(), gradual, update_every=update_every)
        params, _, seconds = train(model, init, opt, data, epochs, seed=0)
        record("gradual", sparsity, params, seconds, sparsity)

        pruned, masks = jp.prune_params(dense_params, erk(sparsity))
        params, _, seconds = train(model, pruned, jp.prune(adam(), masks=masks), data, finetune_epochs, seed=1)
        record("one-shot+FT", sparsity, params, seconds, sparsity)

        for name, dst in (("SET", jp.SET), ("RigL", jp.RigL)):
            opt = jp.prune(adam(), erk(sparsity), update_every=update_every, dst=dst(end_step=(3 * steps) // 4, drop_fraction=0.3))
            params, _, seconds = train(model, init, opt, data, epochs, seed=0)
            record(name, sparsity, params, seconds, sparsity)

    two_four = jp.PruneRule(pattern=PRUNED, structure="n:m", n=2, m=4)
    pruned, masks = jp.prune_params(dense_params, two_four)
    params, _, seconds = train(model, pruned, jp.prune(adam(), masks=masks), data, finetune_epochs, seed=1)
    record("2:4+FT", 0.5, params, seconds, 0.5)

    for row in rows:
        row["delta_vs_dense"] = row["accuracy"] - dense["accuracy"]
    result = {
        "benchmark": "prune_accuracy",
        "quick": args.quick,
        "dataset": dataset.name,
        "train_images": len(x_train),
        "test_images": len(x_test),
        "model": {"name": "CNN conv8-conv16-dense128-dense10", "params": n_params, "pruned": PRUNED},
        "epochs": epochs,
        "finetune_epochs": finetune_epochs,
        "batch": BATCH,
        "learning_rate": LEARNING_RATE,
        "update_every": update_every,
        "results": rows,
        "environment": environment(),
    }
    path = write_json(args.out, result)
    print()
    print(f"{dataset.name}, CNN with {n_params:,} params, {epochs} epochs (+{finetune_epochs} fine-tuning for one-shot / 2:4)")
    print(format_table(rows, [
        ("method", "method", ""), ("target_sparsity", "target", ".0%"), ("sparsity", "measured", ".4f"),
        ("accuracy", "test acc", ".4f"), ("delta_vs_dense", "vs dense", "+.4f"), ("train_s", "train s", ".0f"),
    ]))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
