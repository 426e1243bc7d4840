"""Pytree transforms: quantize / dequantize a whole params tree with rules.

`quantize_params` works on any pytree (dicts, flax linen ``params``, nnx ``State``, lists,
NamedTuples, dataclass pytrees) and returns the same structure with `QArray` nodes where a rule
matched, together with a `QuantizeReport` saying what happened to every leaf.

Leaves a rule matched but that cannot be quantized are SKIPPED, not errors, and the report says
why: integer and bool leaves (step counters, embedding ids, masks), non-array leaves, zero-size
leaves (nothing to calibrate) and leaves that already are `QArray`s. This keeps catch-all rules such as ``".*"`` usable on trees that mix
float weights with bookkeeping. A float leaf that does not fit its rule (bad axis, group size not
dividing the axis, NaN/Inf) IS an error naming the leaf's path; nothing is returned in that case.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.qarray import QArray
from jaxcompress.quant.codec import to_grouped
from jaxcompress.quant.quantize import quantize, quantize_with_range
from jaxcompress.rules import LeafDecisions, QuantRule, check_unused_rules, match_rules, normalize_rules, path_to_keystr

__all__ = ["quantize_params", "dequantize_params", "QuantizeReport", "LeafDecision"]


@dataclasses.dataclass(frozen=True)
class LeafDecision:
    """What `quantize_params` did with one leaf.

    Attributes:
      path: the ``/``-joined path string.
      shape / dtype: of the input leaf (``None`` for non-array leaves).
      action: ``"quantized"``, ``"skipped"`` (a rule matched but the leaf was left alone) or
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
            "unused_rules": [
                {"index": i, "pattern": self.rule_patterns[i]} for i in self.unused_rules
            ],
        }


def _skip_reason(leaf: Any) -> str | None:
    if isinstance(leaf, QArray):
        return "already quantized"
    if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
        return f"not an array ({type(leaf).__name__})"
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return f"non-float dtype {jnp.dtype(leaf.dtype).name}"
    if 0 in tuple(leaf.shape):
        return f"zero-size array of shape {tuple(leaf.shape)}"
    return None


def quantize_params(
    params: Any,
    rules: Sequence[QuantRule] | QuantRule,
    *,
    ranges: dict[str, tuple[Any, Any]] | None = None,
    on_unused: str = "warn",
) -> tuple[Any, QuantizeReport]:
    """Quantize the leaves of ``params`` that ``rules`` select.

    Args:
      params: any pytree of arrays.
      rules: `QuantRule`s; for each leaf the first whose pattern fully matches its path wins.
      ranges: optional clip ranges ``{path string: (lo, hi)}`` in the `QArray` scale layout, used
        instead of calibrating: this is how QAT converts (``ranges=jc.qat_ranges(opt_state)``),
        giving integers that dequantize exactly to what ``fake_quant(..., ranges=...)`` computed.
      on_unused: what to do about rules that matched no leaf: ``"warn"`` (default), ``"error"``
        or ``"ignore"``. They are always listed in the report.

    Returns:
      ``(qparams, report)``: the same tree structure with `QArray` nodes for quantized leaves,
      and a `QuantizeReport`.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "step": jnp.array(0)}
    >>> rules = [jc.QuantRule(pattern=r".*kernel", bits=8, channel_axes=(-1,))]
    >>> qparams, report = jc.quantize_params(params, rules)
    >>> type(qparams["dense"]["kernel"]).__name__, report.quantized, report.unmatched
    ('QArray', ('dense/kernel',), ('dense/bias', 'step'))
    >>> jc.dequantize_params(qparams)["dense"]["kernel"].shape
    (4, 3)
    """
    rules = normalize_rules(rules)
    for i, rule in enumerate(rules):
        if not isinstance(rule, QuantRule):
            raise TypeError(f"rules[{i}] is a {type(rule).__name__}, expected a QuantRule")
    matched = match_rules(params, rules)
    check_unused_rules(rules, matched.unused_rules, on_unused)
    if ranges is not None:
        unknown = set(ranges) - {
            p for p, i, leaf in zip(matched.path_strs, matched.rule_indices, matched.leaves)
            if i is not None and not rules[i].skip and _skip_reason(leaf) is None
        }
        if unknown:
            raise ValueError(f"clip ranges given for paths the rules do not quantize: {sorted(unknown)}")
    new_leaves = []
    decisions = []
    for path, path_str, leaf, index in zip(
        matched.paths, matched.path_strs, matched.leaves, matched.rule_indices
    ):
        shape = tuple(leaf.shape) if hasattr(leaf, "shape") else None
        dtype = jnp.dtype(leaf.dtype).name if hasattr(leaf, "dtype") and not isinstance(leaf, QArray) else None
        if index is None:
            decisions.append(LeafDecision(path_str, shape, dtype, "unmatched"))
            new_leaves.append(leaf)
            continue
        rule = rules[index]
        reason = "rule says skip" if rule.skip else _skip_reason(leaf)
        if reason is not None:
            decisions.append(LeafDecision(path_str, shape, dtype, "skipped", index, reason))
            new_leaves.append(leaf)
            continue
        spec = rule.spec
        name = path_to_keystr(path)
        if ranges is None:
            new_leaves.append(quantize(leaf, spec, name=name))
        else:
            new_leaves.append(_quantize_in_range(leaf, spec, ranges, path_str, name))
        decisions.append(LeafDecision(path_str, shape, dtype, "quantized", index, spec=spec.describe()))
    report = QuantizeReport(tuple(decisions), matched.unused_rules, tuple(r.pattern for r in rules))
    return matched.unflatten(new_leaves), report


def _quantize_in_range(leaf, spec, ranges, path_str: str, name: str) -> QArray:
    if path_str not in ranges:
        raise ValueError(f"{name}: no clip range given for this leaf")
    resolved = spec.resolve(tuple(leaf.shape), name)
    if not isinstance(leaf, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(leaf))):
        raise ValueError(f"{name}: contains NaN or Inf; quantization needs finite values")
    lo, hi = (to_grouped(jnp.asarray(a, jnp.float32), resolved) for a in ranges[path_str])
    expected = resolved.grouped_shape(tuple(leaf.shape))
    reduce_axes = resolved.reduce_axes(len(leaf.shape))
    expected = tuple(1 if a in reduce_axes else d for a, d in enumerate(expected))
    if tuple(lo.shape) != expected or tuple(hi.shape) != expected:
        raise ValueError(f"{name}: clip range does not fit the rule's granularity (expected the QArray scale shape)")
    return quantize_with_range(jnp.asarray(leaf), lo, hi, resolved)


def dequantize_params(qparams: Any, dtype: Any = None) -> Any:
    """Replace every `QArray` in ``qparams`` with its dequantized float array.

    ``dtype`` overrides the original dtype recorded in each `QArray`.
    """
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if isinstance(x, QArray) else x,
        qparams,
        is_leaf=lambda x: isinstance(x, QArray),
    )
