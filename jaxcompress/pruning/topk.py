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

Memory: inside `prune`'s jitted update the selection runs under `lax.cond`, and XLA sizes ONE
temporary buffer for the whole step, the branch that is not taken included. So the selection
must not need any param-sized temporary, or every ordinary training step pays for it (on CPU a
temporary buffer above glibc's 32 MB mmap ceiling is fresh pages, page faults, every step). Two
things would create one and are prevented here: XLA hoisting the loop-invariant key computation
out of the bisection loop (a uint32 copy of every scored leaf: scores are `LazyScore`s whose
operands pass an `lax.optimization_barrier` with the loop index in every pass), and XLA:CPU
rewriting a large sum into a ``reduce-window`` that does not fuse its input (an int32 copy of
the predicate: `_count` sums in two fused stages).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["LazyScore", "count_true", "top_k_mask", "top_k_masks", "global_top_k_masks", "select_top_k", "sortable_keys"]

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


class LazyScore(NamedTuple):
    """Scores computed on demand, as ``fn(*operands)``, inside each counting pass.

    ``fn`` must give bit-identical values each time (elementwise abs / where / products are
    fine; avoid divisions, which XLA may round differently in different fusions). Every array
    ``fn`` reads should be in ``operands``: those pass an optimization barrier in each pass, so
    XLA cannot hoist the score computation out of the loop (which would materialise it).

    >>> import jax.numpy as jnp
    >>> LazyScore(jnp.abs, (jnp.array([-2.0, 1.0]),)).evaluate().tolist()
    [2.0, 1.0]
    """

    fn: Callable[..., jax.Array]
    operands: tuple = ()

    def evaluate(self, fence: Callable[[Any], Any] | None = None) -> jax.Array:
        operands = self.operands if fence is None else fence(self.operands)
        return self.fn(*operands)


def _identity(x):
    return x


def _as_lazy(score: Any) -> LazyScore:
    if isinstance(score, LazyScore):
        return score
    if callable(score):
        return LazyScore(score)
    return LazyScore(_identity, (score,))


def _fence(index: jax.Array) -> Callable[[Any], Any]:
    """Tie values to a loop index so that XLA treats what is computed from them as loop-variant."""
    return lambda operands: lax.optimization_barrier((operands, index))[0]


# Sums over at most this many elements per reduced axis stay one fused reduction on XLA:CPU
# (its tree-reduction rewriter turns larger ones into an unfused reduce-window).
_FUSED_SPAN = 32


def explicit_sharding(x: jax.Array) -> Any:
    """``x``'s sharding when its mesh has an ``Explicit`` axis (sharding in types), else ``None``."""
    try:
        sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
        return None
    axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
    return sharding if any(t == jax.sharding.AxisType.Explicit for t in axis_types) else None


def _explicitly_sharded(x: jax.Array) -> bool:
    sharding = explicit_sharding(x)
    return sharding is not None and any(axis is not None for axis in getattr(sharding, "spec", ()))


def count_true(pred: jax.Array) -> jax.Array:
    """The number of True entries, as int32, without an int32 temporary of ``pred``'s size: the
    first stage sums chunks of at most 32 along the last axis (fused with the comparison that
    computes ``pred``), an optimization barrier keeps XLA from merging it with the second."""
    pred = jnp.asarray(pred)
    if pred.size <= _FUSED_SPAN * _FUSED_SPAN or pred.ndim == 0 or _explicitly_sharded(pred):
        # (with explicit mesh axes jax refuses the chunking reshape of a sharded axis; sharded
        # programs run where reductions fuse anyway)
        return jnp.sum(pred, dtype=jnp.int32)
    while pred.ndim > 1 and pred.shape[-1] < _FUSED_SPAN:
        pred = pred.reshape(*pred.shape[:-2], pred.shape[-2] * pred.shape[-1])
    last = pred.shape[-1]
    span = min(_FUSED_SPAN, last)
    pad = (-last) % span
    if pad:
        pred = jnp.pad(pred, [(0, 0)] * (pred.ndim - 1) + [(0, pad)])
    partial = jnp.sum(pred.reshape(*pred.shape[:-1], -1, span), axis=-1, dtype=jnp.int32)
    return jnp.sum(lax.optimization_barrier(partial), dtype=jnp.int32)


def _keys(score: LazyScore, fence: Callable[[Any], Any] | None = None) -> jax.Array:
    return sortable_keys(score.evaluate(fence))


def _kth_largest_keys(groups: Sequence[Sequence[LazyScore]], ks: jax.Array, totals: Sequence[int]):
    """Per group g, the largest key T with count(keys >= T) >= ks[g] (the k-th largest key;
    0xFFFFFFFF when k == 0: the caller keeps nothing then), with count(keys >= T) and
    count(keys > T) tracked on the way, so no further pass is needed. One loop for all groups."""

    def body(index, carry):
        lo, hi, count_lo, count_above_hi = carry
        span = hi - lo
        mid = lo + (span >> 1) + (span & 1)  # upper middle, no uint32 overflow
        fence = _fence(index)
        counts = jnp.stack(
            [sum(count_true(_keys(score, fence) >= mid[g]) for score in scores) for g, scores in enumerate(groups)]
        )
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


def select_top_k(groups: Sequence[Sequence[LazyScore]], ks: Sequence[Any]) -> list[list[jax.Array]]:
    """The engine of `top_k_masks`, on LAZY scores (`LazyScore`, e.g.
    ``LazyScore(jnp.abs, (w,))``; a plain array is taken as is). Each is re-evaluated inside
    every counting pass, where XLA fuses it with the comparison and the sum, so no score, key
    or count array of the param's size is ever materialised: the only full-size buffers are the
    output masks (see the module docstring for why that matters to every training step).

    >>> import jax.numpy as jnp
    >>> w = jnp.array([0.5, -3.0, 2.0])
    >>> select_top_k([[LazyScore(jnp.abs, (w,))]], [2])[0][0].tolist()
    [False, True, True]
    """
    groups = [[_as_lazy(score) for score in scores] for scores in groups]
    shapes = [[jax.eval_shape(score.evaluate).shape for score in scores] for scores in groups]
    sizes = [[math.prod(shape) for shape in group] for group in shapes]
    totals = [sum(s) for s in sizes]
    if max(totals) >= 2**31 - 1:
        raise ValueError(f"top-k over {max(totals)} elements: more than 2**31 - 2 elements is not supported")
    k_array = jnp.stack([jnp.clip(jnp.asarray(k, jnp.int32), 0, t) for k, t in zip(ks, totals)])
    thresholds, n_ge, n_above = _kth_largest_keys(groups, k_array, totals)
    n_ties = n_ge - n_above
    wanted = jnp.where(k_array > 0, k_array - n_above, 0)  # ties to keep, 0 <= wanted <= n_ties

    def all_ties(_):
        return [[(_keys(s) >= thresholds[g]) & (k_array[g] > 0) for s in scores] for g, scores in enumerate(groups)]

    def first_ties(_):
        offsets = [[sum(size[:i]) for i in range(len(size))] for size in sizes]

        def ties(g, i, fence=None):
            return _keys(groups[g][i], fence) == thresholds[g]

        def below(g, i, cut):
            return _index_below(shapes[g][i], offsets[g][i], cut)

        # Per group, the smallest J with count(ties & index < J) >= wanted: bisection on [0, total].
        def body(index, bounds):
            lo, hi = bounds
            mid = lo + (hi - lo) // 2
            fence = _fence(index)
            counts = jnp.stack(
                [
                    sum(count_true(ties(g, i, fence) & below(g, i, mid[g])) for i in range(len(groups[g])))
                    for g in range(len(groups))
                ]
            )
            enough = counts >= wanted
            return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

        steps = max(1, max(totals).bit_length() + 1)
        start = (jnp.zeros(len(groups), jnp.int32), jnp.asarray(totals, jnp.int32))
        cut, _ = lax.fori_loop(0, steps, body, start)
        return [
            [
                ((_keys(groups[g][i]) > thresholds[g]) | (ties(g, i) & below(g, i, cut[g]))) & (k_array[g] > 0)
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
_top_k_jit = jax.jit(lambda groups, ks: select_top_k([[LazyScore(_identity, (s,)) for s in g] for g in groups], ks))
