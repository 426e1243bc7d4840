"""The library's error types, and the one table that maps them to command-line exit codes.

Every error is classified by its TYPE, never by its message. Each class also derives from the
builtin a caller would already catch (`ValueError`, `FileNotFoundError`, `OSError`), so
``except ValueError`` keeps working:

=============================  ======================================  ===========================
class                          raised for                              ``jaxcompress`` exit code
=============================  ======================================  ===========================
`UsageError`, `ArgumentError`  a bad option, argument or destination   2
`RecipeError`                  a recipe that cannot be read, or whose  2
                               rules do not fit a leaf
`InvalidQArrayError`           a `QArray` whose parts contradict its   1 (3 when read from a file:
                               metadata                                then `CheckpointFormatError`)
`RuleMismatchError`            a rule that does not fit its leaf       1 (2 in ``compress``: then
                                                                       `RecipeError`)
`CheckpointFormatError`        a missing, truncated, tampered, corrupt 3
                               or foreign checkpoint
`CheckpointWriteError`         the destination cannot be written       1
                               (disk full, read-only)
anything else                  a failure while running                 1
`KeyboardInterrupt`            Ctrl-C                                  130
=============================  ======================================  ===========================

>>> exit_code(RecipeError("r.toml: quantize[0]: bits 99"))
2
>>> exit_code(CheckpointNotFoundError(2, "m.safetensors: no such checkpoint"))
3
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "UsageError",
    "ArgumentError",
    "RecipeError",
    "DestinationError",
    "DestinationExistsError",
    "DestinationIsDirectoryError",
    "DestinationFolderMissingError",
    "InvalidQArrayError",
    "RuleMismatchError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_CODES",
    "exit_code",
    "write_error",
]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """A bad option, argument or destination: the caller asked for something impossible."""


class ArgumentError(UsageError, ValueError):
    """An option value that does not fit the input, e.g. ``encoding="n:m"`` for a leaf whose
    mask is not N:M."""


class RecipeError(UsageError, ValueError):
    """A recipe that cannot be read, that does not map to valid rules, or whose rules do not
    fit a leaf of the checkpoint (e.g. a group size that does not divide the leaf's axis)."""


class DestinationError(UsageError):
    """The destination of a write is unusable as given (exists, is a folder, has no folder)."""


class DestinationExistsError(DestinationError, FileExistsError):
    """The destination file exists and overwriting was not asked for."""


class DestinationIsDirectoryError(DestinationError, IsADirectoryError):
    """The destination is a folder where a file was expected."""


class DestinationFolderMissingError(DestinationError, FileNotFoundError):
    """The folder the destination file would go into does not exist."""


class InvalidQArrayError(ValueError):
    """A `QArray` whose arrays contradict its static metadata (bits vs storage dtype, scale
    shape vs channel / group axes, ...)."""


class RuleMismatchError(ValueError):
    """A rule (or spec) that does not fit the leaf it matched: an axis out of range, a group
    size that does not divide the axis, an empty array. `compress_checkpoint` reports it as a
    `RecipeError`."""


class CheckpointFormatError(ValueError):
    """A checkpoint that is truncated, corrupt, tampered with or not a checkpoint at all."""


class CheckpointNotFoundError(CheckpointFormatError, FileNotFoundError):
    """The checkpoint to read does not exist."""


class CheckpointWriteError(OSError):
    """The destination could not be written (disk full, read-only folder, ...); ``errno`` is
    the operating system's, and nothing was left behind."""


# The exit-code table: the first class an error is an instance of decides (order matters:
# specific before general).
EXIT_CODES: tuple[tuple[type[BaseException], int, str], ...] = (
    (KeyboardInterrupt, EXIT_INTERRUPTED, "interrupted"),
    (UsageError, EXIT_USAGE, "error"),
    (CheckpointFormatError, EXIT_BAD_INPUT, "bad input"),
    (CheckpointWriteError, EXIT_FAILURE, "failed"),
    (BaseException, EXIT_FAILURE, "failed"),
)


def exit_code(err: BaseException) -> int:
    """The exit code of the command line for ``err`` (see the module docs)."""
    return classify(err)[0]


def classify(err: BaseException) -> tuple[int, str]:
    """``(exit code, label)`` for ``err`` from `EXIT_CODES`."""
    for kind, code, label in EXIT_CODES:
        if isinstance(err, kind):
            return code, label
    return EXIT_FAILURE, "failed"  # pragma: no cover (BaseException matches everything)


def write_error(err: OSError, destination: str) -> CheckpointWriteError:
    """A `CheckpointWriteError` naming ``destination`` for an OS error met while writing it.

    >>> import errno
    >>> str(write_error(OSError(errno.ENOSPC, "No space left on device"), "/data/m.safetensors"))
    '[Errno 28] /data/m.safetensors: cannot write: no space left on device (nothing was written)'
    """
    reasons = {
        _errno.ENOSPC: "no space left on device",
        _errno.EDQUOT: "disk quota exceeded",
        _errno.EROFS: "read-only file system",
        _errno.EACCES: "permission denied",
        _errno.EPERM: "operation not permitted",
    }
    reason = reasons.get(err.errno, err.strerror or str(err)) if err.errno is not None else str(err)
    out = CheckpointWriteError(err.errno, f"{destination}: cannot write: {reason} (nothing was written)")
    return out
