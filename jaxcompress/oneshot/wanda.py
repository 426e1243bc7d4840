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

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.pruning.masks import check_n_m

__all__ = ["wanda_scores", "row_keep_mask", "wanda_mask", "wanda_matrix", "wanda"]


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
    else:
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


# ---------------------------------------------------------------------------------------------
# Tree level (shared with `sparsegpt`)
# ---------------------------------------------------------------------------------------------


def leaf_patterns(plan: Any, step: int | None, method: str) -> dict[str, tuple[int, Any, Any, Any]]:
    """Per pruned leaf path: ``(flat index, sparsity, n, m)`` from a `PrunePlan`, after checking that
    each rule is something a one-shot matrix method can do (layer-scope unstructured or N:M along
    the contracting axis). ``sparsity`` is a Python float (``None`` for N:M)."""
    needs_step = [r for r, g in zip(plan.rules, plan.groups) if g and callable(r.sparsity)]
    if needs_step and step is None:
        raise ValueError(
            f"PruneRule(pattern={needs_step[0].pattern!r}) has a sparsity schedule; pass step= (the step "
            f"whose sparsity {method} should reach, e.g. the schedule's end step)"
        )
    sparsities = plan.target_sparsities(0 if step is None else step)
    out = {}
    for rule_index, group in enumerate(plan.groups):
        rule = plan.rules[rule_index]
        for i in group:
            name, decision = plan.names[i], plan.leaves[i]
            where = f"{name}: {method} with PruneRule(pattern={rule.pattern!r})"
            if rule.structure not in ("unstructured", "n:m"):
                raise ValueError(f"{where}: structure={rule.structure!r} is not supported (use 'unstructured' or 'n:m')")
            if rule.scope != "layer":
                raise ValueError(f"{where}: scope={rule.scope!r} is not supported ({method} prunes each layer on its own)")
            if rule.structure == "n:m":
                ndim = len(decision.shape)
                if rule.axis is not None and rule.axis % ndim != ndim - 2:
                    raise ValueError(
                        f"{where}: N:M groups run along the input (contracting) axis of the matrix view; "
                        f"axis={rule.axis} is not the contracting axis {ndim - 2} of shape {decision.shape}"
                    )
                out[decision.path] = (i, None, rule.n, rule.m)
            else:
                out[decision.path] = (i, float(sparsities[i]), None, None)
    return out


def check_statistics(stats: Any, name: str, method: str, *, uses_hessian: bool = False) -> bool:
    """Warn about degenerate calibration statistics (all-zero inputs; with ``uses_hessian``, fewer
    rows than inputs); returns whether all inputs were zero."""
    import warnings

    d_in = stats.view.d_in
    all_zero = not bool(np.any(np.asarray(stats.sq_norms) > 0))
    if all_zero:
        warnings.warn(
            f"{name}: every calibration input of this weight is zero ({stats.count} rows); {method} has no "
            f"activation information here and falls back to magnitude pruning",
            RuntimeWarning,
            stacklevel=3,
        )
    elif uses_hessian and stats.count < d_in:
        warnings.warn(
            f"{name}: only {stats.count} calibration rows for {d_in} inputs; the input statistics are "
            f"rank-deficient and {method} relies on damping (add calibration data for better results)",
            RuntimeWarning,
            stacklevel=3,
        )
    return all_zero


def _channels_last_order(stats: Any) -> np.ndarray | None:
    """For a conv, the column order with the input channel fastest (the capture's im2col order has
    it slowest), so that N:M groups run along input channels as `PruneRule` defines; else None."""
    view = stats.view
    if view.kind != "conv":
        return None
    channels = view.operand_shape[tuple(stats.site.params["dimension_numbers"].rhs_spec)[1]]
    return np.arange(view.d_in).reshape(channels, view.d_in // channels).T.ravel()


def _permute_statistics(stats: Any, order: np.ndarray) -> Any:
    hessian = None if stats.hessian is None else np.asarray(stats.hessian)[np.ix_(order, order)]
    return stats._replace(
        hessian=hessian,
        sq_norms=np.asarray(stats.sq_norms)[order],
        abs_sums=np.asarray(stats.abs_sums)[order],
        absmax=np.asarray(stats.absmax)[order],
    )


def _check_reached(plan: Any, patterns: dict, reached: set, method: str) -> None:
    """A pruned leaf needs input statistics: raise naming the first one that never meets a dot."""
    missing = [plan.names[patterns[p][0]] for p in patterns if p not in reached]
    if missing:
        raise ValueError(
            f"{missing[0]}: selected for {method} but it never meets a dot_general / conv_general_dilated "
            f"in fn on the calibration batches, so it has no input statistics (exclude it, e.g. with "
            f"PruneRule(pattern=..., skip=True), or prune it with prune_params)"
            + (f"; also {len(missing) - 1} more" if len(missing) > 1 else "")
        )


def prune_with_statistics(
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    rules: Any,
    prune_matrix: Callable[..., tuple[jax.Array, jax.Array]],
    *,
    method: str,
    hessian: bool,
    sequential: bool,
    step: int | None,
    params_argnum: int,
    on_unused: str,
    row_mask: Callable[[Any], Any] | None = None,
) -> tuple[Any, Any]:
    """The tree-level driver of the one-shot pruning methods.

    ``prune_matrix(W, stats, sparsity=, n=, m=, name=) -> (pruned W, keep mask)`` works on the
    matrix view. With ``sequential``, the selected leaves are processed group by group in program
    order (`sequential_groups`), each group's statistics captured with the earlier groups already
    pruned (`sequential_capture`: one pass of ``fn`` for all groups when they follow one another);
    otherwise all statistics come from the dense model in one capture. ``row_mask`` as for
    `capture_statistics`.
    """
    from optax import MaskedNode

    from jaxcompress.oneshot.capture import from_matrix, like_leaf, place_like, sequential_capture, sequential_groups, to_matrix
    from jaxcompress.pruning.plan import plan_pruning

    plan = plan_pruning(params, rules, on_unused=on_unused)
    patterns = leaf_patterns(plan, step, method)
    batches = list(batches)
    if not batches:
        raise ValueError(f"{method} needs at least one calibration batch")
    leaves = list(plan.leaves_of(jax.device_put(params)))  # on the device once, not per capture
    masks: list[Any] = [MaskedNode()] * len(leaves)
    if not patterns:
        return params, plan.unflatten(masks)
    select = lambda path: path in patterns
    if sequential:
        groups = sequential_groups(fn, params, batches[0], select, params_argnum=params_argnum)
    else:
        groups = [tuple(patterns)]
    if sequential:
        _check_reached(plan, patterns, {path for group in groups for path in group}, method)

    def prune_group(group, stats):
        for path in group:
            if path not in stats:
                continue
            index, sparsity, n, m = patterns[path]
            name = plan.names[index]
            leaf = leaves[index]
            leaf_stats = stats[path]
            matrix = to_matrix(jnp.asarray(leaf), leaf_stats)
            order = _channels_last_order(leaf_stats) if n is not None else None
            if order is not None:  # N:M runs along input channels: make them the fastest column index
                matrix, leaf_stats = matrix[:, order], _permute_statistics(leaf_stats, order)
            pruned, keep = prune_matrix(matrix, leaf_stats, sparsity=sparsity, n=n, m=m, name=name)
            if order is not None:
                inverse = np.argsort(order)
                pruned, keep = pruned[:, inverse], keep[:, inverse]
            leaves[index] = like_leaf(leaf, from_matrix(pruned, jnp.asarray(leaf), stats[path]))
            mask_like = jax.ShapeDtypeStruct(tuple(leaf.shape), jnp.bool_)
            masks[index] = place_like(leaf, from_matrix(keep.astype(jnp.float32), mask_like, stats[path]))

    captures = sequential_capture(fn, plan.unflatten(leaves), [frozenset(g).__contains__ for g in groups], batches,
                                  params_argnum=params_argnum, hessian=hessian, row_mask=row_mask)
    with captures:
        for group_index, group in enumerate(groups):
            stats = captures(group_index, plan.unflatten(leaves))
            if not sequential:
                _check_reached(plan, patterns, set(stats), method)
            prune_group(group, stats)
    return plan.unflatten(leaves), plan.unflatten(masks)


def _wanda_from_statistics(matrix, stats, *, sparsity, n, m, name):
    sq_norms = np.asarray(stats.sq_norms, np.float32)
    if check_statistics(stats, name, "Wanda"):
        sq_norms = np.ones_like(sq_norms)
    return _wanda_jit(matrix, jnp.asarray(sq_norms), sparsity=sparsity, n=n, m=m)


def _wanda_impl(weight, sq_norms, *, sparsity, n, m):
    return wanda_matrix(weight, sq_norms, sparsity=sparsity, n=n, m=m)


_wanda_jit = jax.jit(_wanda_impl, static_argnames=("sparsity", "n", "m"))


def wanda(
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    rules: Any,
    *,
    sequential: bool = True,
    step: int | None = None,
    row_mask: Callable[[Any], Any] | None = None,
    params_argnum: int = 0,
    on_unused: str = "warn",
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
      step: where a rule's sparsity schedule is evaluated (required if a rule has a schedule).
      row_mask: ``row_mask(batch) -> array``: calibration rows where it is 0 are ignored (e.g.
        padding tokens: ``lambda batch: batch[1]``); see
        `jaxcompress.oneshot.capture.capture_statistics`.
      params_argnum: where params go among ``fn``'s positional arguments.
      on_unused: ``"warn"``, ``"error"`` or ``"ignore"`` for rules that matched nothing.

    ``masks`` is like `jaxcompress.prune_params`' (a bool array per pruned leaf,
    `optax.MaskedNode()` elsewhere); fine-tune with ``jaxcompress.prune(optimizer, masks=masks)``.
    A leaf whose calibration inputs are all zero falls back to magnitude (with a warning).

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
    )
