"""Shared helpers of the adversarial suite: a case passes only with a CLEAR error.

`expect_clear(call, types, *needles)` runs ``call`` and fails with a tag that the closing count
reads from the failure lines:

* ``SILENT``: no error at all (a wrong result or state went unnoticed);
* ``VAGUE``: an error of another type, or a message that lacks one of ``needles`` (the leaf,
  file or argument, and what was expected);
* ``LEFT``: the right error, but files were left behind in ``folder``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest


def listing(folder: Any) -> list[str]:
    """Every file under ``folder`` (relative paths, sorted), hidden ones included."""
    folder = os.fspath(folder)
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


def expect_clear(call: Callable[[], Any], types: Any, *needles: str, folder: Any = None) -> BaseException:
    """Assert ``call()`` raises one of ``types`` whose message names every one of ``needles``
    (case-insensitive), and that ``folder`` (if given) holds the same files afterwards."""
    before = listing(folder) if folder is not None else None
    try:
        result = call()
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - classifying is the point
        if not isinstance(err, types):
            pytest.fail(f"VAGUE: expected {types}, got {type(err).__name__}: {str(err)[:400]}")
        message = str(err).lower()
        missing = [n for n in needles if n.lower() not in message]
        if missing:
            pytest.fail(f"VAGUE: {type(err).__name__} does not name {missing}: {str(err)[:400]}")
        if before is not None and listing(folder) != before:
            pytest.fail(f"LEFT: {sorted(set(listing(folder)) - set(before))} left behind after {type(err).__name__}")
        return err
    pytest.fail(f"SILENT: no error; got {type(result).__name__}: {str(result)[:200]}")


def expect_ok(call: Callable[[], Any], check: Callable[[Any], bool] | None = None) -> Any:
    """A valid (if unusual) input: must work, and ``check(result)`` must hold."""
    try:
        result = call()
    except BaseException as err:  # noqa: BLE001
        pytest.fail(f"VAGUE: a valid input raised {type(err).__name__}: {str(err)[:400]}")
    if check is not None and not check(result):
        pytest.fail(f"SILENT: valid input gave a wrong result: {str(result)[:300]}")
    return result


# The error type of a bad checkpoint. (The baseline count before the fixes used ValueError,
# which CheckpointFormatError derives from.)
try:
    from jaxcompress._errors import CheckpointFormatError as FORMAT_ERROR
except ImportError:  # pragma: no cover
    FORMAT_ERROR = ValueError

