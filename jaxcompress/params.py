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

from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.execute.layout import default_layout
from jaxcompress.qarray import QArray
from jaxcompress.quant.codec import to_grouped
from jaxcompress.quant.arrays import quantize, quantize_with_range
from jaxcompress.quant.plan import LeafDecision, QuantizeReport, plan_quantization
from jaxcompress.rules import QuantRule

__all__ = ["quantize_params", "dequantize_params", "QuantizeReport", "LeafDecision"]


def quantize_params(
    params: Any,
    rules: Sequence[QuantRule] | QuantRule,
    *,
    ranges: dict[str, tuple[Any, Any]] | None = None,
    on_unused: Literal["warn", "error", "ignore"] = "warn",
    layout: Literal["auto", "logical"] = "auto",
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
      layout: how the integer codes are stored. ``"auto"`` (default): integer-mode
        (``activation="dynamic"`` / ``"static"``) 2-D Flax kernels (leaves named ``kernel``,
        ``(in, out)``) keep their codes ``(out, in)`` (`QArray.stored_permutation` ``(1, 0)``),
        the layout XLA's integer dot runs several times faster in `jaxcompress.compressed`;
        shapes, scales and dequantized values are the same (see
        `jaxcompress.execute.layout`). ``"logical"``: every `QArray` stores its codes in the
        array's own axis order.

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
    >>> w8a8 = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]
    >>> q = jc.quantize_params(params, w8a8)[0]["dense"]["kernel"]
    >>> q.shape, q.values.shape, q.stored_permutation    # codes stored (out, in)
    ((4, 3), (3, 4), (1, 0))
    """
    if layout not in ("auto", "logical"):
        raise ValueError(f"quantize_params: layout {layout!r} is not 'auto' or 'logical'")
    plan = plan_quantization(params, rules, on_unused=on_unused)
    if ranges is not None:
        unknown = set(ranges) - set(plan.quantized)
        if unknown:
            raise ValueError(f"clip ranges given for paths the rules do not quantize: {sorted(unknown)}")
    new_leaves = list(plan.leaves)
    for leaf in plan:
        value = new_leaves[leaf.position]
        if ranges is None:
            new_leaves[leaf.position] = quantize(value, leaf.rule.spec, name=leaf.name)
        else:
            new_leaves[leaf.position] = _quantize_in_range(value, leaf.spec, ranges, leaf.path_str, leaf.name)
        if layout == "auto":
            q = new_leaves[leaf.position]
            new_leaves[leaf.position] = q.with_layout(default_layout(leaf.path_str, q))
    return plan.unflatten(new_leaves), plan.report()


def _quantize_in_range(leaf, resolved, ranges, path_str: str, name: str) -> QArray:
    if path_str not in ranges:
        raise ValueError(f"{name}: no clip range given for this leaf")
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
