"""Value checks that work eagerly and under ``jit`` (internal).

`runtime_check(ok, message)` raises ``ValueError(message)`` at once when ``ok`` is concrete and
false; when ``ok`` is traced (inside ``jit``, ``grad``, a ``scan`` body...) the check runs when
the computation does, through a host callback, and the error surfaces as a ``JaxRuntimeError``
carrying the same message. Every run-time value check of the library goes through here, so how
such checks behave inside sharded (SPMD) programs is decided in one place.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

__all__ = ["runtime_check"]


def _raise_unless(message: str, ok: Any) -> None:
    if not bool(np.all(np.asarray(ok))):
        raise ValueError(message)


def runtime_check(ok: Any, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` (a bool or a boolean scalar array) holds.

    >>> runtime_check(True, "never raised")
    >>> runtime_check(False, "params['w']: bad")
    Traceback (most recent call last):
    ...
    ValueError: params['w']: bad
    """
    if isinstance(ok, jax.core.Tracer):
        jax.debug.callback(functools.partial(_raise_unless, message), ok)
        return
    _raise_unless(message, ok)
