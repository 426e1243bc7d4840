"""The tree-level driver shared by the one-shot pruning methods (`wanda`, `sparsegpt`).

It plans the rules (`jaxcompress.pruning.plan.plan_pruning`), captures the pruned leaves' input
statistics (all at once, or group by group in program order with the earlier groups already
pruned), hands each leaf's matrix view to the method's ``prune_matrix``, optionally re-fits the
kept weights (`jaxcompress.oneshot.reconstruct`), and writes the pruned leaves and their masks
back. With an OWL allocation (`jaxcompress.oneshot.allocation`) the unstructured leaves of each
rule get per-leaf pruned COUNTS from the dense model's Wanda scores (one extra calibration pass,
no Hessian) whose total is exactly the rule's ``round(sparsity * size)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.oneshot.allocation import OWL, layer_keys, largest_remainder, owl_counts
from jaxcompress.oneshot.targets import dense_target_weight

__all__ = ["leaf_patterns", "check_statistics", "prune_with_statistics", "owl_allocation"]


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
    out: dict[str, tuple[int, Any, Any, Any]] = {}
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
    cross = None if stats.cross is None else np.asarray(stats.cross)[np.ix_(order, order)]
    return stats._replace(
        hessian=hessian,
        cross=cross,
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
    allocation: OWL | None = None,
    reconstruct: bool = False,
    reconstruct_damp: float = 0.01,
    dense_target: bool = False,
    target_damp: float = 1.0,
) -> tuple[Any, Any]:
    """The tree-level driver of the one-shot pruning methods.

    ``prune_matrix(W, stats, sparsity=, n=, m=, name=, count=) -> (pruned W, keep mask)`` works
    on the matrix view; ``count`` is ``None`` (prune as ``sparsity`` says) or, with an OWL
    ``allocation``, the exact number of weights to prune in this leaf (``sparsity`` is then
    ``count / size``). With ``reconstruct`` the kept weights are re-fit by
    `jaxcompress.oneshot.reconstruct.masked_least_squares` on the same statistics. With ``sequential``, the selected leaves are processed group by group in program
    order (`sequential_groups`), each group's statistics captured with the earlier groups already
    pruned (`sequential_capture`: one pass of ``fn`` for all groups when they follow one another);
    otherwise all statistics come from the dense model in one capture. ``row_mask`` as for
    `capture_statistics`. With ``dense_target`` (and ``sequential``) the dense model runs
    alongside the capture and each leaf is pruned (and re-fit) towards
    `jaxcompress.oneshot.targets.dense_target_weight` (the dense model's outputs on the
    calibration rows) instead of its own dense weight.
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
    dense_params = plan.unflatten(list(leaves)) if dense_target and sequential else None
    masks: list[Any] = [MaskedNode()] * len(leaves)
    if not patterns:
        return params, plan.unflatten(masks)
    select = lambda path: path in patterns
    counts: dict[str, int] = {}
    if allocation is not None:
        counts = owl_allocation(fn, plan, leaves, patterns, batches, allocation, method=method,
                                params_argnum=params_argnum, row_mask=row_mask)
        for path, count in counts.items():
            index = patterns[path][0]
            patterns[path] = (index, count / int(np.prod(leaves[index].shape)), None, None)
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
            if dense_params is not None and leaf_stats.cross is not None and leaf_stats.hessian is not None:
                target = dense_target_weight(matrix, leaf_stats.hessian, leaf_stats.cross, damp=target_damp, name=name)
                matrix = jnp.asarray(target, matrix.dtype)
            order = _channels_last_order(leaf_stats) if n is not None else None
            if order is not None:  # N:M runs along input channels: make them the fastest column index
                matrix, leaf_stats = matrix[:, order], _permute_statistics(leaf_stats, order)
            pruned, keep = prune_matrix(matrix, leaf_stats, sparsity=sparsity, n=n, m=m, name=name,
                                        count=counts.get(path))
            if reconstruct:
                pruned = _reconstruct(pruned, matrix, keep, leaf_stats, reconstruct_damp, name)
            if order is not None:
                inverse = np.argsort(order)
                pruned, keep = pruned[:, inverse], keep[:, inverse]
            leaves[index] = like_leaf(leaf, from_matrix(pruned, jnp.asarray(leaf), stats[path]))
            mask_like = jax.ShapeDtypeStruct(tuple(leaf.shape), jnp.bool_)
            masks[index] = place_like(leaf, from_matrix(keep.astype(jnp.float32), mask_like, stats[path]))

    captures = sequential_capture(fn, plan.unflatten(leaves), [frozenset(g).__contains__ for g in groups], batches,
                                  params_argnum=params_argnum, hessian=hessian or reconstruct or dense_target,
                                  row_mask=row_mask, dense_params=dense_params)
    with captures:
        for group_index, group in enumerate(groups):
            stats = captures(group_index, plan.unflatten(leaves))
            if not sequential:
                _check_reached(plan, patterns, set(stats), method)
            prune_group(group, stats)
    return plan.unflatten(leaves), plan.unflatten(masks)




def _reconstruct(pruned, matrix, keep, stats, damp, name):
    from jaxcompress.oneshot.reconstruct import masked_least_squares

    hessian = np.asarray(stats.hessian, np.float32)
    return masked_least_squares(pruned, matrix, keep, hessian, damp=damp, name=name)


def owl_allocation(
    fn: Callable,
    plan: Any,
    leaves: list[Any],
    patterns: dict[str, tuple[int, Any, Any, Any]],
    batches: list[Any],
    settings: OWL,
    *,
    method: str,
    params_argnum: int,
    row_mask: Callable[[Any], Any] | None,
) -> dict[str, int]:
    """Per unstructured leaf path, how many weights OWL prunes there (see
    `jaxcompress.oneshot.allocation`): the leaves of each rule share its target, their counts add
    up to the rule's exact total. Wanda scores from ONE capture of the dense model (no Hessian)."""
    from jaxcompress.oneshot.capture import capture_statistics, to_matrix
    from jaxcompress.oneshot.wanda import wanda_scores

    unstructured = [path for path, (_, sparsity, _, _) in patterns.items() if sparsity is not None]
    if not unstructured:
        return {}
    for path in unstructured:
        rule = plan.rules[_rule_of(plan, patterns[path][0])]
        if rule.distribution != "uniform":
            raise ValueError(
                f"{plan.names[patterns[path][0]]}: {method} allocation='owl' replaces the rule's distribution; "
                f"PruneRule(pattern={rule.pattern!r}) has distribution={rule.distribution!r} (use 'uniform')"
            )
    stats = capture_statistics(fn, plan.unflatten(leaves), batches, frozenset(unstructured).__contains__,
                               params_argnum=params_argnum, hessian=False, row_mask=row_mask)
    _check_reached(plan, {p: patterns[p] for p in unstructured}, set(stats), method)
    by_rule: dict[int, list[str]] = {}
    for path in unstructured:
        by_rule.setdefault(_rule_of(plan, patterns[path][0]), []).append(path)
    counts: dict[str, int] = {}
    for paths in by_rule.values():
        target = float(patterns[paths[0]][1])
        keys = layer_keys(paths, settings)
        layers = list(dict.fromkeys(keys))
        sizes = {p: int(np.prod(leaves[patterns[p][0]].shape)) for p in paths}
        scores: dict[str, list[np.ndarray]] = {key: [] for key in layers}
        for path, key in zip(paths, keys):
            matrix = to_matrix(jnp.asarray(leaves[patterns[path][0]]), stats[path])
            scores[key].append(np.asarray(wanda_scores(matrix, jnp.asarray(stats[path].sq_norms, jnp.float32))))
        layer_sizes = [sum(sizes[p] for p, k in zip(paths, keys) if k == key) for key in layers]
        layer_counts, _ = owl_counts([scores[key] for key in layers], layer_sizes, target, settings)
        for key, total in zip(layers, layer_counts):
            members = [p for p, k in zip(paths, keys) if k == key]
            member_sizes = np.array([sizes[p] for p in members])
            split = largest_remainder(total * member_sizes / member_sizes.sum(), int(total), member_sizes)
            counts.update({p: int(c) for p, c in zip(members, split)})
    return counts


def _rule_of(plan: Any, index: int) -> int:
    return next(r for r, group in enumerate(plan.groups) if index in group)
