"""CPU latency and accuracy of a physically shrunk network vs the dense one (50% of filters removed).

    python benchmarks/shrink.py            # full: Fashion-MNIST, CNN + small ResNet at 32 and 64 channels
    python benchmarks/shrink.py --quick    # CI-sized: the CNN on a subset, seconds

For each network: train dense, then 2 rounds of (`channel_masks` -> `shrink` -> fine-tune) that
remove 50% of the channels of every coupled group in total (examples/shrink.py does the work).
Reported per network:

* latency of the jitted forward pass at batch 64 on CPU, dense vs shrunk, both compiled first and
  timed INTERLEAVED in one process (alternating order each repeat); the medians and their ratio;
* XLA FLOPs (``cost_analysis``) and parameter counts of both;
* test accuracy of the dense model, of the shrunk fine-tuned model, and of the dense model
  trained for the same total number of steps (the fair control: fine-tuning is extra training).

The ResNet runs twice: 32 channels (halved to 16) and 64 channels (halved to 32). XLA:CPU hands a
convolution to YNNPACK only when it has more than 16 input or output channels
(``IsConvolutionOpSupportedByYnn`` in XLA's ``backends/cpu/ynn_support.cc``); at 16 channels it
falls back to its slower generic convolution, so the 32 -> 16 ResNet loses most of its 3.9x FLOP
cut. The random-weight width sweep at the end shows the effect without training.

Goals (issue 8): >= 1.6x faster at batch 64, accuracy drop <= 1 point after fine-tuning.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax.numpy as jnp  # noqa: E402

from benchmarks._common import RESULTS_DIR, environment, format_table, write_json  # noqa: E402
from examples import shrink as example  # noqa: E402
from jaxcompress.demo.data import load_image_dataset  # noqa: E402

FULL = {
    "cnn": dict(steps=1500, finetune_steps=500, latency_repeats=60),
    "resnet": dict(steps=600, finetune_steps=400, latency_repeats=30),
    "resnet64": dict(steps=600, finetune_steps=400, latency_repeats=30),
}
QUICK = {"cnn": dict(steps=40, finetune_steps=20, latency_repeats=10)}

COLUMNS = [
    ("model", "model", ""),
    ("params_dense", "params", ","),
    ("params_shrunk", "shrunk", ","),
    ("flops_ratio", "FLOPs/", ".2f"),
    ("latency_ms_dense", "dense ms", ".2f"),
    ("latency_ms_shrunk", "shrunk ms", ".2f"),
    ("speedup", "speedup", ".2f"),
    ("accuracy_dense", "acc dense", ".2%"),
    ("accuracy_control", "acc dense*", ".2%"),
    ("accuracy_shrunk", "acc shrunk", ".2%"),
    ("accuracy_drop_pt", "drop pt", ".2f"),
]


def control_accuracy(name: str, data, steps: int, learning_rate: float, seed: int) -> float:
    """Accuracy of the dense network trained for ``steps`` steps (same total as dense + fine-tuning)."""
    import jax

    model = example.MODELS[name]()
    init_model = example.PipelineCNN(data.num_classes) if name == "cnn" else model
    variables = init_model.init(jax.random.key(seed), jnp.asarray(data.train_images[:1]))
    variables = example.train(model, variables, data, steps, learning_rate=learning_rate, seed=seed)
    return example.accuracy(model, variables, data.test_images, data.test_labels)


def width_sweep(batch: int, pairs=((64, 32), (48, 24), (32, 16)), repeats: int = 20) -> list[dict]:
    """Dense vs half-width ResNet latency with random weights: where halving pays off on XLA:CPU."""
    import jax

    x = jnp.ones((batch, 28, 28, 1), jnp.float32)
    rows = []
    for dense, shrunk in pairs:
        calls = {}
        for label, width in (("dense", dense), ("shrunk", shrunk)):
            model = example.ResNet(stem=width, inner=(width, width))
            variables = jax.jit(model.init)(jax.random.key(0), x[:1])
            fn = jax.jit(model.apply)
            for _ in range(2):
                jax.block_until_ready(fn(variables, x))
            calls[label] = (lambda fn=fn, variables=variables: fn(variables, x))
        medians = example.interleaved_latency(calls, repeats)
        rows.append({"dense": dense, "shrunk": shrunk, "latency_ms_dense": 1e3 * medians["dense"],
                     "latency_ms_shrunk": 1e3 * medians["shrunk"], "speedup": medians["dense"] / medians["shrunk"]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=None, help="comma-separated subset of cnn,resnet,resnet64")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--no-control", action="store_true", help="skip the equal-steps dense control run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    plan = QUICK if args.quick else FULL
    if args.models:
        plan = {name: (QUICK.get(name) or FULL[name]) if args.quick else FULL[name] for name in args.models.split(",")}
    data = load_image_dataset()
    if args.quick:
        data = example.subset(data, 1500, 500)
    rows = []
    for name, options in plan.items():
        row = example.run(name, data, target=args.target, rounds=args.rounds, learning_rate=args.learning_rate,
                          latency_batch=args.batch, **options)
        row["flops_ratio"] = row["flops_dense"] / row["flops_shrunk"]
        total = options["steps"] + args.rounds * options["finetune_steps"]
        row["accuracy_control"] = None
        if not (args.no_control or args.quick):
            row["accuracy_control"] = control_accuracy(name, data, total, args.learning_rate, 0)
            row["accuracy_drop_vs_control_pt"] = 100 * (row["accuracy_control"] - row["accuracy_shrunk"])
        row["goal_speedup_met"] = row["speedup"] >= 1.6
        row["goal_accuracy_met"] = row["accuracy_drop_pt"] <= 1.0
        rows.append(row)

    sweep = [] if args.quick else width_sweep(args.batch)

    print()
    print(f"{data.name}: {len(data.train_images)} train / {len(data.test_images)} test images; "
          f"{args.target:.0%} of every channel group removed in {args.rounds} rounds; CPU latency at batch {args.batch}")
    print(format_table(rows, COLUMNS))
    print("acc dense* = dense model trained for as many steps as dense + fine-tuning (control)")
    if sweep:
        print(f"\nResNet forward latency by width (random weights, batch {args.batch}, interleaved medians):")
        print(format_table(sweep, [("dense", "dense width", ""), ("shrunk", "shrunk width", ""),
                                   ("latency_ms_dense", "dense ms", ".2f"), ("latency_ms_shrunk", "shrunk ms", ".2f"),
                                   ("speedup", "speedup", ".2f")]))
    result = {
        "benchmark": "shrink",
        "quick": args.quick,
        "dataset": data.name,
        "target": args.target,
        "rounds": args.rounds,
        "batch": args.batch,
        "results": rows,
        "resnet_width_sweep": sweep,
        "seconds": time.perf_counter() - start,
        "environment": environment(),
    }
    out = write_json(args.out or RESULTS_DIR / ("shrink_quick.json" if args.quick else "shrink.json"), result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
