"""Orbax calls that fail cleanly: one error type naming the directory, no stray threads.

Orbax raises many types for a damaged checkpoint (``json.JSONDecodeError``, ``KeyError``,
``ValueError`` or tensorstore's own errors from a truncated data file), and logs instead of
raising for some (an unparsable ``_CHECKPOINT_METADATA``). Every jaxcompress read of an Orbax
directory goes through `checkpointer`, which turns any of them into a `CheckpointFormatError`
naming the directory, and which always CLOSES the checkpointer it made.

Why a stray ``RuntimeError: Event loop is closed`` traceback followed the clean error line (1 run
in 3 on a corrupt directory): Orbax runs each restore in a FRESH asyncio loop
(``asyncio_utils.run_sync``: ``run_until_complete`` then ``close``) over many concurrent
tensorstore reads. When one read fails, the gather fails at once and the loop is closed while
the other reads are still in flight; as each finishes, tensorstore's completion callback calls
``loop.call_soon_threadsafe`` on the closed loop from its own thread, and Python reports that
through ``sys.unraisablehook``. The reads themselves are harmless (their results are dropped),
so before each Orbax read (the reports can come before the error reaches us) `translate` makes
sure ``sys.unraisablehook`` is wrapped by a filter that drops exactly that exception (a
``RuntimeError`` raised by ``asyncio``'s ``_check_closed`` inside ``call_soon_threadsafe``, with
no object) and passes everything else to the hook it wraps.

A second, rarer report of the same race (seen once in a CI run): a read that FAILED too after
the gather gave up is a task whose exception nobody retrieves, and when it is collected asyncio
logs ``Task exception was never retrieved`` with its traceback (logger ``asyncio``, level ERROR).
`translate` also adds a filter to that logger which drops exactly those records whose exception
is a tensorstore read error (a ``ValueError`` carrying a ``tensorstore_spec``); any other
asyncio record passes.

`check_metadata` validates the jaxcompress record stored in ``custom_metadata`` before anything
is rebuilt from it (records are then rebuilt through `treemeta.qarray_from_parts`, which checks
each `QArray` strictly against its arrays).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Any, Callable, Iterator

from jaxcompress._errors import CheckpointFormatError, CheckpointNotFoundError, UsageError
from jaxcompress.checkpoint import treemeta

__all__ = ["checkpointer", "translate", "read_step_metadata", "check_metadata", "require_checkpoint"]

_KINDS = ("qarray", "array", "none", "masked_node")


def require_checkpoint(path: str) -> None:
    """Raise unless ``path`` is a directory holding a finished Orbax checkpoint."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(2, f"{path}: no such Orbax checkpoint directory")
    if not os.path.isdir(path) or not any(os.path.exists(os.path.join(path, n)) for n in ("_CHECKPOINT_METADATA", "_METADATA")):
        raise CheckpointFormatError(f"{path}: not an Orbax checkpoint directory (no _CHECKPOINT_METADATA or _METADATA)")
    for name in ("_CHECKPOINT_METADATA", "_METADATA"):
        file = os.path.join(path, name)
        if os.path.isfile(file):  # Orbax only logs an unparsable file and goes on without it
            try:
                with open(file, "rb") as f:
                    json.load(f)
            except (ValueError, RecursionError, OSError) as err:
                raise CheckpointFormatError(f"{path}: {name} is not valid JSON ({type(err).__name__}); the checkpoint is corrupt") from None


def _late_read_of_a_closed_loop(unraisable: Any) -> bool:
    """The harmless report described in the module docs (by type and raising frame)."""
    if type(unraisable.exc_value) is not RuntimeError or unraisable.object is not None:
        return False
    tb, frames = unraisable.exc_traceback, []
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return bool(frames) and frames[-1].co_name == "_check_closed" and frames[-1].co_filename.endswith(os.path.join("asyncio", "base_events.py")) and any(
        code.co_name == "call_soon_threadsafe" for code in frames
    )


_UNRETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


class _UnretrievedReadFilter(logging.Filter):
    """Drops asyncio's report of an unretrieved tensorstore read error (see the module docs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(_UNRETRIEVED) or not record.exc_info:
            return True
        exc = record.exc_info[1]
        return not (type(exc) is ValueError and "tensorstore_spec=" in str(exc))


def _install_hook() -> None:
    """Wrap the current ``sys.unraisablehook`` with the filter (unless it already is), and add
    the asyncio log filter (once)."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReadFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReadFilter())
    previous = sys.unraisablehook
    if getattr(previous, "_jaxcompress_closed_loop_filter", False):
        return

    def hook(unraisable: Any) -> None:
        if not _late_read_of_a_closed_loop(unraisable):
            previous(unraisable)

    setattr(hook, "_jaxcompress_closed_loop_filter", True)  # a marker attribute on the function
    sys.unraisablehook = hook


@contextlib.contextmanager
def translate(path: str) -> Iterator[None]:
    """Re-raise any error but ours, a usage error or an interrupt as a `CheckpointFormatError`
    naming ``path`` (Orbax / tensorstore raise many types for a damaged directory)."""
    _install_hook()  # before the read: a failed read's stray reports can come before its error
    try:
        yield
    except (CheckpointFormatError, UsageError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:
        detail = str(err).splitlines()[0][:300] if str(err) else ""
        raise CheckpointFormatError(f"{path}: cannot read the Orbax checkpoint (corrupt or truncated?): {type(err).__name__}: {detail}") from None


@contextlib.contextmanager
def checkpointer(factory: Callable[[], Any], path: str) -> Iterator[Any]:
    """``factory()`` (an Orbax checkpointer) for one read of ``path``, errors as in `translate`,
    always closed afterwards (no background thread outlives the call)."""
    made = factory()
    try:
        with translate(path):
            yield made
    finally:
        with contextlib.suppress(Exception):
            made.close()


def read_step_metadata(path: str) -> Any:
    """The ``StepMetadata`` of the checkpoint at ``path`` (validated as in `require_checkpoint`)."""
    import orbax.checkpoint as ocp

    require_checkpoint(path)
    with checkpointer(ocp.StandardCheckpointer, path) as reader:
        return reader.metadata(path)


def _check_records(records: Any, where: str, masks: bool) -> None:
    if not isinstance(records, list):
        raise CheckpointFormatError(f"{where}: expected a list of leaf records, got {type(records).__name__}")
    for i, record in enumerate(records):
        at = f"{where}[{i}]"
        if not isinstance(record, dict):
            raise CheckpointFormatError(f"{at}: expected an object, got {type(record).__name__}")
        path = record.get("path")
        if not isinstance(path, list) or not path or not all(
            isinstance(t, list) and len(t) == 2 and t[0] in ("key", "idx", "attr") and isinstance(t[1], (str, int)) and not isinstance(t[1], bool)
            for t in path
        ):
            raise CheckpointFormatError(f"{at}: 'path' must be a non-empty list of [kind, key] tokens, got {path!r}"[:300])
        at = f"{at} (leaf {treemeta.path_name(path)!r})"
        kind = record.get("kind")
        allowed = ("array", "masked_node") if masks else _KINDS
        if kind not in allowed:
            raise CheckpointFormatError(f"{at}: kind {kind!r} is not one of {allowed}")
        if kind == "qarray":
            info = record.get("qarray")
            if not isinstance(info, dict) or not isinstance(info.get("static"), dict) or not isinstance(info.get("arrays"), list):
                raise CheckpointFormatError(f"{at}: a qarray record needs 'static' (an object) and 'arrays' (a list)")
            if not all(isinstance(a, str) for a in info["arrays"]) or not {"values", "scale"} <= set(info["arrays"]):
                raise CheckpointFormatError(f"{at}: qarray 'arrays' {info['arrays']!r} must name 'values' and 'scale'"[:300])


def check_metadata(meta: Any, path: str) -> dict | None:
    """The jaxcompress record of a checkpoint, validated (``None`` for a plain Orbax one)."""
    if meta is None:
        return None
    where = f"{path}: custom_metadata['jaxcompress']"
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{where}: expected an object, got {type(meta).__name__}")
    if meta.get("format_version") != treemeta.FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{where}: jaxcompress checkpoint format {meta.get('format_version')!r}, this version reads "
            f"format {treemeta.FORMAT_VERSION}"
        )
    _check_records(meta.get("params"), f"{where}.params", masks=False)
    if meta.get("masks") is not None:
        _check_records(meta["masks"], f"{where}.masks", masks=True)
    return meta
