"""Value checks that work eagerly and under ``jit`` (internal).

`runtime_check(ok, message)` raises ``ValueError(message)`` at once when ``ok`` is concrete and
false; when ``ok`` is traced (inside ``jit``, ``grad``, a ``scan`` body...) the check runs when
the computation does, through a host callback, and the error surfaces as a ``JaxRuntimeError``
carrying the same message. Every run-time value check of the library goes through here, so how
such checks behave inside sharded (SPMD) programs is decided in one place:

* ``ok`` is reduced to ONE boolean inside the program (``jnp.all``) before it reaches the host:
  on a sharded ``ok`` that is a local reduction plus a scalar all-reduce, never a gather of the
  array to the device that runs the callback;
* the callback is ``jax.debug.callback`` (unordered: no token threaded through the step, so it
  adds no ordering constraint between steps); in an SPMD program XLA runs it on one device,
  inside a conditional on the partition id, with the replicated scalar.

Issue 21's intermittent collective deadlock of the sharded ``qat(prune(adamw))`` step was NOT
caused by these callbacks: it reproduces without any callback and outside the library (XLA:CPU
runs out of client threads when several sharded steps are in flight; see docs/scaling.md).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["runtime_check"]


def _raise_unless(message: str, ok: Any) -> None:
    if not bool(np.all(np.asarray(ok))):
        raise ValueError(message)


def runtime_check(ok: Any, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` (a bool or a boolean array: all of it) holds.

    >>> runtime_check(True, "never raised")
    >>> runtime_check(False, "params['w']: bad")
    Traceback (most recent call last):
    ...
    ValueError: params['w']: bad
    """
    if isinstance(ok, jax.core.Tracer):
        jax.debug.callback(functools.partial(_raise_unless, message), jnp.all(ok))
        return
    _raise_unless(message, ok)
