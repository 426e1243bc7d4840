"""Value checks that work eagerly and under ``jit`` (internal).

`checked(value, ok, message)` returns ``value``; it raises ``ValueError(message)`` at once when
``ok`` is concrete and false. When ``ok`` is traced (inside ``jit``, ``grad``, a ``scan``
body...) the check runs when the computation does and the error surfaces as a
``JaxRuntimeError`` carrying the same message. Every run-time value check of the library goes
through here, so how such checks cost and behave is decided in one place:

* **no effect in the program.** A check is a ``lax.cond`` on ``all(ok)`` whose false branch calls
  the host (`jax.pure_callback`, which raises there) and whose true branch returns a zero; the
  returned ``value`` is ``value + that zero``, so the check cannot be dropped as dead code. An
  effectful callback (``jax.debug.callback``, what this module used before) makes ``jit`` leave
  its C++ fast path on every call of a program that holds one (no asynchronous dispatch, the
  arguments re-checked in Python, and the callback itself run on every call): measured on a
  2-core Xeon, a jitted 16-element function took 134 us per call with one such check and 4.3 us
  with this one (3.5 us without); `prune(adamw)`'s step on a 5.3M-param MLP paid about 1.5 ms a
  step for it. (XLA:CPU still runs a program that holds any host callback synchronously on the
  calling thread: measured ~3% of that prune step.) Here the host is reached only when a check
  fails (and under ``vmap``, whose batched predicate runs both branches, once per call with the
  batch).
* ``ok`` is reduced to ONE boolean inside the program (``jnp.all``) before it reaches the host:
  on a sharded ``ok`` that is a local reduction plus a scalar all-reduce, never a gather of the
  array to the device that runs the callback. Only a ``message`` that is a function of the flags
  (`prune`'s per-leaf check, a short replicated vector) receives them whole.
* the zero is added in ``value``'s dtype (``&`` with a true for booleans): the value is
  unchanged bit for bit, except that a float ``-0.0`` becomes ``+0.0``.

Issue 21's intermittent collective deadlock of the sharded ``qat(prune(adamw))`` step was NOT
caused by these callbacks: it reproduces without any callback and outside the library (XLA:CPU
runs out of client threads when several sharded steps are in flight; see docs/scaling.md).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["checked"]


def _message(message: str | Callable[[np.ndarray], str], flags: np.ndarray) -> str:
    return message(flags) if callable(message) else message


class _Fail:
    """The host side of a traced check: raise unless every flag holds, else return zeros."""

    def __init__(self, message: str | Callable[[np.ndarray], str], dtype: Any, flag_ndim: int):
        self.message, self.dtype, self.flag_ndim = message, dtype, flag_ndim

    def __call__(self, flags: Any) -> np.ndarray:
        flags = np.asarray(flags)
        # Under vmap (a batched cond runs both branches) the flags come with leading batch axes.
        batch_axes = tuple(range(flags.ndim - self.flag_ndim))
        if not bool(np.all(flags)):
            raise ValueError(_message(self.message, np.all(flags, axis=batch_axes)))
        return np.zeros(flags.shape[: len(batch_axes)], self.dtype)


def checked(value: Any, ok: Any, message: str | Callable[[np.ndarray], str]) -> Any:
    """``value``, after checking that ``ok`` (a bool or a boolean array: all of it) holds.

    ``message`` is the error's text, or a function of the host-side flags (``ok`` as a NumPy
    bool array; only for a small, unsharded ``ok``) returning it. ``value`` is an array (or a
    Python scalar); the check is attached to it, so use the returned value in place of the one
    passed in.

    >>> checked(3, True, "never raised")
    3
    >>> checked(3, False, "params['w']: bad")
    Traceback (most recent call last):
    ...
    ValueError: params['w']: bad
    >>> import jax, jax.numpy as jnp
    >>> jax.jit(lambda x: checked(x, x > 0, "x must be positive"))(jnp.float32(2.0)).item()
    2.0
    """
    if not isinstance(ok, jax.core.Tracer):
        host_flags = np.asarray(ok)
        if not bool(np.all(host_flags)):
            raise ValueError(_message(message, host_flags))
        return value
    value = jnp.asarray(value)
    flags = ok if callable(message) else jnp.all(ok)
    fail = _Fail(message, value.dtype, jnp.ndim(flags))
    zero = lax.cond(
        jnp.all(flags),
        lambda f: jnp.zeros((), value.dtype),
        lambda f: jax.pure_callback(fail, jax.ShapeDtypeStruct((), value.dtype), f, vmap_method="expand_dims"),
        flags,
    )
    if value.dtype == jnp.bool_:
        return value & ~zero  # zero is False
    return value + zero
