"""The ``jaxcompress`` command line (also ``python -m jaxcompress``).

Subcommands:
  demo    train a small CNN on Fashion-MNIST, post-training-quantize it (int8, int4) and print
          accuracy, size and SQNR for every variant.

Exit codes: 0 success, 2 usage error (bad subcommand or option), 1 failure while running.

A subcommand is a `Command`: a name, one line of help, a function that adds its options to an
``argparse`` parser and a function that runs it and returns the exit code; add new ones to
`COMMANDS`. Importing this module is cheap: jax, flax and optax are imported when a command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Callable, Sequence

__all__ = ["Command", "COMMANDS", "build_parser", "main", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the
    exit code."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- demo --------------------------------------------------------------------------------------

_DEMO_DESCRIPTION = """\
Train a small CNN (flax linen) on Fashion-MNIST (Debian package dataset-fashion-mnist; without it,
scikit-learn's 8x8 digits), then post-training-quantize its weights with jaxcompress.quantize_params:
int8 per-channel absmax, int4 per-channel MSE, int4 groups-of-32 MSE. Each variant is evaluated on
the test set with the dequantized weights; one table shows accuracy, size (bytes of the stored
params, scales included, biases kept in float32), compression ratio and median per-layer SQNR.
The default run takes a few minutes on 2 CPU cores; --quick is a CI-sized smoke run."""


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``jaxcompress demo``."""
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, 5000 train / 2000 test images")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 2000, --quick 200)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar / periodic loss lines")


def _positive(value: int, flag: str) -> None:
    if value <= 0:
        raise _UsageError(f"{flag} must be a positive integer, got {value}")


class _UsageError(Exception):
    """A bad option value found after parsing (reported like an argparse error, exit code 2)."""


def _make_cnn(num_classes: int):
    """The demo CNN: two stride-2 3x3 convs (32, 64 channels), a hidden Dense layer, the
    classifier. Strided convs instead of max-pooling: ~9x faster training steps on CPU."""
    import flax.linen as nn

    class CNN(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x):
            for features in (32, 64):
                x = nn.relu(nn.Conv(features, (3, 3), strides=(2, 2))(x))
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(128)(x))
            return nn.Dense(self.num_classes)(x)

    return CNN(num_classes)


def _demo_rules(params: Any) -> tuple[dict[str, list], list[str]]:
    """The quantization variants. Groups of 32 run along a kernel's input axis; a kernel whose
    input axis is not a multiple of 32 (the first conv sees 1 channel) gets per-channel int4."""
    import re

    import jax

    from jaxcompress.rules import QuantRule, path_to_str

    int4_mse = dict(bits=4, channel_axes=(-1,), calibration="mse")
    ungroupable = [
        path_to_str(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if path_to_str(path).endswith("kernel") and leaf.shape[-2] % 32
    ]
    variants = {
        "int8 per-channel": [QuantRule(pattern=r".*kernel", bits=8, channel_axes=(-1,))],
        "int4 per-channel MSE": [QuantRule(pattern=r".*kernel", **int4_mse)],
        "int4 g32 MSE": [QuantRule(pattern=re.escape(p), **int4_mse) for p in ungroupable]
        + [QuantRule(pattern=r".*kernel", group_size=32, **int4_mse)],
    }
    return variants, ungroupable


def _progress(steps: int, enabled: bool):
    """tqdm over the steps if installed (and enabled), else a plain range with periodic prints."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(range(steps), desc="training", unit="step", file=sys.stdout, mininterval=1.0), True
        except ImportError:
            pass
    return range(steps), False


def _run_demo(args: argparse.Namespace) -> int:
    """Train, quantize, evaluate and print the table (``jaxcompress demo``)."""
    steps = args.steps if args.steps is not None else (200 if args.quick else 2000)
    _positive(steps, "--steps")
    _positive(args.batch_size, "--batch-size")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxcompress.data import load_image_dataset
    from jaxcompress.metrics import quantization_metrics
    from jaxcompress.params import dequantize_params, quantize_params

    start = time.perf_counter()
    data = load_image_dataset()
    train_x, train_y, test_x, test_y = data.train_images, data.train_labels, data.test_images, data.test_labels
    if data.name != "fashion-mnist":
        print("Fashion-MNIST not found (apt-get install dataset-fashion-mnist); using scikit-learn digits")
    if args.quick:
        train_x, train_y, test_x, test_y = train_x[:5000], train_y[:5000], test_x[:2000], test_y[:2000]
    print(
        f"dataset: {data.name}, {len(train_x)} train / {len(test_x)} test images "
        f"of {train_x.shape[1]}x{train_x.shape[2]}x{train_x.shape[3]}"
        + (f" (--quick subset of {len(data.train_images)} / {len(data.test_images)})" if args.quick else " (full test set)"),
        flush=True,
    )

    model = _make_cnn(data.num_classes)
    params = model.init(jax.random.key(args.seed), jnp.asarray(train_x[:1]))
    optimizer = optax.adam(args.learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = model.apply(p, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, images: jnp.argmax(model.apply(p, images), axis=-1))

    def accuracy(p) -> float:
        correct = 0
        for i in range(0, len(test_x), 1000):
            correct += int(jnp.sum(predict(p, test_x[i : i + 1000]) == test_y[i : i + 1000]))
        return correct / len(test_x)

    rng = np.random.default_rng(args.seed)
    batch_size = min(args.batch_size, len(train_x))
    order, cursor = rng.permutation(len(train_x)), 0
    steps_iter, bar = _progress(steps, not args.no_progress)
    train_start = time.perf_counter()
    for step in steps_iter:
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(len(train_x)), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        params, opt_state, loss = train_step(params, opt_state, train_x[index], train_y[index])
        if bar and step % 25 == 0:
            steps_iter.set_postfix(loss=f"{float(loss):.3f}")
        elif not bar and not args.no_progress and (step % max(1, steps // 10) == 0 or step == steps - 1):
            print(f"  step {step + 1:>5}/{steps}  loss {float(loss):.4f}", flush=True)
    if bar:
        steps_iter.close()
    jax.block_until_ready(params)
    epochs = steps * batch_size / len(train_x)
    print(f"trained {steps} steps ({epochs:.1f} epochs) in {time.perf_counter() - train_start:.1f} s", flush=True)

    rows = [{"variant": "fp32", "accuracy": accuracy(params), "bytes": None, "ratio": 1.0, "sqnr": None}]
    variants, ungroupable = _demo_rules(params)
    for name, rules in variants.items():
        qparams, _ = quantize_params(params, rules, on_unused="error")
        metrics = quantization_metrics(params, qparams)
        rows[0]["bytes"] = metrics.bytes_before
        rows.append(
            {
                "variant": name,
                "accuracy": accuracy(dequantize_params(qparams)),
                "bytes": metrics.bytes_after,
                "ratio": metrics.ratio,
                "sqnr": metrics.median_sqnr_db,
            }
        )
    print()
    print(_format_demo_table(rows))
    print(
        f"\n{data.name} test accuracy with dequantized weights ({len(test_x)} images); bytes = "
        f"stored params incl. scales, biases in float32; SQNR = median over quantized kernels."
    )
    if ungroupable:
        print(f"int4 g32: input axis not a multiple of 32, so per-channel instead: {', '.join(ungroupable)}")
    print(f"Total {time.perf_counter() - start:.0f} s.")
    return EXIT_OK


def _format_demo_table(rows: Sequence[dict]) -> str:
    """The demo's result table.

    >>> print(_format_demo_table([{"variant": "fp32", "accuracy": 0.9, "bytes": 400, "ratio": 1.0, "sqnr": None}]))
    variant                 accuracy       bytes   ratio  median SQNR dB
    --------------------------------------------------------------------
    fp32                      90.00%         400   1.00x               -
    """
    lines = [f"{'variant':<22} {'accuracy':>10} {'bytes':>11} {'ratio':>7} {'median SQNR dB':>15}", "-" * 68]
    for row in rows:
        sqnr = "-" if row["sqnr"] is None else f"{row['sqnr']:.2f}"
        lines.append(
            f"{row['variant']:<22} {row['accuracy']:>10.2%} {row['bytes']:>11,} {row['ratio']:>6.2f}x {sqnr:>15}"
        )
    return "\n".join(lines)


COMMANDS: tuple[Command, ...] = (
    Command(
        name="demo",
        help="train a small CNN on Fashion-MNIST, quantize it to int8/int4, print accuracy and size",
        description=_DEMO_DESCRIPTION,
        add_arguments=_add_demo_arguments,
        run=_run_demo,
    ),
)


# ---- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per `Command` in `COMMANDS`.

    >>> build_parser().parse_args(["demo", "--quick"]).quick
    True
    """
    from jaxcompress import __version__

    parser = argparse.ArgumentParser(
        prog="jaxcompress",
        description="Quantization and pruning for JAX. Run `jaxcompress <command> --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"jaxcompress {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sub)
        sub.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return the exit code:
    0 success, 2 usage error, 1 failure. The ``jaxcompress`` console script calls this.

    >>> main(["no-such-command"])  # argparse prints the usage error on stderr
    2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help / --version (0) and usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else (EXIT_OK if exit_.code is None else EXIT_USAGE)
    command = getattr(args, "_command", None)
    if command is None:
        parser.print_usage(sys.stderr)
        print("jaxcompress: error: a command is required (e.g. `jaxcompress demo`)", file=sys.stderr)
        return EXIT_USAGE
    try:
        return command.run(args)
    except _UsageError as err:
        print(f"jaxcompress {command.name}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"jaxcompress {command.name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a failure while running: one clear line, not a traceback
        print(f"jaxcompress {command.name}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
