"""Dynamic sparse training: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

Every mask update, each pruned leaf drops the ``k = floor(f(t) * active)`` active weights of
smallest magnitude and regrows ``k`` inactive ones: at random (SET) or those with the largest
dense-gradient magnitude (RigL). The number of active weights per leaf never changes. ``f(t)``
is the drop fraction, cosine-decayed from ``drop_fraction`` to 0 at ``end_step``
(`schedules.cosine_drop_fraction`) unless a schedule is given. Regrown weights start at exactly
zero (they were pruned) and `prune` resets the inner optimizer's moments there.

Pass an instance as ``prune(inner, rules, dst=RigL(end_step=...))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax
import jax.numpy as jnp

from jaxcompress.pruning.schedules import Schedule, cosine_drop_fraction
from jaxcompress.pruning.scores import magnitude
from jaxcompress.pruning.topk import LazyScore, _as_lazy, count_true, select_top_k

__all__ = ["SET", "RigL", "drop_and_grow", "drop_and_grow_many"]


def drop_and_grow(mask: jax.Array, weights: jax.Array, grow_scores: jax.Array, fraction: Any) -> jax.Array:
    """Drop the ``floor(fraction * active)`` smallest-magnitude active weights of ``mask`` and
    grow as many inactive positions with the largest ``grow_scores`` (just-dropped positions may
    come back, as in RigL). The active count is unchanged.

    >>> import jax.numpy as jnp
    >>> mask = jnp.array([True, True, False, False])
    >>> w = jnp.array([0.1, 2.0, 0.0, 0.0])
    >>> drop_and_grow(mask, w, grow_scores=jnp.array([0.0, 0.0, 5.0, 1.0]), fraction=0.5).tolist()
    [False, True, True, False]
    """
    return drop_and_grow_many([mask], [weights], [grow_scores], fraction)[0]


def drop_and_grow_many(masks, weights, grow_scores, fraction: Any) -> list[jax.Array]:
    """`drop_and_grow` for many leaves at once (two batched top-k passes in all); each grow
    score is an array or a `LazyScore`."""
    masks = [m.astype(bool) for m in masks]
    fraction = jnp.asarray(fraction, jnp.float32)
    active = [count_true(m) for m in masks]
    drops = [jnp.floor(fraction * a.astype(jnp.float32)).astype(jnp.int32) for a in active]
    # Lazy scores: recomputed (fused) inside the counting passes, never materialised.
    kept = select_top_k(
        [[LazyScore(_active_magnitude, (m, w))] for m, w in zip(masks, weights)],
        [a - k for a, k in zip(active, drops)],
    )
    survivors = [group[0] for group in kept]
    grown = select_top_k([[_inactive(s, _as_lazy(g))] for s, g in zip(survivors, grow_scores)], drops)
    return [s | group[0] for s, group in zip(survivors, grown)]


def _active_magnitude(mask, weights):
    return jnp.where(mask, magnitude(weights), -jnp.inf)


def _inactive(mask: jax.Array, scores: LazyScore) -> LazyScore:
    """``scores`` where ``mask`` is False, -inf where it is True (still computed on demand)."""
    return LazyScore(
        lambda mask, *operands: jnp.where(mask, -jnp.inf, jnp.asarray(scores.fn(*operands), jnp.float32)),
        (mask, *scores.operands),
    )


def _abs_f32(x):
    return jnp.abs(jnp.asarray(x, jnp.float32))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _DynamicSparsity:
    end_step: int
    drop_fraction: Union[float, Schedule] = 0.3

    def __post_init__(self):
        if not isinstance(self.end_step, int) or self.end_step < 1:
            raise ValueError(f"{type(self).__name__}: end_step must be a positive int, got {self.end_step!r}")
        if not callable(self.drop_fraction) and not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"{type(self).__name__}: drop_fraction must be in [0, 1], got {self.drop_fraction}")

    def fraction(self, step: Any) -> jax.Array:
        """The drop fraction at ``step`` (0 from ``end_step`` on)."""
        if callable(self.drop_fraction):
            value = jnp.asarray(self.drop_fraction(step), jnp.float32)
        else:
            value = cosine_drop_fraction(self.drop_fraction, self.end_step)(step)
        return jnp.where(jnp.asarray(step) < self.end_step, value, 0.0)

    def grow_scores(self, weights: jax.Array, grads: jax.Array, key: jax.Array) -> jax.Array | LazyScore:
        """The scores that choose which inactive weights regrow (an array or a `LazyScore`)."""
        raise NotImplementedError

    def update(self, mask: jax.Array, weights: jax.Array, grads: jax.Array, key: jax.Array, step: Any) -> jax.Array:
        """The new mask of one leaf at ``step``."""
        return self.update_many([mask], [weights], [grads], [key], step)[0]

    def update_many(self, masks, weights, grads, keys, step: Any) -> list[jax.Array]:
        """The new masks of many leaves at ``step`` (batched top-k)."""
        scores = [self.grow_scores(w, g, k) for w, g, k in zip(weights, grads, keys)]
        return drop_and_grow_many(masks, weights, scores, self.fraction(step))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SET(_DynamicSparsity):
    """Sparse Evolutionary Training: drop by magnitude, regrow at random.

    >>> import jax, jax.numpy as jnp
    >>> mask = jnp.array([True] * 4 + [False] * 4)
    >>> new = SET(end_step=100, drop_fraction=0.5).update(mask, jnp.arange(8.0), None, jax.random.PRNGKey(0), 0)
    >>> int(new.sum()), bool(new[2] & new[3])
    (4, True)
    """

    def grow_scores(self, weights, grads, key):
        return jax.random.uniform(key, jnp.shape(weights), jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RigL(_DynamicSparsity):
    """Rigging the Lottery: drop by magnitude, regrow where the dense gradient is largest.

    >>> import jax, jax.numpy as jnp
    >>> mask = jnp.array([True, True, False, False])
    >>> grads = jnp.array([0.0, 0.0, 0.1, 9.0])
    >>> RigL(end_step=10, drop_fraction=0.5).update(mask, jnp.array([1.0, 2.0, 0, 0]), grads, None, 0).tolist()
    [False, True, False, True]
    """

    def grow_scores(self, weights, grads, key):
        # computed on demand inside the counting passes: no param-sized copy of |grads|
        return LazyScore(_abs_f32, (grads,))
