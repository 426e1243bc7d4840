"""Importance scores: one array in, one float32 array out (bigger = more worth keeping).

Element scores have the weight's shape: `magnitude` ``|w|``, `saliency` ``|w * g|`` (SNIP, Lee et
al. 2019) and `random_scores`. Structured pruning ranks groups of weights instead:
`unit_norms` reduces element scores over all axes but one (a filter = one output channel, Li et
al. 2017, "Pruning Filters for Efficient ConvNets"; a channel = one input channel) and
`block_norms` over ``b x b`` tiles of the last two axes. `normalize` rescales a leaf's scores so
one global threshold can be shared by layers of different scale.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["magnitude", "saliency", "random_scores", "unit_norms", "block_norms", "normalize", "NORMS"]

NORMS = ("l1", "l2")
NORMALIZATIONS = ("l1", "l2", "max", "mean")


def magnitude(weights: jax.Array) -> jax.Array:
    """``|w|`` as float32.

    >>> magnitude(jnp.array([-2.0, 1.0])).tolist()
    [2.0, 1.0]
    """
    return jnp.abs(jnp.asarray(weights)).astype(jnp.float32)


def saliency(weights: jax.Array, grads: jax.Array) -> jax.Array:
    """SNIP connection sensitivity ``|w * dL/dw|`` as float32.

    >>> saliency(jnp.array([2.0, -3.0]), jnp.array([0.5, 0.1])).tolist()
    [1.0, 0.30000001192092896]
    """
    weights, grads = jnp.asarray(weights), jnp.asarray(grads)
    if weights.shape != grads.shape:
        raise ValueError(f"grads of shape {grads.shape} do not match weights of shape {weights.shape}")
    return jnp.abs(weights.astype(jnp.float32) * grads.astype(jnp.float32))


def random_scores(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Uniform random scores in [0, 1): pruning by them is random pruning.

    >>> random_scores(jax.random.PRNGKey(0), (2, 3)).shape
    (2, 3)
    """
    return jax.random.uniform(key, tuple(shape), jnp.float32)


def _norm(x: jax.Array, axes: tuple[int, ...], norm: str) -> jax.Array:
    if norm == "l1":
        return jnp.sum(jnp.abs(x), axis=axes)
    if norm == "l2":
        return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes))
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def unit_norms(scores: jax.Array, axis: int, norm: str = "l1") -> jax.Array:
    """One score per slice along ``axis``: the L1/L2 norm over all other axes.

    For a Flax conv kernel (H, W, I, O), ``axis=-1`` scores filters (output channels) and
    ``axis=-2`` input channels; for a Dense kernel (in, out) ``axis=-1`` scores output units.

    >>> unit_norms(jnp.array([[1.0, -2.0], [3.0, 0.0]]), axis=-1).tolist()
    [4.0, 2.0]
    """
    scores = jnp.asarray(scores, jnp.float32)
    axis = axis % scores.ndim
    return _norm(scores, tuple(a for a in range(scores.ndim) if a != axis), norm)


def block_norms(scores: jax.Array, block_size: tuple[int, int], norm: str = "l1") -> jax.Array:
    """Norms of the ``(br, bc)`` tiles of the last two axes: shape ``(..., R // br, C // bc)``.

    >>> block_norms(jnp.arange(16.0).reshape(4, 4), (2, 2)).tolist()
    [[10.0, 18.0], [42.0, 50.0]]
    """
    scores = jnp.asarray(scores, jnp.float32)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    # A strided window sum rather than a reshape into tiles: with explicit mesh axes jax cannot
    # infer the sharding of a reshape that splits a sharded axis, while a window sum keeps it.
    window = (1,) * (scores.ndim - 2) + tuple(block_size)
    values = jnp.abs(scores) if norm == "l1" else jnp.square(scores)
    sums = jax.lax.reduce_window(values, 0.0, jax.lax.add, window, window, "VALID")
    return sums if norm == "l1" else jnp.sqrt(sums)


def normalize(scores: jax.Array, how: str | None) -> jax.Array:
    """Divide a leaf's scores by their ``"l1"``/``"l2"`` norm, ``"max"`` or ``"mean"`` (or not:
    ``None``), so layers of different scale compete fairly under one global threshold.

    >>> normalize(jnp.array([1.0, 3.0]), "max").tolist()
    [0.3333333432674408, 1.0]
    """
    if how is None:
        return scores
    return scores * (1.0 / normalize_scale(scores, how))


def normalize_scale(scores: jax.Array, how: str) -> jax.Array:
    """The positive scalar `normalize` divides by (1 where the scores are all zero).

    >>> float(normalize_scale(jnp.array([3.0, 4.0]), "l2"))
    5.0
    """
    if how == "l1":
        denominator = jnp.sum(jnp.abs(scores))
    elif how == "l2":
        denominator = jnp.sqrt(jnp.sum(jnp.square(scores)))
    elif how == "max":
        denominator = jnp.max(jnp.abs(scores))
    elif how == "mean":
        denominator = jnp.mean(jnp.abs(scores))
    else:
        raise ValueError(f"normalize must be None or one of {NORMALIZATIONS}, got {how!r}")
    return jnp.where(denominator > 0, denominator, 1.0)
