"""Sparsity schedules: plain ``step -> sparsity`` callables (jit-able; optax schedules work too).

A schedule returns the target fraction of ZEROS for the step. `prune` evaluates it inside the
jitted update at each mask-update step, so ``step`` is a traced int32 there.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import jax
import jax.numpy as jnp

__all__ = ["Schedule", "constant", "one_shot", "polynomial", "cosine_drop_fraction", "check_sparsity"]

Schedule = Callable[[jax.Array], jax.Array]
SparsityLike = Union[float, Schedule]


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """Raise a ValueError unless ``0 <= value < 1`` (a fully pruned leaf is never what you want).

    >>> check_sparsity(0.5)
    0.5
    >>> check_sparsity(1.0)
    Traceback (most recent call last):
    ...
    ValueError: sparsity must be in [0, 1), got 1.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {value}")
    return float(value)


def constant(sparsity: float) -> Schedule:
    """The same sparsity at every step.

    >>> float(constant(0.8)(1234))
    0.8...
    """
    sparsity = check_sparsity(sparsity)
    return lambda step: jnp.full((), sparsity, jnp.float32)


def one_shot(sparsity: float, step: int) -> Schedule:
    """No pruning before ``step``; ``sparsity`` from ``step`` on.

    >>> s = one_shot(0.9, step=100)
    >>> float(s(99)), round(float(s(100)), 4)
    (0.0, 0.9)
    """
    sparsity = check_sparsity(sparsity)
    at = int(step)
    return lambda t: jnp.where(jnp.asarray(t) >= at, sparsity, 0.0).astype(jnp.float32)


def polynomial(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    initial_sparsity: float = 0.0,
    power: float = 3.0,
    frequency: int = 1,
) -> Schedule:
    """Gradual pruning of Zhu & Gupta (2017), "To prune, or not to prune".

    ``s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power`` for ``t0 <= t <= t1``,
    ``s_i`` before ``t0`` and ``s_f`` after ``t1``. The sparsity only changes every ``frequency``
    steps (``t`` is rounded down to ``t0 + k * frequency``); use the same value as `prune`'s
    ``update_every``.

    >>> s = polynomial(0.9, begin_step=0, end_step=1000, frequency=100)
    >>> [round(float(s(t)), 4) for t in (0, 150, 1000, 5000)]
    [0.0, 0.2439, 0.9, 0.9]
    """
    final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
    initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
    if end_step <= begin_step:
        raise ValueError(f"end_step ({end_step}) must be after begin_step ({begin_step})")
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}")
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    span = float(end_step - begin_step)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        since = jnp.clip(step - begin_step, 0, end_step - begin_step)
        since = (since // frequency) * frequency
        progress = jnp.where(step >= end_step, 1.0, since.astype(jnp.float32) / span)
        value = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power
        return value.astype(jnp.float32)

    return schedule


def cosine_drop_fraction(initial_fraction: float, end_step: int) -> Schedule:
    """The drop fraction of RigL (Evci et al. 2020): ``f0 / 2 * (1 + cos(pi * t / T))``, 0 after T.

    >>> f = cosine_drop_fraction(0.3, end_step=100)
    >>> [round(float(f(t)), 3) for t in (0, 50, 100, 200)]
    [0.3, 0.15, 0.0, 0.0]
    """
    if not 0.0 <= initial_fraction <= 1.0:
        raise ValueError(f"drop fraction must be in [0, 1], got {initial_fraction}")
    if end_step < 1:
        raise ValueError(f"end_step must be >= 1, got {end_step}")

    def schedule(step):
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / end_step, 0.0, 1.0)
        return (initial_fraction * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))).astype(jnp.float32)

    return schedule
