"""The integer-execution rule set: `QArray` weights as `WeightView`\\ s on the program layer.

Under `jaxcompress.compressed` (and activation calibration) each `QArray` leaf enters the traced
program as a `WeightView` (kind ``"weight"``). The rules:

* layout ops (``transpose``, ``reshape``, ``broadcast_in_dim``, ``squeeze``, ``slice``,
  ``convert_element_type`` to a float, ``copy``) give another `WeightView`
  (`WEIGHT_LAYOUT_RULES`; an op the view cannot follow dequantizes, which is always correct);
* ``dot_general`` / ``conv_general_dilated`` run the quantized op of the weight's activation mode
  (`dot_with_weight`, `conv_with_weight`);
* call-like bodies are inlined and ``scan`` / ``cond`` / ``while`` rebuilt by the program layer; a
  weight stacked along a scan's ``xs`` travels as codes + scales (`unstack`) and stays quantized
  inside the body; a weight in a loop carry is dequantized;
* anything else gets the dequantized weight (e.g. an embedding ``gather``).

With ``ExecutionOptions.observe_activations`` the dot / conv rules also record the activation each
weight meets (``max|x|`` and, as asked, a percentile or a histogram) as observations keyed by the
weight's leaf index: that is how `calibrate_activations` runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcompress._program import PLAIN, Evaluator, RuleSet, bind
from jaxcompress._program.trace import TraceCache, leaf_name, params_path, trace_call
from jaxcompress.execute.conv import conv_with_weight
from jaxcompress.execute.dot import dot_with_weight
from jaxcompress.execute.policy import PATCHES, ExecutionPolicy, choose_mode, site_choice
from jaxcompress.execute.weight_view import WeightView
from jaxcompress.qarray import InvalidQArrayError, QArray, check_qarray

__all__ = [
    "ExecutionOptions", "WEIGHT_LAYOUT_RULES", "VIEW_LAYOUT", "follow_layout", "weight_rules", "run_with_qarrays",
    "record_sites", "unstack_view",
]


@dataclasses.dataclass(frozen=True)
class ExecutionOptions:
    r"""How the integer-execution rules run (the evaluator's ``context``).

    Attributes:
      on_unsupported: ``"error"`` raises `UnsupportedQuantizedOp` where an integer mode cannot
        run; ``"dequantize"`` falls back to the weight-only float op there.
      weight_only: run every quantized weight weight-only (calibration does).
      observe_activations: ``observe(evaluator, view, x, reduce_axes)`` called with every
        activation that meets a quantized weight in a dot / conv (it records observations).
      policy: an `ExecutionPolicy` choosing the path of each site (integer, weight-only,
        ``"integer_bf16"`` at dots, ``"integer_im2col"`` at native s8 convs) (``None``: the
        weight's own mode).
      record: a list the per-site `SiteChoice`\ s are appended to while tracing (or ``None``).
      plan: ``{weight path: (path, reason)}`` of a tuned policy (``ExecutionPolicy("tune")``,
        `jaxcompress.execute.tune`), filled in by `compressed` before the program runs.
    """

    on_unsupported: str = "error"
    weight_only: bool = False
    observe_activations: Callable[[Evaluator, WeightView, jax.Array, tuple], None] | None = None
    policy: ExecutionPolicy | None = None
    record: list | None = None
    plan: Any = None


def _classify(value: Any) -> str:
    return "weight" if isinstance(value, WeightView) else PLAIN


def _materialize(value: WeightView, aval: Any) -> jax.Array:
    return value.dequantize(getattr(aval, "dtype", None))


def unstack_view(view: WeightView) -> tuple[Any, Callable[[Any], WeightView]]:
    """A view stacked along axis 0 as ``scan`` ``xs``: codes, scale, zero point and input scale of
    full size along axis 0 (so ``lax.scan`` can slice them), and how to rebuild one layer's view.
    A pending transpose that keeps the stacked axis first stays pending (stored codes are sliced
    as they are, e.g. layers stored ``(layers, out, in)`` for the integer dot)."""
    permutation = view.permutation
    if permutation is not None and permutation[0] == 0:
        layer_permutation = tuple(a - 1 for a in permutation[1:])
        view = dataclasses.replace(view, permutation=None)
    else:
        view, layer_permutation = view.materialize(), None
    length = view.values.shape[0]

    def full(array):
        if array is None or array.shape[0] == length:
            return array
        return jnp.broadcast_to(array, (length,) + array.shape[1:])

    scale, zero_point = view.full_scale([0])
    arrays = (view.values, full(scale), full(zero_point), full(view.input_scale))

    def rebuild(sliced):
        values, scale, zero_point, input_scale = sliced
        return dataclasses.replace(
            view, values=values, scale=scale, zero_point=zero_point, input_scale=input_scale, permutation=layer_permutation,
            # the stacked axis 0 is gone (a ragged axis 0 itself was expanded by full_scale above)
            ragged=None if view.ragged is None or view.ragged[0] == 0 else (view.ragged[0] - 1, view.ragged[1]),
        )

    return arrays, rebuild


def _mode(ev: Evaluator, primitive: str, x, view: WeightView, params: dict, side: str = "rhs") -> tuple:
    """``(mode, carrier)`` of a site (`choose_mode`; ``(None, None)``: the weight's own mode)."""
    context = ev.context
    if context.weight_only:
        return "weight_only", None
    if context.policy is None:
        return None, None
    mode, carrier, reason = choose_mode(context.policy, primitive, x, view, params, side, plan=context.plan)
    if context.record is not None:
        context.record.append(site_choice(primitive, x.shape, view, params, mode, reason, carrier))
    return mode, carrier


def _observer(ev: Evaluator):
    observe = ev.context.observe_activations
    return None if observe is None else (lambda view, x, axes: observe(ev, view, x, axes))


def _dot(ev: Evaluator, eqn, invals: list) -> list:
    lhs, rhs = invals
    if isinstance(lhs, WeightView) and isinstance(rhs, WeightView):
        lhs = ev.plain(lhs, eqn.invars[0].aval)
    x, view, side = (rhs, lhs, "lhs") if isinstance(lhs, WeightView) else (lhs, rhs, "rhs")
    params = eqn.params
    mode, carrier = _mode(ev, "dot_general", x, view, params, side)
    out = dot_with_weight(
        x,
        view,
        params["dimension_numbers"],
        weight_side=side,
        out_dtype=eqn.outvars[0].aval.dtype,
        mode=mode,
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
        on_activation=_observer(ev),
        on_unsupported=ev.context.on_unsupported,
        carrier=carrier,
    )
    return [out]


def _conv(ev: Evaluator, eqn, invals: list) -> list:
    lhs, rhs = invals
    if isinstance(lhs, WeightView) or not isinstance(rhs, WeightView):
        return bind(eqn, ev.plain_inputs(eqn, invals))  # a quantized conv INPUT is not a kernel
    mode, form = _mode(ev, "conv_general_dilated", lhs, rhs, eqn.params)
    out = conv_with_weight(
        lhs,
        rhs,
        eqn.params,
        out_dtype=eqn.outvars[0].aval.dtype,
        mode=mode,
        on_activation=_observer(ev),
        on_unsupported=ev.context.on_unsupported,
        im2col=form == PATCHES,
    )
    return [out]


def _layout(apply: Callable[[WeightView, dict], WeightView | None]):
    def rule(ev: Evaluator, eqn, invals: list) -> list:
        view = invals[0]
        if isinstance(view, WeightView) and not any(isinstance(v, WeightView) for v in invals[1:]):
            result = apply(view, eqn.params)
            if result is not None:
                return [result]
        return bind(eqn, ev.plain_inputs(eqn, invals))

    return rule


def _reshape(view: WeightView, params: dict) -> WeightView | None:
    if params.get("dimensions") is not None:
        return None
    return view.reshape(params["new_sizes"])


# How a `WeightView` follows each layout op (``None``: it cannot; the weight is dequantized).
VIEW_LAYOUT: dict[str, Callable[[WeightView, dict], WeightView | None]] = {
    "copy": lambda view, params: view,
    "copy_p": lambda view, params: view,
    "transpose": lambda view, params: view.transpose(params["permutation"]),
    "reshape": _reshape,
    "broadcast_in_dim": lambda view, p: view.broadcast_in_dim(p["shape"], p["broadcast_dimensions"]),
    "squeeze": lambda view, params: view.squeeze(params["dimensions"]),
    "convert_element_type": lambda view, params: view.astype(params["new_dtype"]),
    "slice": lambda view, p: view.slice(p["start_indices"], p["limit_indices"], p.get("strides")),
}

WEIGHT_LAYOUT_RULES = {(name, "weight"): _layout(apply) for name, apply in VIEW_LAYOUT.items()}


def follow_layout(view: WeightView, layout) -> WeightView | None:
    """``view`` through the layout ops ``((primitive name, params), ...)`` a weight met on its way
    to a site (`jaxcompress.execute.hooks.DotSite.layout`); ``None`` if the view cannot follow
    one of them."""
    for name, params in layout:
        apply = VIEW_LAYOUT.get(name)
        result = None if apply is None else apply(view, params)
        if result is None:
            return None
        view = result
    return view


def weight_rules(*, observes: bool = False) -> RuleSet:
    """The integer-execution `RuleSet` (``observes`` when activations are recorded)."""
    return RuleSet(
        kinds=("weight",),
        classify=_classify,
        rules={
            **WEIGHT_LAYOUT_RULES,
            ("dot_general", "weight"): _dot,
            ("conv_general_dilated", "weight"): _conv,
        },
        materialize=_materialize,
        unstack=unstack_view,
        observes=observes,
    )


_RULES = weight_rules()
_OBSERVING_RULES = weight_rules(observes=True)


def run_with_qarrays(
    fn: Callable,
    args: tuple,
    kwargs: dict,
    options: ExecutionOptions,
    cache: TraceCache | None = None,
) -> tuple[Any, dict]:
    """Run ``fn(*args, **kwargs)`` with its `QArray` leaves executed as quantized weights;
    returns ``(outputs, observations)``."""
    traced = trace_call(fn, args, kwargs, cache)
    inputs = []
    for position in traced.dynamic_positions:
        leaf = traced.leaves[position]
        if isinstance(leaf, QArray):
            path = traced.paths[position]
            try:  # a hand-built or derived QArray must be a real one before its codes are used
                check_qarray(leaf, strict=True)
            except InvalidQArrayError as error:
                raise InvalidQArrayError(f"{leaf_name(path)}: {error}") from None
            leaf = WeightView.from_qarray(
                leaf, name=leaf_name(path), leaf_index=position, path=params_path(path, 0) or leaf_name(path)
            )
        inputs.append(leaf)
    rules = _RULES if options.observe_activations is None else _OBSERVING_RULES
    evaluator = Evaluator(rules, context=options)
    outs = evaluator.run_plain(traced.closed.jaxpr, traced.closed.consts, inputs)
    return jax.tree_util.tree_unflatten(traced.out_tree, outs), evaluator.observations


def record_sites(fn: Callable, args: tuple, kwargs: dict, options: ExecutionOptions, cache: TraceCache | None = None) -> list:
    """The `SiteChoice`\\ s of ``fn(*args, **kwargs)`` under ``options`` (traced abstractly: only
    the array leaves are abstract; Python values such as ``train=False`` or a string stay as
    they are, as `run_with_qarrays` passes them)."""
    traced = trace_call(fn, args, kwargs, cache)
    record: list = []
    recording = dataclasses.replace(options, record=record)

    def call(*dynamic):
        call_args, call_kwargs = traced.call_args(dynamic)
        return run_with_qarrays(fn, call_args, call_kwargs, recording, cache)[0]

    jax.eval_shape(call, *[traced.leaves[p] for p in traced.dynamic_positions])
    return record
