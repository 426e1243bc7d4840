"""One subcommand of the ``jaxcompress`` command line, and how every subcommand is run.

Both `jaxcompress.cli` (the main parser) and `jaxcompress.checkpoint.cli` (``compress`` /
``inspect``) build on this module; neither imports the other's parser, so there is no import
cycle. `run_command` is the single place where an error becomes an exit code: by its TYPE,
through the table in `jaxcompress._errors` (never by its message), with one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable

from jaxcompress._errors import EXIT_INTERRUPTED, EXIT_OK, classify

__all__ = ["Command", "run_command"]


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the
    exit code."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def run_command(command: Command, args: argparse.Namespace) -> int:
    """``command.run(args)``; an error prints ``jaxcompress NAME: <kind>: <Type>: <message>`` on
    stderr and returns its exit code (`jaxcompress._errors.EXIT_CODES`), a traceback never.

    >>> def broken(args): raise ValueError("no")
    >>> run_command(Command("demo", "", "", lambda p: None, broken), argparse.Namespace())
    1
    """
    try:
        return command.run(args)
    except KeyboardInterrupt:
        print(f"jaxcompress {command.name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `jaxcompress inspect ... | head`: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as err:  # one clear line, not a traceback
        code, kind = classify(err)
        print(f"jaxcompress {command.name}: {kind}: {type(err).__name__}: {_message(err)}", file=sys.stderr)
        return code


def _message(err: BaseException) -> str:
    """``err``'s text. An ``OSError`` made as ``(errno, text)`` says its text (and file name),
    also when another base class's ``__str__`` would print the argument tuple.

    >>> from jaxcompress._errors import CheckpointNotFoundError
    >>> _message(CheckpointNotFoundError(2, "m.safetensors: no such checkpoint"))
    'm.safetensors: no such checkpoint'
    """
    if isinstance(err, OSError):
        if err.strerror:
            return f"{err.strerror}: {err.filename!r}" if err.filename else err.strerror
        if len(err.args) == 2 and isinstance(err.args[0], int) and isinstance(err.args[1], str):
            return err.args[1]  # OSError's (errno, text) parsing is skipped when ValueError comes first
    return str(err)
