"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

A weight's importance is its magnitude times the L2 norm of the input feature it multiplies,
``score_ij = |W_ij| * ||X_j||_2`` with ``W`` in the matrix view ``(d_out, d_in)`` (rows are
outputs, columns the inputs in the order of the captured statistics) and ``X`` the ``(rows, d_in)``
calibration activations. Scores are compared PER OUTPUT ROW: every row keeps exactly the same
number of weights (``d_in - round(sparsity * d_in)``), which the paper found matters as much as the
score itself. The N:M variant keeps the ``n`` best of every ``m`` consecutive inputs of each row.
No weight is updated: Wanda only chooses the mask.

The per-matrix functions (`wanda_scores`, `wanda_mask`, `wanda_matrix`) are pure and jit-able;
`wanda` runs a whole params tree from calibration batches via `jaxcompress.oneshot.capture`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.oneshot.allocation import Allocation, resolve_allocation
from jaxcompress.oneshot.prune_driver import check_statistics, prune_with_statistics
from jaxcompress.pruning.masks import check_n_m

__all__ = ["wanda_scores", "row_keep_mask", "row_keep_mask_count", "wanda_mask", "wanda_matrix", "wanda"]


def pruned_count(sparsity: float, units: int) -> int:
    """How many of ``units`` a static ``sparsity`` prunes: ``round(sparsity * units)`` (half to even,
    as `jaxcompress.pruning.masks.num_to_prune`)."""
    return int(np.round(float(sparsity) * units))


def wanda_scores(weight: jax.Array, sq_norms: jax.Array) -> jax.Array:
    """``|W_ij| * ||X_j||_2`` for a matrix-view weight ``(d_out, d_in)`` and the per-input sums of
    squares ``sum_rows x_j^2`` ``(d_in,)``.

    >>> wanda_scores(jnp.array([[1.0, -2.0], [3.0, 0.5]]), jnp.array([4.0, 1.0])).tolist()
    [[2.0, 2.0], [6.0, 0.5]]
    """
    weight = jnp.asarray(weight, jnp.float32)
    norms = jnp.sqrt(jnp.maximum(jnp.asarray(sq_norms, jnp.float32), 0.0))
    return jnp.abs(weight) * norms[None, :]


def _ranks_descending(scores: jax.Array, axis: int = -1) -> jax.Array:
    """Rank of each score along ``axis`` (0 = largest); ties go to the lower index."""
    order = jnp.argsort(-scores, axis=axis, stable=True)
    return jnp.argsort(order, axis=axis, stable=True)


def row_keep_mask(scores: jax.Array, sparsity: float) -> jax.Array:
    """Keep the largest scores of every ROW of a ``(d_out, d_in)`` matrix: each row prunes exactly
    ``round(sparsity * d_in)`` (ties go to the lower index).

    >>> row_keep_mask(jnp.array([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 1.0, 5.0]]), 0.5).tolist()
    [[True, False, True, False], [False, True, False, True]]
    """
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim != 2:
        raise ValueError(f"row_keep_mask expects a (d_out, d_in) matrix, got shape {scores.shape}")
    keep = scores.shape[1] - pruned_count(sparsity, scores.shape[1])
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    return _ranks_descending(scores, axis=1) < keep


def row_keep_mask_count(scores: jax.Array, count: int) -> jax.Array:
    """Prune exactly ``count`` scores of a ``(d_out, d_in)`` matrix, spread over its rows as evenly
    as possible: every row prunes ``count // d_out`` of its lowest, and the ``count % d_out`` rows
    whose next-lowest kept score is the smallest prune one more (ties go to the lower index).

    >>> row_keep_mask_count(jnp.array([[3.0, 1.0, 2.0, 0.0], [0.5, 1.0, 4.0, 5.0]]), 3).tolist()
    [[True, False, True, False], [False, True, True, True]]
    """
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim != 2:
        raise ValueError(f"row_keep_mask_count expects a (d_out, d_in) matrix, got shape {scores.shape}")
    d_out, d_in = scores.shape
    if not 0 <= int(count) <= d_out * d_in:
        raise ValueError(f"row_keep_mask_count: count {count} is not in [0, {d_out * d_in}]")
    base, extra = divmod(int(count), d_out)
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    ranks = _ranks_descending(scores, axis=1)
    keep_per_row = jnp.full((d_out,), d_in - base)
    if extra:
        next_lowest = -jnp.sort(-scores, axis=1)[:, d_in - base - 1]
        row_order = jnp.argsort(jnp.argsort(next_lowest, stable=True), stable=True)
        keep_per_row = keep_per_row - (row_order < extra)
    return ranks < keep_per_row[:, None]


def n_m_keep_mask(scores: jax.Array, n: int, m: int, name: str = "array") -> jax.Array:
    """Keep the ``n`` largest of every ``m`` consecutive scores along the LAST axis (ties go to the
    lower index).

    >>> n_m_keep_mask(jnp.array([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 1.0, 1.0]]), 2, 4).astype(int).tolist()
    [[1, 0, 1, 0, 0, 0, 1, 1]]
    """
    scores = jnp.asarray(scores, jnp.float32)
    check_n_m(n, m, scores.shape[-1], name)
    groups = scores.reshape(scores.shape[:-1] + (scores.shape[-1] // m, m))
    groups = jnp.where(jnp.isnan(groups), -jnp.inf, groups)
    return (_ranks_descending(groups, axis=-1) < n).reshape(scores.shape)


def _check_matrix(weight: jax.Array, sq_norms: jax.Array | None, name: str) -> None:
    if weight.ndim != 2:
        raise ValueError(f"{name}: expected a (d_out, d_in) matrix view, got shape {tuple(weight.shape)}")
    if sq_norms is not None and tuple(sq_norms.shape) != (weight.shape[1],):
        raise ValueError(
            f"{name}: input statistics of shape {tuple(sq_norms.shape)} do not match d_in={weight.shape[1]} "
            f"of the weight's matrix view {tuple(weight.shape)}"
        )


def check_pattern(sparsity: float | None, n: int | None, m: int | None, d_in: int, name: str) -> None:
    """Exactly one of ``sparsity`` (a float in [0, 1)) or ``n``/``m`` (with ``m | d_in``)."""
    if (sparsity is None) == (n is None or m is None):
        raise ValueError(f"{name}: pass either sparsity or both n and m (got sparsity={sparsity}, n={n}, m={m})")
    if sparsity is not None:
        if isinstance(sparsity, jax.core.Tracer) or not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"{name}: sparsity must be a Python float in [0, 1), got {sparsity!r}")
    elif n is not None and m is not None:
        check_n_m(n, m, d_in, name)


def wanda_mask(
    weight: jax.Array,
    sq_norms: jax.Array,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    name: str = "weight",
) -> jax.Array:
    """The Wanda keep-mask (True = kept) of a matrix-view weight ``(d_out, d_in)``.

    Args:
      weight: ``(d_out, d_in)``; columns in the order of ``sq_norms``.
      sq_norms: ``(d_in,)`` sums over the calibration rows of ``x_j^2`` (`LayerStatistics.sq_norms`).
      sparsity: fraction pruned in EVERY row (a static float); or
      n, m: keep ``n`` of every ``m`` consecutive inputs of every row.
      name: used in error messages (a params path).

    >>> w = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    >>> wanda_mask(w, jnp.array([100.0, 1.0, 1.0, 0.0]), sparsity=0.5).tolist()
    [[True, False, True, False]]
    >>> wanda_mask(w, jnp.ones(4), n=1, m=2).tolist()
    [[False, True, False, True]]
    """
    weight = jnp.asarray(weight)
    sq_norms = jnp.asarray(sq_norms)
    _check_matrix(weight, sq_norms, name)
    check_pattern(sparsity, n, m, weight.shape[1], name)
    scores = wanda_scores(weight, sq_norms)
    if sparsity is not None:
        return row_keep_mask(scores, sparsity)
    assert n is not None and m is not None  # check_pattern
    return n_m_keep_mask(scores, n, m, name)


def wanda_matrix(
    weight: jax.Array,
    sq_norms: jax.Array,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    name: str = "weight",
) -> tuple[jax.Array, jax.Array]:
    """Prune a matrix-view weight with Wanda: ``(pruned weight, keep mask)`` (see `wanda_mask`).

    >>> pruned, mask = wanda_matrix(jnp.array([[1.0, -2.0], [3.0, 0.5]]), jnp.array([9.0, 1.0]), sparsity=0.5)
    >>> pruned.tolist()
    [[1.0, 0.0], [3.0, 0.0]]
    """
    mask = wanda_mask(weight, sq_norms, sparsity=sparsity, n=n, m=m, name=name)
    weight = jnp.asarray(weight)
    return jnp.where(mask, weight, jnp.zeros((), weight.dtype)), mask


def _wanda_from_statistics(matrix, stats, *, sparsity, n, m, name, count=None):
    sq_norms = np.asarray(stats.sq_norms, np.float32)
    if check_statistics(stats, name, "Wanda"):
        sq_norms = np.ones_like(sq_norms)
    if count is not None:
        return _wanda_count_jit(matrix, jnp.asarray(sq_norms), count=int(count))
    return _wanda_jit(matrix, jnp.asarray(sq_norms), sparsity=sparsity, n=n, m=m)


def _wanda_impl(weight, sq_norms, *, sparsity, n, m):
    return wanda_matrix(weight, sq_norms, sparsity=sparsity, n=n, m=m)


def _wanda_count_impl(weight, sq_norms, *, count):
    mask = row_keep_mask_count(wanda_scores(weight, sq_norms), count)
    return jnp.where(mask, weight, jnp.zeros((), weight.dtype)), mask


_wanda_jit = jax.jit(_wanda_impl, static_argnames=("sparsity", "n", "m"))
_wanda_count_jit = jax.jit(_wanda_count_impl, static_argnames=("count",))


def wanda(
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    rules: Any,
    *,
    sequential: bool = True,
    allocation: Allocation = "uniform",
    reconstruct: bool = False,
    dense_target: bool = False,
    target_damp: float = 1.0,
    step: int | None = None,
    row_mask: Callable[[Any], Any] | None = None,
    params_argnum: int = 0,
    on_unused: Literal["warn", "error", "ignore"] = "warn",
) -> tuple[Any, Any]:
    """Prune ``params`` with Wanda from calibration batches; returns ``(pruned_params, masks)``.

    Args:
      fn: the unmodified function, called as ``fn(params, *batch)`` (tuple batches) or
        ``fn(params, batch)``.
      params: float params.
      batches: calibration batches (each segment of a sequential pass runs over all of them).
      rules: `jaxcompress.PruneRule`\\ s (or a ``{pattern: sparsity}`` mapping), first full match
        wins. Supported: ``structure="unstructured"`` (every output row of the leaf's matrix view
        prunes exactly ``round(sparsity * d_in)``; ``distribution="erk"`` works) and
        ``structure="n:m"`` (along the contracting axis). The rule's ``score`` is replaced by
        Wanda's. A pruned leaf must meet a dot / conv in ``fn`` (else a ValueError naming it).
      sequential: prune group by group in program order, each group's statistics captured with
        the earlier groups already pruned (as the paper); ``False``: all from the dense model.
      allocation: ``"uniform"`` (every leaf at its rule's sparsity) or ``"owl"`` / an
        `jaxcompress.oneshot.allocation.OWL` (outlier-weighted: per-leaf sparsities within
        ``+-spread`` of the rule's, pruning exactly the rule's total count; unstructured rules
        only, N:M stays exact). Costs one extra calibration pass of the dense model.
      reconstruct: re-fit the kept weights of each pruned leaf by masked least squares on its
        calibration inputs (`jaxcompress.oneshot.reconstruct`; captures ``X^T X``, so wide
        layers cost memory). The mask is Wanda's; the kept weights then change.
      dense_target: prune (and re-fit) each leaf towards the DENSE model's outputs on the
        calibration rows, ``min ||W_s x - W x_d||`` with ``x_d`` the dense model's input there
        (the dense model runs alongside the sequential capture, which then also records ``X^T X``;
        `jaxcompress.oneshot.targets`). Only changes anything when ``sequential``.
      target_damp: the dense target's ridge towards the leaf's own weight, relative to
        ``mean(diag(X^T X))`` (measured: 1.0 beat 0.1 and 0.01 on all-MiniLM-L6-v2).
      step: where a rule's sparsity schedule is evaluated (required if a rule has a schedule).
      row_mask: ``row_mask(batch) -> array``: calibration rows where it is 0 are ignored (e.g.
        padding tokens: ``lambda batch: batch[1]``); see
        `jaxcompress.oneshot.capture.capture_statistics`.
      params_argnum: where params go among ``fn``'s positional arguments.
      on_unused: ``"warn"``, ``"error"`` or ``"ignore"`` for rules that matched nothing.

    ``masks`` is like `jaxcompress.prune_params`' (a bool array per pruned leaf,
    `optax.MaskedNode()` elsewhere); fine-tune with ``jaxcompress.prune(optimizer, masks=masks)``.
    A leaf whose calibration inputs are all zero falls back to magnitude (with a warning).
    Measured on all-MiniLM-L6-v2 (``benchmarks/oneshot_prune.py``, mean cosine to fp32): 50%
    0.867, with ``reconstruct=True`` 0.933; 2:4 0.735, with ``reconstruct=True`` 0.874.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    >>> fn = lambda p, x: x @ p["w"]
    >>> batches = [jax.random.normal(jax.random.key(1), (16, 8))]
    >>> pruned, masks = wanda(fn, params, batches, [jc.PruneRule(pattern="w", sparsity=0.5)])
    >>> masks["w"].sum(axis=0).tolist()     # every output unit keeps 4 of its 8 inputs
    [4, 4, 4, 4]
    """
    return prune_with_statistics(
        fn,
        params,
        batches,
        rules,
        _wanda_from_statistics,
        method="Wanda",
        hessian=False,
        sequential=sequential,
        step=step,
        params_argnum=params_argnum,
        on_unused=on_unused,
        row_mask=row_mask,
        allocation=resolve_allocation(allocation),
        reconstruct=reconstruct,
        dense_target=dense_target,
        target_damp=target_damp,
    )
