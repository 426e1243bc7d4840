"""From rules to masks for a whole params tree.

`plan_pruning` matches `PruneRule`s against the leaves (first full match wins), checks every
pruned leaf against its rule (N:M divisibility, block sizes, ...; errors name the leaf's path)
and returns a `PrunePlan`: the per-leaf decisions as static data plus `PrunePlan.masks`, a pure
jit-able function ``(params, grads, step, key) -> mask tree``. `prune_params` and `prune` are
both built on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence, cast

import jax
import jax.numpy as jnp
from optax import MaskedNode

from jaxcompress._checks import checked
from jaxcompress.pruning import masks as masks_lib
from jaxcompress.pruning import scores as scores_lib
from jaxcompress.pruning.distributions import erk_sparsities, uniform_sparsities
from jaxcompress.pruning.rule import PruneRule
from jaxcompress.pruning.topk import LazyScore, select_top_k
from jaxcompress.rules import LeafDecisions, check_unused_rules, match_rules, normalize_rules, path_to_keystr

__all__ = ["PruneDecision", "PrunePlan", "plan_pruning", "as_rules"]


@dataclasses.dataclass(frozen=True)
class PruneDecision:
    """What happens to one leaf: ``action`` is ``"pruned"``, ``"skipped"`` (matched, left dense,
    ``reason`` says why) or ``"unmatched"``; ``method`` is the rule's `PruneRule.describe`."""

    path: str
    shape: tuple[int, ...] | None
    dtype: str | None
    action: str
    rule_index: int | None = None
    reason: str = ""
    method: str = ""


def as_rules(rules: Any) -> tuple[PruneRule, ...]:
    """Accept a `PruneRule`, a sequence of them, or a ``{pattern: sparsity}`` mapping
    (layer-wise magnitude pruning for each pattern)."""
    if isinstance(rules, Mapping):
        rules = [PruneRule(pattern=pattern, sparsity=sparsity) for pattern, sparsity in rules.items()]
    rules = normalize_rules(rules)
    for i, rule in enumerate(rules):
        if not isinstance(rule, PruneRule):
            raise TypeError(f"rules[{i}] is a {type(rule).__name__}, expected a PruneRule")
    return rules


def _skip_reason(leaf: Any) -> str | None:
    if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape") or isinstance(leaf, MaskedNode):
        return f"not an array ({type(leaf).__name__})"
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return f"non-float dtype {jnp.dtype(leaf.dtype).name}"
    if len(leaf.shape) == 0:
        return "scalar"
    return None


def _check_leaf(rule: PruneRule, shape: tuple[int, ...], name: str) -> None:
    ndim = len(shape)
    if rule.structure == "n:m":
        axis = masks_lib.contracting_axis(ndim, name) if rule.axis is None else rule.axis
        if not -ndim <= axis < ndim:
            raise ValueError(f"{name}: N:M axis {axis} is out of range for shape {shape}")
        masks_lib.check_n_m(*rule.n_of_m, shape[axis], name)
    elif rule.structure == "channel":
        masks_lib.contracting_axis(ndim, name)
    elif rule.structure == "block":
        br, bc = masks_lib._block(rule.block_size)
        if ndim < 2 or br < 1 or bc < 1 or shape[-2] % br or shape[-1] % bc:
            raise ValueError(f"{name}: block size {(br, bc)} does not divide the last two dims of shape {shape}")


@dataclasses.dataclass(frozen=True)
class PrunePlan(LeafDecisions):
    """The static outcome of matching rules: per-leaf decisions and how to compute masks.

    Attributes:
      leaves: a `PruneDecision` per leaf, in flattening order.
      unused_rules: indices of rules that matched no leaf.
      rules: the rules.
      groups: per rule, the indices of the leaves it prunes.
    """

    leaves: tuple[PruneDecision, ...]
    unused_rules: tuple[int, ...]
    rules: tuple[PruneRule, ...]
    groups: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]
    treedef: Any

    @property
    def pruned(self) -> tuple[str, ...]:
        return self.paths_with("pruned")

    @property
    def pruned_indices(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.leaves) if d.action == "pruned")

    @property
    def needs_grads(self) -> bool:
        return any(self.rules[r].score == "saliency" for r, g in enumerate(self.groups) if g)

    def to_dict(self) -> dict[str, Any]:
        return {
            "leaves": [dataclasses.asdict(d) for d in self.leaves],
            "unused_rules": [{"index": i, "pattern": self.rules[i].pattern} for i in self.unused_rules],
        }

    def leaves_of(self, tree: Any) -> list[Any]:
        leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=masks_lib.is_masked_node)
        if treedef != self.treedef:
            raise ValueError(f"tree structure {treedef} does not match the planned params {self.treedef}")
        return leaves

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

    def dense_masks(self, params: Any) -> Any:
        """All-True masks for the pruned leaves (`optax.MaskedNode()` elsewhere)."""
        leaves = self.leaves_of(params)
        pruned = set(self.pruned_indices)
        return self.unflatten(
            [jnp.ones_like(x, dtype=bool) if i in pruned else MaskedNode() for i, x in enumerate(leaves)]
        )

    def schedule_faults(self, step: Any) -> dict[int, jax.Array]:
        """Per pruned leaf index whose rule's sparsity is a schedule: whether that schedule gives
        NaN or a value outside ``[0, 1)`` at ``step`` (a bool scalar; computed, never raised)."""
        out: dict[int, jax.Array] = {}
        for rule_index, group in enumerate(self.groups):
            rule = self.rules[rule_index]
            if group and rule.structure != "n:m" and callable(rule.sparsity):
                value = jnp.asarray(rule.sparsity_at(step), jnp.float32)
                if value.shape != ():
                    raise ValueError(
                        f"PruneRule(pattern={rule.pattern!r}): a sparsity schedule must return a scalar, "
                        f"got shape {value.shape}"
                    )
                bad = ~(jnp.isfinite(value) & (value >= 0.0) & (value < 1.0))
                out.update((i, bad) for i in group)
        return out

    def target_sparsities(self, step: Any = 0, *, check: bool = True) -> dict[int, jax.Array]:
        """Per pruned leaf index, the sparsity its rule asks for at ``step`` (after distribution).

        A schedule that gives NaN or a value outside ``[0, 1)`` raises a ValueError naming the
        rule: at once when the value is concrete, when the computation runs under ``jit``.
        ``check=False`` leaves traced values unchecked (no host callback in the program; the
        caller checks them, as `prune` does with `schedule_faults`)."""
        out: dict[int, jax.Array] = {}
        for rule_index, group in enumerate(self.groups):
            rule = self.rules[rule_index]
            if not group:
                continue
            if rule.structure == "n:m":
                for i in group:
                    n, m = rule.n_of_m
                    out[i] = jnp.float32(1.0 - n / m)
                continue
            target = jnp.asarray(rule.sparsity_at(step), jnp.float32)
            if callable(rule.sparsity) and (check or not isinstance(target, jax.core.Tracer)):
                target = _check_scheduled(rule, target, step)
            shapes = [cast("tuple[int, ...]", self.leaves[i].shape) for i in group]  # pruned: arrays
            spread = erk_sparsities if rule.distribution == "erk" else uniform_sparsities
            for i, value in zip(group, spread(shapes, target)):
                out[i] = value
        return out

    def masks(
        self, params: Any, grads: Any = None, *, step: Any = 0, key: jax.Array | None = None, check: bool = True
    ) -> Any:
        """The mask tree for ``params`` at ``step`` (pure; jit-able with traced step and key).

        All leaves' top-k selections share one bisection loop (`topk.top_k_masks`). ``check``:
        as in `target_sparsities`.
        """
        leaves = self.leaves_of(params)
        grad_leaves = None if grads is None else self.leaves_of(grads)
        out: list[Any] = [MaskedNode()] * len(leaves)
        sparsities = self.target_sparsities(step, check=check)
        groups, ks, finish = [], [], []
        for rule_index, group in enumerate(self.groups):
            if not group:
                continue
            rule = self.rules[rule_index]
            # Lazy scores: `select_top_k` recomputes them inside its counting passes, fused,
            # instead of materialising a param-sized array.
            scores = [self._scores(rule, i, leaves, grad_leaves, key) for i in group]
            if rule.structure == "n:m":
                for i, score in zip(group, scores):
                    out[i] = masks_lib.n_m_mask(score.evaluate(), *rule.n_of_m, axis=rule.axis, name=self.names[i])
            elif rule.scope == "global":
                if rule.normalize is not None:
                    # multiply by a reciprocal: a product rounds the same in every fusion that
                    # recomputes it (a division may not), which exact counting relies on
                    scores = [
                        _scaled(score, 1.0 / scores_lib.normalize_scale(score.evaluate(), rule.normalize))
                        for score in scores
                    ]
                total = sum(int(leaves[i].size) for i in group)
                groups.append(scores)
                ks.append(total - masks_lib.num_to_prune(sparsities[group[0]], total))
                finish.append([(i, lambda keep: keep) for i in group])
            else:
                for i, score in zip(group, scores):
                    if rule.structure == "unstructured":
                        unit_score, expand, n = score, (lambda keep: keep), int(leaves[i].size)
                    else:
                        unit_scores, expand = masks_lib.units(
                            score.evaluate(), rule.structure, block_size=rule.block_size, norm=rule.norm, name=self.names[i]
                        )
                        unit_score, n = unit_scores, int(unit_scores.size)
                    groups.append([unit_score])
                    ks.append(n - masks_lib.num_to_prune(sparsities[i], n))
                    finish.append([(i, expand)])
        if groups:
            for kept, targets in zip(select_top_k(groups, ks), finish):
                for keep, (i, expand) in zip(kept, targets):
                    out[i] = expand(keep)
        for i in self.pruned_indices:
            out[i] = _sharded_like(out[i], leaves[i])
        return self.unflatten(out)

    def _scores(self, rule, i, leaves, grad_leaves, key) -> LazyScore:
        """Leaf ``i``'s scores, computed on demand."""
        weights = leaves[i]
        if rule.score == "magnitude":
            return LazyScore(scores_lib.magnitude, (weights,))
        if rule.score == "saliency":
            if grad_leaves is None:
                raise ValueError(f"{self.names[i]}: score='saliency' needs gradients (pass grads=...)")
            grads = grad_leaves[i]
            if jnp.shape(grads) != jnp.shape(weights):
                raise ValueError(f"{self.names[i]}: grads of shape {jnp.shape(grads)} do not match the param's {jnp.shape(weights)}")
            return LazyScore(scores_lib.saliency, (weights, grads))
        if key is None:
            raise ValueError(f"{self.names[i]}: score='random' needs a PRNG key (pass key=...)")
        return LazyScore(_identity, (scores_lib.random_scores(jax.random.fold_in(key, i), jnp.shape(weights)),))


def _identity(x):
    return x


def _check_scheduled(rule: PruneRule, value: jax.Array, step: Any) -> jax.Array:
    """``value``, a scheduled sparsity checked to be in [0, 1) (the check rides on the value)."""
    where = f"PruneRule(pattern={rule.pattern!r})"
    if value.shape != ():
        raise ValueError(f"{where}: a sparsity schedule must return a scalar, got shape {value.shape}")
    ok = jnp.isfinite(value) & (value >= 0.0) & (value < 1.0)
    if not isinstance(ok, jax.core.Tracer):
        if not bool(ok):
            raise ValueError(f"{where}: schedule gives sparsity {float(value)} at step {step}; it must be in [0, 1)")
        return value
    return checked(
        value,
        ok,
        f"{where}: its sparsity schedule returned NaN or a value outside [0, 1) at a mask-update step; "
        "a schedule must return the fraction of zeros, in [0, 1)",
    )


def _scaled(score: LazyScore, factor: jax.Array) -> LazyScore:
    return LazyScore(lambda factor, *operands: score.fn(*operands) * factor, (factor, *score.operands))


def plan_pruning(params: Any, rules: Any, *, on_unused: str = "warn") -> PrunePlan:
    """Match ``rules`` against ``params`` and check every pruned leaf fits its rule.

    Matched leaves that cannot be pruned (integer/bool dtypes, scalars, non-arrays) are skipped
    with a reason; a float leaf that does not fit its rule is an error naming its path.

    >>> import jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}, "step": jnp.array(0)}
    >>> plan = plan_pruning(params, [PruneRule(pattern=r".*kernel", sparsity=0.5)])
    >>> plan.pruned, plan.unmatched
    (('dense/kernel',), ('dense/bias', 'step'))
    >>> int(plan.masks(params)["dense"]["kernel"].sum())
    16
    """
    rules = as_rules(rules)
    matched = match_rules(params, rules, is_leaf=masks_lib.is_masked_node)
    check_unused_rules(rules, matched.unused_rules, on_unused)
    decisions = []
    groups: list[list[int]] = [[] for _ in rules]
    names = []
    for i, (path, path_str, leaf, index) in enumerate(
        zip(matched.paths, matched.path_strs, matched.leaves, matched.rule_indices)
    ):
        name = path_to_keystr(path)
        names.append(name)
        shape = tuple(leaf.shape) if hasattr(leaf, "shape") else None
        dtype = jnp.dtype(leaf.dtype).name if hasattr(leaf, "dtype") else None
        if index is None:
            decisions.append(PruneDecision(path_str, shape, dtype, "unmatched"))
            continue
        rule = rules[index]
        reason = "rule says skip" if rule.skip else _skip_reason(leaf)
        if reason is not None:
            decisions.append(PruneDecision(path_str, shape, dtype, "skipped", index, reason))
            continue
        _check_leaf(rule, tuple(leaf.shape), name)  # not skipped: an array (see _skip_reason)
        groups[index].append(i)
        decisions.append(PruneDecision(path_str, shape, dtype, "pruned", index, method=rule.describe()))
    return PrunePlan(
        tuple(decisions), matched.unused_rules, rules, tuple(tuple(g) for g in groups), tuple(names), matched.treedef
    )


def _sharded_like(mask: Any, param: Any) -> Any:
    """With EXPLICIT mesh axes, give ``mask`` its param's sharding: a structured mask is expanded
    from a small per-unit vector, whose (replicated) sharding jax may carry into the mask, which
    would then differ from the param's (and from the previous mask in `prune`'s ``lax.switch``).
    With Auto axes (sharding propagation) this is a no-op."""
    try:
        sharding, current = jax.typeof(param).sharding, jax.typeof(mask).sharding
    except (TypeError, AttributeError):
        return mask
    axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
    if not any(t == jax.sharding.AxisType.Explicit for t in axis_types) or current == sharding:
        return mask
    return jax.sharding.reshard(mask, sharding)

