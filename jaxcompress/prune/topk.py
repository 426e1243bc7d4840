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

__all__ = ["top_k_mask", "global_top_k_masks", "sortable_keys"]

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


def _kth_largest_key(keys: Sequence[jax.Array], k: jax.Array) -> jax.Array:
    """Largest key T with count(keys >= T) >= k (k >= 1), i.e. the k-th largest key; for k == 0
    the maximum key 0xFFFFFFFF (the caller keeps nothing in that case)."""

    def body(_, bounds):
        lo, hi = bounds
        span = hi - lo
        mid = lo + (span >> 1) + (span & 1)  # upper middle, no uint32 overflow
        enough = sum(_count(key >= mid) for key in keys) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo, _ = lax.fori_loop(0, _KEY_BITS, body, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
    return lo


def _flat_index(shape: tuple[int, ...], offset: int) -> jax.Array:
    index = jnp.zeros(shape, jnp.int32) + jnp.int32(offset)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.int32, shape, axis) * jnp.int32(stride)
        stride *= shape[axis]
    return index


def _select(keys: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
    sizes = [int(key.size) for key in keys]
    total = sum(sizes)
    if total >= 2**31 - 1:
        raise ValueError(f"top-k over {total} elements: more than 2**31 - 2 elements is not supported")
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, total)
    threshold = _kth_largest_key(keys, k)
    above = [key > threshold for key in keys]
    ties = [(key == threshold) & (k > 0) for key in keys]
    wanted = k - sum(_count(a) for a in above)  # ties to keep, 0 <= wanted <= #ties
    n_ties = sum(_count(t) for t in ties)

    def all_ties(_):
        return [a | t for a, t in zip(above, ties)]

    def first_ties(_):
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        indices = [_flat_index(key.shape, off) for key, off in zip(keys, offsets)]

        # Smallest J with count(ties & index < J) >= wanted, by bisection over [0, total].
        def body(_, bounds):
            lo, hi = bounds
            mid = lo + (hi - lo) // 2
            enough = sum(_count(t & (i < mid)) for t, i in zip(ties, indices)) >= wanted
            return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

        steps = max(1, int(total).bit_length() + 1)
        cut, _ = lax.fori_loop(0, steps, body, (jnp.int32(0), jnp.int32(total)))
        return [a | (t & (i < cut)) for a, t, i in zip(above, ties, indices)]

    return lax.cond(n_ties == wanted, all_ties, first_ties, None)


def top_k_mask(scores: jax.Array, k: jax.Array | int) -> jax.Array:
    """A bool mask of ``scores``' shape keeping exactly the ``k`` largest scores.

    Ties are broken towards the lowest flat index. ``k`` may be traced; it is clipped to
    ``[0, scores.size]``. No sort and no gather: safe on sharded arrays.

    >>> import jax.numpy as jnp
    >>> top_k_mask(jnp.array([[0.1, 3.0], [2.0, 2.0]]), 2).tolist()
    [[False, True], [True, False]]
    """
    return _top_k_jit(jnp.asarray(scores), jnp.asarray(k, jnp.int32))


def global_top_k_masks(scores: Sequence[jax.Array], k: jax.Array | int) -> list[jax.Array]:
    """Masks keeping exactly the ``k`` largest scores over ALL arrays in ``scores`` together.

    Ties are broken towards earlier arrays, then lower flat index.

    >>> import jax.numpy as jnp
    >>> [m.tolist() for m in global_top_k_masks([jnp.array([5.0, 1.0]), jnp.array([3.0, 4.0])], 3)]
    [[True, False], [True, True]]
    """
    return _global_top_k_jit([jnp.asarray(s) for s in scores], jnp.asarray(k, jnp.int32))


# Jitted once per shape (also when called eagerly: the loop bodies are closures, so an eager
# call would otherwise retrace and recompile every time). Inside a user's jit they inline.
_top_k_jit = jax.jit(lambda scores, k: _select([sortable_keys(scores)], k)[0])
_global_top_k_jit = jax.jit(lambda scores, k: _select([sortable_keys(s) for s in scores], k))
