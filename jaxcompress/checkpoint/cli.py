"""The ``compress`` and ``inspect`` subcommands of the ``jaxcompress`` command line.

``jaxcompress compress SRC DST --recipe R`` runs `compress_checkpoint`; ``jaxcompress inspect
CKPT [--against SRC]`` prints `inspect_checkpoint`'s per-leaf table (text, Markdown or JSON).
`COMMANDS` holds them as `jaxcompress.checkpoint.command.Command`s for the main parser
(`jaxcompress.cli`, which imports this module; this module never imports it);
`add_subcommands` adds them to any ``argparse`` sub-parsers object; `main` runs them
stand-alone (``python -m jaxcompress.checkpoint.cli``).

Exit codes (stable, for scripts; chosen by the error's type in `jaxcompress._errors`): 0
success; 1 failure (including a destination that cannot be written: disk full, read-only); 2
usage error (bad option, unknown recipe, invalid recipe file, a recipe rule that does not fit a
leaf, ``--encoding`` that does not fit a leaf, destination exists without ``--overwrite`` or its
folder is missing); 3 the input checkpoint is missing, truncated, corrupt, tampered with or not
a checkpoint; 130 interrupted (Ctrl-C; no destination is left behind). A recipe that compresses
no leaf prints ``warning: ... no leaf compressed`` and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Sequence

from jaxcompress._errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CheckpointNotFoundError,
    DestinationFolderMissingError,
    write_error,
)
from jaxcompress.checkpoint.command import Command, run_command

__all__ = ["COMMANDS", "add_subcommands", "main", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED"]

_EPILOG = """\
exit codes: 0 success, 1 failure (e.g. disk full, read-only DST; nothing written), 2 usage or
recipe error (options, recipe, a rule or --encoding that does not fit a leaf, existing DST, no
DST folder), 3 missing / truncated / corrupt / tampered / foreign checkpoint, 130 interrupted
(nothing written)"""

_COMPRESS_DESCRIPTION = """\
Compress a float checkpoint (a .safetensors file or an Orbax checkpoint directory) into one
.safetensors file, leaf by leaf (memory stays near the largest leaf), atomically (an error or
Ctrl-C leaves no DST). The recipe is a preset name (or alias) or a TOML file of [[prune]] /
[[quantize]] rules.

{presets}

example:
  jaxcompress compress model.safetensors model-w4.safetensors --recipe w4-g128
  jaxcompress inspect model-w4.safetensors --against model.safetensors"""

_INSPECT_DESCRIPTION = """\
Print one row per leaf of a checkpoint (compressed or not; .safetensors or Orbax): path, shape,
format, granularity, pruned (masked out), zeros (kept values that are zero, e.g. rounded to
zero), encoding, bytes on disk; with --against SRC also the ratio and SQNR (dB) of each leaf
against the original, and the file size ratio. --format markdown / json add dtype, bits and
the bytes before."""


def _presets_block() -> str:
    """The ``presets:`` block of ``compress --help``: every shipped preset, its aliases and its
    description (`jaxcompress.checkpoint.recipes.describe_presets`, read from the presets folder)."""
    import textwrap

    from jaxcompress.checkpoint.recipes import describe_presets

    return "presets (--recipe NAME or an alias):\n" + textwrap.indent(describe_presets(98), "  ")


def _add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="float checkpoint: .safetensors file or Orbax directory")
    parser.add_argument("dst", metavar="DST", help="compressed .safetensors file to create")
    parser.add_argument("--recipe", "-r", required=True, metavar="R", help="preset name or recipe .toml path")
    parser.add_argument("--encoding", choices=("auto", "dense", "bitmap", "n:m"), default="auto",
                        help="storage of masked leaves (default auto: the smallest exact encoding)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--on-unused", choices=("warn", "error", "ignore"), default=None,
                        help="recipe rules that match no leaf (default: ignore for presets, warn otherwise)")
    parser.add_argument("--report", choices=("text", "markdown", "json", "none"), default="text",
                        help="print the per-leaf table in this format (default text)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help=".safetensors file or Orbax directory")
    parser.add_argument("--against", metavar="SRC", help="the uncompressed source: adds SQNR, bytes before and ratio")
    parser.add_argument("--format", choices=("text", "markdown", "json"), default="text", help="output format (default text)")
    parser.add_argument("--output", "-o", metavar="FILE", help="write the table to FILE instead of stdout")
    parser.add_argument("--sort", choices=("file", "path", "bytes"), default="file", help="row order (default: as stored)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _render(table: Any, fmt: str) -> str:
    from jaxcompress.checkpoint.report import render_json, render_markdown, render_text

    return {"text": render_text, "markdown": render_markdown, "json": render_json}[fmt](table)


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _run_compress(args: argparse.Namespace) -> int:
    from jaxcompress.checkpoint.compress import compress_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        table = compress_checkpoint(
            args.src, args.dst, args.recipe, encoding=args.encoding, overwrite=args.overwrite,
            progress=_show_progress(args), on_unused=args.on_unused,
        )
    for warning in caught:  # in the CLI's own words, not Python's warning format
        if issubclass(warning.category, UserWarning):
            print(f"jaxcompress compress: warning: {warning.message}", file=sys.stderr)
    if args.report != "none":
        print(_render(table, args.report))
    else:
        print(f"wrote {args.dst}: {table.file_bytes} bytes, {table.ratio:.2f}x smaller than {args.src}")
    return EXIT_OK


def _run_inspect(args: argparse.Namespace) -> int:
    import dataclasses

    from jaxcompress.checkpoint.inspection import inspect_checkpoint

    if not os.path.exists(args.checkpoint):
        raise CheckpointNotFoundError(2, f"{args.checkpoint}: no such checkpoint")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise DestinationFolderMissingError(2, f"{args.output}: the folder {os.path.dirname(os.path.abspath(args.output))} does not exist")
    table = inspect_checkpoint(args.checkpoint, against=args.against, progress=_show_progress(args))
    if args.sort != "file":
        key = (lambda row: row.path) if args.sort == "path" else (lambda row: -row.bytes)
        table = dataclasses.replace(table, rows=tuple(sorted(table.rows, key=key)))
    text = _render(table, args.format)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as err:
            raise write_error(err, args.output) from None
    else:
        print(text)
    return EXIT_OK


_SPECS = (
    ("compress", "compress a checkpoint on disk with a recipe (quantize / prune)", _COMPRESS_DESCRIPTION, _add_compress_arguments, _run_compress),
    ("inspect", "per-leaf table of a checkpoint: format, sparsity, bytes, SQNR vs a source", _INSPECT_DESCRIPTION, _add_inspect_arguments, _run_inspect),
)


def _guarded(command: Command) -> Command:
    """``command`` whose ``run`` reports errors through `run_command` (for stand-alone use)."""
    import dataclasses

    return dataclasses.replace(command, run=lambda args: run_command(command, args))


COMMANDS: tuple[Command, ...] = tuple(
    Command(name=name, help=help_, description=description.format(presets=_presets_block()) + "\n\n" + _EPILOG,
            add_arguments=add, run=run)
    for name, help_, description, add, run in _SPECS
)


def add_subcommands(subparsers: Any) -> None:
    """Add ``compress`` and ``inspect`` to an ``argparse`` sub-parsers object; each sub-parser
    gets ``_command`` (with ``.run(args) -> exit code``) as a default.

    >>> parser = argparse.ArgumentParser(prog="jaxcompress")
    >>> add_subcommands(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["compress", "a.safetensors", "b.safetensors", "--recipe", "w8a8"])
    >>> args.recipe, args._command.name
    ('w8a8', 'compress')
    """
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(sub)
        sub.set_defaults(_command=_guarded(command), _parser=sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``compress`` / ``inspect`` stand-alone; returns the exit code (see the module docs).

    >>> main(["inspect", "/no/such/file.safetensors", "--no-progress"])
    3
    """
    parser = argparse.ArgumentParser(prog="jaxcompress", description="Compressed checkpoints.", epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subcommands(parser.add_subparsers(dest="command", metavar="<command>", title="commands"))
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported with the subcommand's usage, not the top-level one
            (getattr(args, "_parser", None) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if getattr(args, "_command", None) is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    return args._command.run(args)


if __name__ == "__main__":
    sys.exit(main())
