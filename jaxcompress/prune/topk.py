"""Exact top-k masks without sorting: a threshold found by bisection with global counts.

Sorting a sharded array gathers it onto one device. Counting does not: ``jnp.sum(scores >= t)``
on a sharded array is a local count per shard plus one all-reduce of a scalar. So the k-th
largest score is found by bisection over the 32-bit keys of the scores (32 counting passes, each
halving the range of candidate thresholds), which lands on the exact k-th largest value.

Ties at the threshold are broken by flat index (the lowest indices are kept), found by a second
bisection over the index (again only counts). The result keeps EXACTLY ``k`` elements, whatever
the ties (e.g. many weights that are already exactly zero). The second bisection runs only when
there are more ties than places left (`lax.cond`), which is rare for float weights.

Scores are compared as float32 (bf16/f16/f64 scores are cast); NaN scores rank lowest; XLA on
CPU flushes float32 denormals to zero, so they tie with 0.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["top_k_mask", "top_k_masks", "global_top_k_masks", "sortable_keys"]

_KEY_BITS = 32


def sortable_keys(scores: jax.Array) -> jax.Array:
    """uint32 keys whose unsigned order is the float order of ``scores`` (NaN lowest).

    >>> import jax.numpy as jnp
    >>> keys = sortable_keys(jnp.array([-2.0, -0.0, 0.0, 1.5, jnp.inf]))
    >>> bool(jnp.all(keys[:-1] <= keys[1:]))
    True
    """
    x = jnp.asarray(scores).astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), -jnp.inf, x) + 0.0  # + 0.0 turns -0.0 into +0.0
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    # Negative floats: flip all bits (larger magnitude -> smaller key); positive: set the sign bit.
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _count(pred: jax.Array) -> jax.Array:
    return jnp.sum(pred, dtype=jnp.int32)


def _kth_largest_keys(groups: Sequence[Sequence[jax.Array]], ks: jax.Array) -> jax.Array:
    """Per group g, the largest key T with count(keys >= T) >= ks[g], i.e. the k-th largest key
    (0xFFFFFFFF when k == 0: the caller keeps nothing then). All groups share one loop."""

    def body(_, bounds):
        lo, hi = bounds
        span = hi - lo
        mid = lo + (span >> 1) + (span & 1)  # upper middle, no uint32 overflow
        counts = jnp.stack([sum(_count(key >= mid[g]) for key in keys) for g, keys in enumerate(groups)])
        enough = counts >= ks
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    n = len(groups)
    start = (jnp.zeros(n, jnp.uint32), jnp.full(n, 0xFFFFFFFF, jnp.uint32))
    lo, _ = lax.fori_loop(0, _KEY_BITS, body, start)
    return lo


def _flat_index(shape: tuple[int, ...], offset: int) -> jax.Array:
    index = jnp.zeros(shape, jnp.int32) + jnp.int32(offset)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.int32, shape, axis) * jnp.int32(stride)
        stride *= shape[axis]
    return index


def _select(groups: Sequence[Sequence[jax.Array]], ks: Sequence[jax.Array]) -> list[list[jax.Array]]:
    """For every group of key arrays, masks keeping exactly its k largest keys (ties to the
    lowest index, earlier arrays first). One bisection loop serves all groups."""
    sizes = [[int(key.size) for key in keys] for keys in groups]
    totals = [sum(s) for s in sizes]
    if max(totals) >= 2**31 - 1:
        raise ValueError(f"top-k over {max(totals)} elements: more than 2**31 - 2 elements is not supported")
    ks = jnp.stack([jnp.clip(jnp.asarray(k, jnp.int32), 0, t) for k, t in zip(ks, totals)])
    thresholds = _kth_largest_keys(groups, ks)
    above = [[key > thresholds[g] for key in keys] for g, keys in enumerate(groups)]
    ties = [[(key == thresholds[g]) & (ks[g] > 0) for key in keys] for g, keys in enumerate(groups)]
    wanted = ks - jnp.stack([sum(_count(a) for a in group) for group in above])  # 0 <= wanted <= #ties
    n_ties = jnp.stack([sum(_count(t) for t in group) for group in ties])

    def all_ties(_):
        return [[a | t for a, t in zip(ga, gt)] for ga, gt in zip(above, ties)]

    def first_ties(_):
        indices = [
            [_flat_index(key.shape, sum(size[:i])) for i, key in enumerate(keys)] for keys, size in zip(groups, sizes)
        ]

        # Per group, the smallest J with count(ties & index < J) >= wanted: bisection on [0, total].
        def body(_, bounds):
            lo, hi = bounds
            mid = lo + (hi - lo) // 2
            counts = jnp.stack(
                [sum(_count(t & (i < mid[g])) for t, i in zip(ties[g], indices[g])) for g in range(len(groups))]
            )
            enough = counts >= wanted
            return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

        steps = max(1, max(totals).bit_length() + 1)
        start = (jnp.zeros(len(groups), jnp.int32), jnp.asarray(totals, jnp.int32))
        cut, _ = lax.fori_loop(0, steps, body, start)
        return [
            [a | (t & (i < cut[g])) for a, t, i in zip(above[g], ties[g], indices[g])] for g in range(len(groups))
        ]

    return lax.cond(jnp.all(n_ties == wanted), all_ties, first_ties, None)


def top_k_masks(requests: Sequence[tuple[Sequence[jax.Array], jax.Array | int]]) -> list[list[jax.Array]]:
    """Many independent selections in one pass: for each ``(score_arrays, k)`` request, masks
    keeping exactly the ``k`` largest scores over its arrays together (ties: earlier array, then
    lower flat index). Batching shares one bisection loop, which compiles and runs faster than
    one loop per request.

    >>> import jax.numpy as jnp
    >>> out = top_k_masks([([jnp.array([1.0, 2.0])], 1), ([jnp.array([3.0]), jnp.array([5.0, 4.0])], 2)])
    >>> [[m.tolist() for m in group] for group in out]
    [[[False, True]], [[False], [True, True]]]
    """
    if not requests:
        return []
    groups = [[jnp.asarray(s) for s in scores] for scores, _ in requests]
    ks = [jnp.asarray(k, jnp.int32) for _, k in requests]
    return _top_k_jit(groups, ks)


def top_k_mask(scores: jax.Array, k: jax.Array | int) -> jax.Array:
    """A bool mask of ``scores``' shape keeping exactly the ``k`` largest scores.

    Ties are broken towards the lowest flat index. ``k`` may be traced; it is clipped to
    ``[0, scores.size]``. No sort and no gather: safe on sharded arrays.

    >>> import jax.numpy as jnp
    >>> top_k_mask(jnp.array([[0.1, 3.0], [2.0, 2.0]]), 2).tolist()
    [[False, True], [True, False]]
    """
    return top_k_masks([([scores], k)])[0][0]


def global_top_k_masks(scores: Sequence[jax.Array], k: jax.Array | int) -> list[jax.Array]:
    """Masks keeping exactly the ``k`` largest scores over ALL arrays in ``scores`` together.

    Ties are broken towards earlier arrays, then lower flat index.

    >>> import jax.numpy as jnp
    >>> [m.tolist() for m in global_top_k_masks([jnp.array([5.0, 1.0]), jnp.array([3.0, 4.0])], 3)]
    [[True, False], [True, True]]
    """
    return top_k_masks([(list(scores), k)])[0]


# Jitted once per shape (also when called eagerly: the loop bodies are closures, so an eager
# call would otherwise retrace and recompile every time). Inside a user's jit they inline.
_top_k_jit = jax.jit(lambda groups, ks: _select([[sortable_keys(s) for s in g] for g in groups], ks))
