"""From rules to per-leaf quantization decisions for a whole params tree, validated once.

`plan_quantization` checks that every rule is a `QuantRule` (the one place that check lives),
matches the rules against the leaves (first full match wins), decides for each leaf whether it
is quantized, skipped (and why) or unmatched, and resolves and validates each quantized leaf's
`QuantSpec` against its shape (errors name the leaf). It needs only shapes and dtypes, so it
works on abstract params (``jax.ShapeDtypeStruct``) too. `quantize_params`, `fake_quant`,
`init_lsq_steps`, `qat`, `gptq`, `awq`, `smoothquant` and `mixed_precision` all consume a
`QuantPlan` instead of matching rules themselves (as pruning does with `plan_pruning`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax.numpy as jnp

from jaxcompress.qarray import QArray
from jaxcompress.quant.spec import ResolvedSpec
from jaxcompress.rules import LeafDecisions, QuantRule, RuleMatch, check_unused_rules, match_rules, normalize_rules, path_to_keystr

__all__ = ["LeafDecision", "QuantizeReport", "QuantPlan", "PlannedLeaf", "plan_quantization", "as_quant_rules"]


@dataclasses.dataclass(frozen=True)
class LeafDecision:
    """What happens to one leaf.

    Attributes:
      path: the ``/``-joined path string.
      shape / dtype: of the input leaf (``None`` for non-array leaves).
      action: ``"quantized"``, ``"skipped"`` (a rule matched but the leaf is left alone) or
        ``"unmatched"`` (no rule matched).
      rule_index: index of the matching rule, or ``None``.
      reason: for skipped leaves, why.
      spec: the rule's `QuantSpec` description for quantized leaves, else ``""``.
    """

    path: str
    shape: tuple[int, ...] | None
    dtype: str | None
    action: str
    rule_index: int | None = None
    reason: str = ""
    spec: str = ""


@dataclasses.dataclass(frozen=True)
class QuantizeReport(LeafDecisions):
    """Per-leaf decisions and the rules that matched nothing (static data, jit-safe)."""

    leaves: tuple[LeafDecision, ...]
    unused_rules: tuple[int, ...]
    rule_patterns: tuple[str, ...]

    @property
    def quantized(self) -> tuple[str, ...]:
        return self.paths_with("quantized")

    def to_dict(self) -> dict[str, Any]:
        return {
            "leaves": [dataclasses.asdict(d) for d in self.leaves],
            "unused_rules": [{"index": i, "pattern": self.rule_patterns[i]} for i in self.unused_rules],
        }


@dataclasses.dataclass(frozen=True)
class PlannedLeaf:
    """One leaf the plan quantizes: where it is, its rule and its resolved spec."""

    position: int  # index among the flattened leaves
    path_str: str
    name: str  # ``params['dense']['kernel']`` for error messages
    rule: QuantRule
    spec: ResolvedSpec


def skip_reason(leaf: Any) -> str | None:
    """Why a leaf a rule matched cannot be quantized (``None``: it can)."""
    if isinstance(leaf, QArray):
        return "already quantized"
    if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
        return f"not an array ({type(leaf).__name__})"
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return f"non-float dtype {jnp.dtype(leaf.dtype).name}"
    if 0 in tuple(leaf.shape):
        return f"zero-size array of shape {tuple(leaf.shape)}"
    return None


def as_quant_rules(rules: Sequence[QuantRule] | QuantRule) -> tuple[QuantRule, ...]:
    """``rules`` as a tuple of `QuantRule` (a single rule is accepted); anything else is a
    ``TypeError`` naming its index."""
    rules = normalize_rules(rules)
    for i, rule in enumerate(rules):
        if not isinstance(rule, QuantRule):
            raise TypeError(f"rules[{i}] is a {type(rule).__name__}, expected a QuantRule")
    return rules


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """The validated decisions of `plan_quantization` (static data; the leaves are the ones
    planned on, abstract or concrete)."""

    rules: tuple[QuantRule, ...]
    match: RuleMatch
    decisions: tuple[LeafDecision, ...]
    planned: tuple[PlannedLeaf, ...]

    @property
    def leaves(self) -> tuple:
        return self.match.leaves

    @property
    def quantized(self) -> tuple[str, ...]:
        """Paths of the leaves the plan quantizes, in flattening order."""
        return tuple(p.path_str for p in self.planned)

    def __contains__(self, path_str: object) -> bool:
        return path_str in self._by_path

    def __getitem__(self, path_str: str) -> PlannedLeaf:
        return self._by_path[path_str]

    def __iter__(self) -> Iterator[PlannedLeaf]:
        return iter(self.planned)

    @property
    def _by_path(self) -> dict[str, PlannedLeaf]:
        return {p.path_str: p for p in self.planned}

    def report(self, describe_suffix: dict[str, str] | None = None) -> QuantizeReport:
        """The plan as a `QuantizeReport` (``describe_suffix`` appends a method's note to the
        spec of some leaves, e.g. ``" gptq"``)."""
        decisions = self.decisions
        if describe_suffix:
            decisions = tuple(
                dataclasses.replace(d, spec=d.spec + describe_suffix[d.path]) if d.path in describe_suffix else d for d in decisions
            )
        return QuantizeReport(decisions, self.match.unused_rules, tuple(r.pattern for r in self.rules))

    def unflatten(self, leaves) -> Any:
        return self.match.unflatten(leaves)


def plan_quantization(params: Any, rules: Sequence[QuantRule] | QuantRule, *, on_unused: str = "warn") -> QuantPlan:
    """Match and validate ``rules`` against ``params`` once (see the module docs).

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32), "bias": jnp.zeros(3)}, "step": jnp.array(0)}
    >>> plan = plan_quantization(params, [jc.QuantRule(pattern=r".*kernel", bits=4, channel_axes=(-1,)),
    ...                                   jc.QuantRule(pattern=r"step")])
    >>> plan.quantized, plan["dense/kernel"].spec.bits
    (('dense/kernel',), 4)
    >>> [(d.path, d.action, d.reason) for d in plan.decisions]
    [('dense/bias', 'unmatched', ''), ('dense/kernel', 'quantized', ''), ('step', 'skipped', 'non-float dtype int32')]
    """
    rules = as_quant_rules(rules)
    matched = match_rules(params, rules)
    check_unused_rules(rules, matched.unused_rules, on_unused)
    decisions, planned = [], []
    for position, (path, path_str, leaf, index) in enumerate(zip(matched.paths, matched.path_strs, matched.leaves, matched.rule_indices)):
        shape = tuple(leaf.shape) if hasattr(leaf, "shape") else None
        dtype = jnp.dtype(leaf.dtype).name if hasattr(leaf, "dtype") and not isinstance(leaf, QArray) else None
        if index is None:
            decisions.append(LeafDecision(path_str, shape, dtype, "unmatched"))
            continue
        rule = rules[index]
        reason = "rule says skip" if rule.skip else skip_reason(leaf)
        if reason is not None:
            decisions.append(LeafDecision(path_str, shape, dtype, "skipped", index, reason))
            continue
        name = path_to_keystr(path)
        assert shape is not None  # a leaf with no reason to skip is an array
        resolved = rule.spec.resolve(shape, name)  # validates the spec against the leaf, naming it
        planned.append(PlannedLeaf(position, path_str, name, rule, resolved))
        decisions.append(LeafDecision(path_str, shape, dtype, "quantized", index, spec=rule.spec.describe()))
    return QuantPlan(rules, matched, tuple(decisions), tuple(planned))
