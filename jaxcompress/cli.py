"""The ``jaxcompress`` command line (also ``python -m jaxcompress``).

Subcommands:
  demo    the compression pipeline on a small CNN and Fashion-MNIST: fp32, post-training int8,
          pruned to 80%, pruned + int8 QAT; accuracy, size on disk and latency of each.

  compress / inspect: compressed checkpoints on disk (`jaxcompress.checkpoint.cli`).

Exit codes (one table, by the error's TYPE: `jaxcompress._errors.EXIT_CODES`): 0 success, 1
failure while running, 2 usage or recipe error (bad subcommand, option, recipe or destination),
3 unreadable checkpoint, 130 interrupted.

A subcommand is a `Command` (`jaxcompress.checkpoint.command`): a name, one line of help, a
function that adds its options to an ``argparse`` parser and a function that runs it and returns
the exit code; add new ones to `COMMANDS`. `main` runs every command through
`jaxcompress.checkpoint.command.run_command`, the one place where an error becomes an exit code.
This module imports `jaxcompress.checkpoint.cli`, never the other way round. Importing it is
cheap: jax, flax and optax are imported when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Sequence

from jaxcompress._errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError
from jaxcompress.checkpoint.cli import COMMANDS as _CHECKPOINT_COMMANDS
from jaxcompress.checkpoint.command import Command, run_command

__all__ = ["Command", "COMMANDS", "build_parser", "parse_arguments", "main", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]


# ---- demo --------------------------------------------------------------------------------------

_DEMO_DESCRIPTION = """\
The compression pipeline on a small CNN, end to end (jaxcompress.demo.pipeline):
  1. train it in float32 on Fashion-MNIST (Debian package dataset-fashion-mnist; without it,
     scikit-learn's 8x8 digits -- the demo says which);
  2. post-training int8 (per-channel weights, dynamic per-row int8 activations);
  3. gradual magnitude pruning to 80% sparsity with jaxcompress.prune (one optax transform);
  4. W8A8 quantization-aware training of the pruned model (weights and the activations the
     integer model quantizes are fake-quantized) with jaxcompress.qat around prune
     (masks frozen, pruned weights stay exactly zero), converted with the ranges QAT used;
  5. every variant written as a compressed safetensors file; the integer forward pass as a
     jax.export artifact taking (params, images), reloaded and run on the params read back
     from the file (checked against the same program in process); the pruned + QAT model as
     model.tflite / model.onnx, measured in LiteRT / ONNX Runtime.
One table: test accuracy, size on disk, latency at batch 1 and 256 (median and interquartile
range over interleaved runs: every variant timed in the same rounds). The int8 variants run
through jaxcompress.compressed(model.apply, policy="tune"): int8 x int8 -> int32 dots and
convolutions where they make the whole program faster on this machine (timed once per input
shape, cached under ~/.cache/jaxcompress or $JAXCOMPRESS_CACHE_DIR). The
masks are unstructured, so the pruned variants are smaller on disk but not faster on CPU.
The files go to a temporary folder that is removed at the end (--out DIR or --keep keeps them).
The default run takes about 60-90 s on 2 idle CPU cores (about 140 s of CPU time; a machine
busy with other work takes proportionally longer); --quick is a CI-sized smoke run."""


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``jaxcompress demo``."""
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps on 3000 train / 1000 test images")
    parser.add_argument("--steps", type=int, default=None,
                        help="float training steps (default 1500, --quick 60); pruning and QAT get 2/3 and 1/3 of it")
    parser.add_argument("--sparsity", type=float, default=0.8, help="final kernel sparsity (default 0.8)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="keep the compressed files, the export and the runtime files in DIR (default: a "
                             "temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive(value: int, flag: str) -> None:
    if value <= 0:
        raise UsageError(f"{flag} must be a positive integer, got {value}")


def _run_demo(args: argparse.Namespace) -> int:
    """Run the pipeline and print the table (``jaxcompress demo``)."""
    steps = args.steps if args.steps is not None else (60 if args.quick else 1500)
    _positive(steps, "--steps")
    _positive(args.batch_size, "--batch-size")
    if not 0.0 <= args.sparsity < 1.0:
        raise UsageError(f"--sparsity must be in [0, 1), got {args.sparsity}")

    from jaxcompress.demo.data import load_image_dataset
    from jaxcompress.demo.pipeline import QUICK_SUBSET, PipelineConfig, format_table, run_pipeline

    data = load_image_dataset()
    if data.name != "fashion-mnist":
        print("Fashion-MNIST not found (apt-get install dataset-fashion-mnist); using scikit-learn digits")
    config = PipelineConfig(
        fp32_steps=steps,
        prune_steps=max(1, 2 * steps // 3),
        qat_steps=max(1, steps // 3),
        sparsity=args.sparsity,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        train_subset=QUICK_SUBSET["train_subset"] if args.quick else None,
        test_subset=QUICK_SUBSET["test_subset"] if args.quick else None,
        latency_repeats=QUICK_SUBSET["latency_repeats"] if args.quick else PipelineConfig.latency_repeats,
        out_dir=args.out,
        keep=args.keep,
        progress=not args.no_progress,
    )
    print(f"dataset: {data.name}, {min(len(data.train_images), config.train_subset or 10**9)} train / "
          f"{min(len(data.test_images), config.test_subset or 10**9)} test images", flush=True)
    result = run_pipeline(config, data=data)
    print()
    print(format_table(result))
    export = result["export"]
    where = (f"files: {result['out_dir']}" if result["out_dir"] is not None
             else "files: written to a temporary folder, now removed (--out DIR or --keep keeps them)")
    paragraphs = [
        f"accuracy on {result['test_images']} {result['dataset']} test images; file bytes = the compressed "
        f"safetensors file of each variant (LiteRT / ONNX rows: the .tflite / .onnx file).",
        where,
        f"jax.export of the integer forward pass jit(compressed(model.apply))(params, images): "
        f"{os.path.basename(export['path'] or 'pruned_qat_int.jaxexport')} ({export['bytes']:,} bytes); reloaded "
        f"and run on the params read back from the safetensors file: max |difference| "
        f"{export['max_abs_difference']:.1e} against the same program in process.",
        f"Total {result['seconds']:.0f} s.",
    ]
    print()
    print("\n".join(textwrap.fill(p, 100, break_long_words=False, break_on_hyphens=False) for p in paragraphs))
    return EXIT_OK


COMMANDS: tuple[Command, ...] = (
    Command(
        name="demo",
        help="train a CNN on Fashion-MNIST, then PTQ int8, prune 80%%, int8 QAT; print accuracy, size, latency",
        description=_DEMO_DESCRIPTION,
        add_arguments=_add_demo_arguments,
        run=_run_demo,
    ),
) + _CHECKPOINT_COMMANDS  # `compress` and `inspect` live with the checkpoint code


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
        sub.set_defaults(_command=command, _parser=sub)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that an unrecognized argument after a subcommand is
    reported with that subcommand's usage (``jaxcompress demo --x`` shows ``usage: jaxcompress
    demo ...``), not the top-level one. Exits (``SystemExit``) like ``parse_args``.

    >>> build_parser().parse_args(["demo", "--steps", "3"]).steps
    3
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        (getattr(args, "_parser", None) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return the exit code
    (see the module docs). The ``jaxcompress`` console script calls this.

    >>> main(["no-such-command"])  # argparse prints the usage error on stderr
    2
    """
    parser = build_parser()
    try:
        args = parse_arguments(parser, argv)
    except SystemExit as exit_:  # --help / --version (0) and usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else (EXIT_OK if exit_.code is None else EXIT_USAGE)
    command = getattr(args, "_command", None)
    if command is None:
        parser.print_usage(sys.stderr)
        print("jaxcompress: error: a command is required (e.g. `jaxcompress demo`)", file=sys.stderr)
        return EXIT_USAGE
    return run_command(command, args)


if __name__ == "__main__":
    sys.exit(main())
