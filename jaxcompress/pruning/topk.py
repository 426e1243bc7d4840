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

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["top_k_mask", "top_k_masks", "global_top_k_masks", "select_top_k", "sortable_keys"]

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


def _keys(score: Callable[[], jax.Array]) -> jax.Array:
    return sortable_keys(score())


def _kth_largest_keys(groups: Sequence[Sequence[Callable]], ks: jax.Array, totals: Sequence[int]):
    """Per group g, the largest key T with count(keys >= T) >= ks[g] (the k-th largest key;
    0xFFFFFFFF when k == 0: the caller keeps nothing then), with count(keys >= T) and
    count(keys > T) tracked on the way, so no further pass is needed. One loop for all groups."""

    def body(_, carry):
        lo, hi, count_lo, count_above_hi = carry
        span = hi - lo
        mid = lo + (span >> 1) + (span & 1)  # upper middle, no uint32 overflow
        counts = jnp.stack([sum(_count(_keys(score) >= mid[g]) for score in scores) for g, scores in enumerate(groups)])
        enough = counts >= ks
        return (
            jnp.where(enough, mid, lo),
            jnp.where(enough, hi, mid - 1),
            jnp.where(enough, counts, count_lo),  # count(keys >= lo)
            jnp.where(enough, count_above_hi, counts),  # count(keys >= hi + 1)
        )

    n = len(groups)
    start = (
        jnp.zeros(n, jnp.uint32),
        jnp.full(n, 0xFFFFFFFF, jnp.uint32),
        jnp.asarray(totals, jnp.int32),
        jnp.zeros(n, jnp.int32),
    )
    threshold, _, count_ge, count_gt = lax.fori_loop(0, _KEY_BITS, body, start)
    return threshold, count_ge, count_gt


def _index_below(shape: tuple[int, ...], offset: int, cut: jax.Array) -> jax.Array:
    """``flat_index + offset < cut`` without materialising the flat index: the row-major index
    is compared digit by digit (per-axis iotas against the digits of ``cut - offset``)."""
    limit = jnp.clip(cut - offset, 0, math.prod(shape))
    below = jnp.zeros(shape, bool)
    equal_so_far = jnp.ones(shape, bool)
    stride = math.prod(shape)
    for axis, dim in enumerate(shape):
        stride //= dim
        digit = limit // stride if stride else limit
        limit = limit - digit * stride if stride else limit
        iota = lax.broadcasted_iota(jnp.int32, shape, axis)
        below = below | (equal_so_far & (iota < digit))
        equal_so_far = equal_so_far & (iota == digit)
    return below


def select_top_k(groups: Sequence[Sequence[Callable[[], jax.Array]]], ks: Sequence[Any]) -> list[list[jax.Array]]:
    """The engine of `top_k_masks`, on LAZY scores: each score is a zero-argument function that
    computes the array (e.g. ``lambda: jnp.abs(w)``); it must give bit-identical values each
    time it is evaluated (elementwise abs / where / products are fine; avoid divisions, which
    XLA may round differently in different fusions). It is re-evaluated inside every counting
    pass, where XLA fuses it with the comparison and the sum, so no score or key array of the
    param's size is ever materialised: the only full-size buffers are the output masks. (A
    materialised float32 copy per pass-through would add the model's size in temporaries to
    every training step, which costs page faults on each step even when no mask is updated.)

    >>> import jax.numpy as jnp
    >>> w = jnp.array([0.5, -3.0, 2.0])
    >>> select_top_k([[lambda: jnp.abs(w)]], [2])[0][0].tolist()
    [False, True, True]
    """
    shapes = [[jax.eval_shape(score).shape for score in scores] for scores in groups]
    sizes = [[math.prod(shape) for shape in group] for group in shapes]
    totals = [sum(s) for s in sizes]
    if max(totals) >= 2**31 - 1:
        raise ValueError(f"top-k over {max(totals)} elements: more than 2**31 - 2 elements is not supported")
    ks = jnp.stack([jnp.clip(jnp.asarray(k, jnp.int32), 0, t) for k, t in zip(ks, totals)])
    thresholds, n_ge, n_above = _kth_largest_keys(groups, ks, totals)
    n_ties = n_ge - n_above
    wanted = jnp.where(ks > 0, ks - n_above, 0)  # ties to keep, 0 <= wanted <= n_ties

    def all_ties(_):
        return [[(_keys(s) >= thresholds[g]) & (ks[g] > 0) for s in scores] for g, scores in enumerate(groups)]

    def first_ties(_):
        offsets = [[sum(size[:i]) for i in range(len(size))] for size in sizes]

        def ties(g, i):
            return _keys(groups[g][i]) == thresholds[g]

        def below(g, i, cut):
            return _index_below(shapes[g][i], offsets[g][i], cut)

        # Per group, the smallest J with count(ties & index < J) >= wanted: bisection on [0, total].
        def body(_, bounds):
            lo, hi = bounds
            mid = lo + (hi - lo) // 2
            counts = jnp.stack(
                [sum(_count(ties(g, i) & below(g, i, mid[g])) for i in range(len(groups[g]))) for g in range(len(groups))]
            )
            enough = counts >= wanted
            return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

        steps = max(1, max(totals).bit_length() + 1)
        start = (jnp.zeros(len(groups), jnp.int32), jnp.asarray(totals, jnp.int32))
        cut, _ = lax.fori_loop(0, steps, body, start)
        return [
            [
                ((_keys(groups[g][i]) > thresholds[g]) | (ties(g, i) & below(g, i, cut[g]))) & (ks[g] > 0)
                for i in range(len(groups[g]))
            ]
            for g in range(len(groups))
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
_top_k_jit = jax.jit(lambda groups, ks: select_top_k([[_const(s) for s in g] for g in groups], ks))


def _const(array: jax.Array) -> Callable[[], jax.Array]:
    return lambda: array
