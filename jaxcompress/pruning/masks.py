"""Masks from scores: one array in, one bool mask of the same shape out (True = kept).

Every function keeps an EXACT number of units: for sparsity ``s`` over ``n`` units (elements,
filters, channels or blocks) it prunes ``round(s * n)`` of them, ties broken by index. N:M keeps
N of every M consecutive weights along the contracting axis ("N kept": 2:4 keeps 2, prunes 2).
All functions are pure and jit-able with a traced ``sparsity``; see `topk` for why no sort is
needed (sharded weights are never gathered).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from optax import MaskedNode

from jaxcompress.pruning import scores as scores_lib
from jaxcompress.pruning.topk import global_top_k_masks, top_k_mask

__all__ = [
    "unstructured_mask",
    "magnitude_mask",
    "structured_mask",
    "block_mask",
    "n_m_mask",
    "global_masks",
    "num_to_prune",
    "contracting_axis",
    "units",
]


def num_to_prune(sparsity: Any, units: int) -> jax.Array:
    """``round(sparsity * units)`` as int32 (traced ``sparsity`` is fine).

    >>> int(num_to_prune(0.9, 1000)), int(num_to_prune(0.5, 3))
    (900, 2)
    """
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * units).astype(jnp.int32)


def unstructured_mask(scores: jax.Array, sparsity: Any) -> jax.Array:
    """Keep the largest scores, pruning exactly ``round(sparsity * scores.size)`` elements.

    >>> unstructured_mask(jnp.array([0.3, 0.1, 0.4, 0.2]), 0.5).tolist()
    [True, False, True, False]
    """
    return top_k_mask(scores, scores.size - num_to_prune(sparsity, scores.size))


def magnitude_mask(weights: jax.Array, sparsity: Any) -> jax.Array:
    """Layer-wise magnitude pruning: keep the largest ``|w|``.

    >>> magnitude_mask(jnp.array([[1.0, -5.0], [0.5, 2.0]]), 0.5).tolist()
    [[False, True], [False, True]]
    """
    return unstructured_mask(scores_lib.magnitude(weights), sparsity)


def _axis(ndim: int, axis: int, name: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for a {ndim}-d array")
    return axis % ndim


def contracting_axis(ndim: int, name: str = "array") -> int:
    """The contracting (input) axis of a Flax kernel: 0 for Dense (in, out), 2 for Conv HWIO.

    >>> contracting_axis(2), contracting_axis(4)
    (0, 2)
    """
    if ndim < 2:
        raise ValueError(f"{name}: a {ndim}-d array has no contracting axis (need a kernel with ndim >= 2)")
    return ndim - 2


def units(
    scores: jax.Array,
    structure: str,
    *,
    block_size: int | Sequence[int] | None = None,
    norm: str = "l1",
    name: str = "array",
):
    """Split pruning by ``structure`` into ``(unit_scores, expand)``: one score per prunable unit
    (element, filter, channel or block) and a function turning a bool keep-vector over the
    units back into a mask of ``scores``' shape. `plan` batches the top-k of many leaves this way.

    >>> unit_scores, expand = units(jnp.array([[1.0, 5.0], [2.0, 1.0]]), "filter")
    >>> unit_scores.tolist(), expand(jnp.array([False, True])).tolist()
    ([3.0, 6.0], [[False, True], [False, True]])
    """
    scores = jnp.asarray(scores, jnp.float32)
    if structure == "unstructured":
        return scores, lambda keep: keep
    if structure in ("filter", "channel"):
        axis = scores.ndim - 1 if structure == "filter" else contracting_axis(scores.ndim, name)
        if scores.ndim < 1:
            raise ValueError(f"{name}: structured pruning needs an array with ndim >= 1")
        shape = [1] * scores.ndim
        shape[axis] = scores.shape[axis]
        return scores_lib.unit_norms(scores, axis, norm), lambda keep: _expand_like(keep.reshape(shape), scores)
    if structure == "block":
        br, bc = _block(block_size)
        if scores.ndim < 2:
            raise ValueError(f"{name}: block pruning needs an array with ndim >= 2, got shape {scores.shape}")
        rows, cols = scores.shape[-2:]
        if br < 1 or bc < 1 or rows % br or cols % bc:
            raise ValueError(f"{name}: block size {(br, bc)} does not divide the last two dims {(rows, cols)}")
        tiles = scores_lib.block_norms(scores, (br, bc), norm)
        return tiles, lambda keep: jnp.repeat(jnp.repeat(keep, br, axis=-2), bc, axis=-1)
    raise ValueError(f"{name}: no unit decomposition for structure {structure!r}")


def structured_mask(
    scores: jax.Array, sparsity: Any, *, axis: int = -1, norm: str = "l1", name: str = "array"
) -> jax.Array:
    """Prune whole slices along ``axis`` (``-1``: filters / output units; ``-2``: input channels)
    ranked by the L1 or L2 norm of their scores; exactly ``round(sparsity * shape[axis])`` slices.

    >>> w = jnp.array([[1.0, 0.1, 3.0], [1.0, 0.2, -3.0]])
    >>> structured_mask(jnp.abs(w), 1 / 3, axis=-1).tolist()
    [[True, False, True], [True, False, True]]
    """
    scores = jnp.asarray(scores, jnp.float32)
    axis = _axis(scores.ndim, axis, name)
    unit_scores = scores_lib.unit_norms(scores, axis, norm)
    keep = unstructured_mask(unit_scores, sparsity)
    shape = [1] * scores.ndim
    shape[axis] = scores.shape[axis]
    return _expand_like(keep.reshape(shape), scores)


def _expand_like(keep: jax.Array, scores: jax.Array) -> jax.Array:
    """``keep`` broadcast to ``scores``' shape by an elementwise op WITH ``scores``, so that the
    mask takes the scores' sharding (with explicit mesh axes a plain ``broadcast_to`` of the
    replicated unit vector gives a replicated, full-size mask on every device)."""
    return jnp.zeros_like(scores, dtype=bool) | keep


def _block(block_size: int | Sequence[int] | None) -> tuple[int, int]:
    if block_size is None:
        raise ValueError("structure='block' needs block_size (an int or (rows, cols))")
    if isinstance(block_size, int):
        return block_size, block_size
    block = tuple(int(b) for b in block_size)
    if len(block) != 2:
        raise ValueError(f"block_size must be an int or (rows, cols), got {block_size!r}")
    return block


def block_mask(
    scores: jax.Array,
    sparsity: Any,
    *,
    block_size: int | Sequence[int],
    norm: str = "l1",
    name: str = "array",
) -> jax.Array:
    """Prune ``b x b`` tiles of the last two axes (for a conv HWIO kernel: tiles of I x O at each
    spatial position), ranked by the norm of their scores; exactly ``round(sparsity * tiles)``.

    >>> m = block_mask(jnp.arange(16.0).reshape(4, 4), 0.5, block_size=2)
    >>> m.astype(int).tolist()
    [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    """
    unit_scores, expand = units(scores, "block", block_size=block_size, norm=norm, name=name)
    return expand(unstructured_mask(unit_scores, sparsity))


def check_n_m(n: int, m: int, dim: int | None = None, name: str = "array") -> None:
    """Raise a ValueError naming ``name`` unless ``1 <= n <= m`` and ``m`` divides ``dim``.

    >>> check_n_m(2, 4, 96)
    >>> check_n_m(2, 4, 6, name="params['dense']['kernel']")
    Traceback (most recent call last):
    ...
    ValueError: params['dense']['kernel']: M=4 does not divide the contracting dim 6
    """
    if not (isinstance(n, int) and isinstance(m, int)) or m < 1 or n < 1:
        raise ValueError(f"{name}: N:M needs integers 1 <= N <= M, got N={n!r}, M={m!r}")
    if n > m:
        raise ValueError(f"{name}: N:M keeps N of every M weights, so N must be <= M; got N={n} > M={m}")
    if dim is not None and dim % m:
        raise ValueError(f"{name}: M={m} does not divide the contracting dim {dim}")


def n_m_mask(scores: jax.Array, n: int, m: int, *, axis: int | None = None, name: str = "array") -> jax.Array:
    """Keep the ``n`` largest of every ``m`` consecutive scores along ``axis`` ("N kept").

    ``axis`` defaults to the contracting axis of a Flax kernel (`contracting_axis`): 0 for Dense
    ``(in, out)``, 2 for Conv ``(H, W, I, O)``. Ties go to the lower index. Works elementwise
    (an ``m x m`` comparison inside each group), no sort.

    >>> n_m_mask(jnp.array([[4.0], [1.0], [3.0], [2.0]]), 2, 4).ravel().tolist()
    [True, False, True, False]
    """
    scores = jnp.asarray(scores, jnp.float32)
    axis = contracting_axis(scores.ndim, name) if axis is None else _axis(scores.ndim, axis, name)
    check_n_m(n, m, scores.shape[axis], name)
    moved = jnp.moveaxis(scores, axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
    mine = groups[..., :, None]  # (..., G, M, 1): element i
    other = groups[..., None, :]  # (..., G, 1, M): element j
    lower = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # [i, j]: j < i
    beaten_by = (other > mine) | ((other == mine) & lower)
    rank = jnp.sum(beaten_by, axis=-1)  # how many in the group rank above element i
    keep = (rank < n).reshape(moved.shape)
    return jnp.moveaxis(keep, -1, axis)


def global_masks(
    scores: Sequence[jax.Array], sparsity: Any, *, normalize: str | None = None
) -> list[jax.Array]:
    """One threshold over all arrays: prune exactly ``round(sparsity * total)`` elements overall.

    ``normalize`` (``"l1"``, ``"l2"``, ``"max"``, ``"mean"``) rescales each array's scores first
    (see `scores.normalize`), so that layers of different scale keep comparable fractions.

    >>> [m.tolist() for m in global_masks([jnp.array([4.0, 3.0]), jnp.array([1.0, 2.0])], 0.5)]
    [[True, True], [False, False]]
    >>> [m.tolist() for m in global_masks([jnp.array([4.0, 3.0]), jnp.array([1.0, 2.0])], 0.5, normalize="max")]
    [[True, False], [False, True]]
    """
    scores = [scores_lib.normalize(jnp.asarray(s, jnp.float32), normalize) for s in scores]
    total = sum(int(s.size) for s in scores)
    return global_top_k_masks(scores, total - num_to_prune(sparsity, total))


def is_masked_node(x: Any) -> bool:
    return isinstance(x, MaskedNode)
