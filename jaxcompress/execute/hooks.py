"""Run an unmodified function with a hook at every dot / conv that a selected FLOAT weight feeds.

`compressed` finds where a `QArray` meets ``dot_general`` / ``conv_general_dilated`` with the
integer-execution rule set of the program layer. Training-time and calibration-time tools need
the same sites while the weights are still float: activation fake-quantization for W8A8 QAT must
fake-quantize exactly the activations `compressed` will quantize, and one-shot methods (GPTQ,
SmoothQuant, Wanda, ...) need statistics of the activation each weight multiplies.
`call_with_dot_hook` provides that as a second rule set (kind ``"hooked"``) on the SAME evaluator:
the params leaves ``select`` picks are followed through the same layout ops (`LAYOUT`), into the
same inlined call-like bodies (`CALL_LIKE`) and into ``scan`` / ``cond`` / ``while`` bodies rebuilt
by the same control-flow rules (a weight stacked along a scan's ``xs`` is seen one layer at a
time, ``DotSite.stacked`` says so), and where one reaches a ``dot_general`` (the other operand
not a selected weight) or is the kernel of a ``conv_general_dilated``,
``hook(site, activation, weight)`` runs and its return value replaces the activation. Everything
else is bound unchanged, so the hooked function is differentiable (``jax.grad`` through a hook
that is differentiable) and jit-able. Statistics a hook collects are observations of the
evaluator (``observations=True``), returned as outputs, never Python state appended from inside a
traced body.

Not seen (as for `compressed`'s integer path): ``shard_map`` / ``pmap`` bodies, a weight carried
through a loop carry, and any op other than the layout ops and the two contractions (e.g. an
embedding ``gather``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax

from jaxcompress._program import LAYOUT, PLAIN, Evaluator, FlatProgram, RuleSet, TraceCache, bind, flatten_call, params_path, trace_call
from jaxcompress.qarray import QArray

__all__ = ["DotSite", "call_with_dot_hook", "hook_rules", "FlatProgram", "flatten_call", "tag_inputs", "run_steps", "untag", "retag"]


@dataclasses.dataclass(frozen=True)
class DotSite:
    """Where a selected weight meets a contraction.

    Attributes:
      path: the weight's ``/``-joined path inside the params argument (as rules see it).
      primitive: ``"dot_general"`` or ``"conv_general_dilated"``.
      weight_side: ``"lhs"`` or ``"rhs"`` (always ``"rhs"`` for a conv).
      params: the equation's parameters (``dimension_numbers``, conv strides, ...).
      layout: the layout ops applied to the leaf on its way, ``((primitive, params), ...)``.
      activation_contracting_axes: the activation's contracted axes (a dot), or its feature axis
        (a conv).
      activation_reduce_axes: the axes `compressed`'s dynamic mode shares one activation scale
        over: the contracted axes of a dot; every axis but the batch axis of a conv.
      stacked: how many enclosing ``scan``\\ s sliced the weight from their ``xs`` (0: the
        weight is the whole leaf; 1: one layer of a stacked leaf, as under ``nn.scan``).
      in_body: the site is inside a control-flow body (``scan`` / ``cond`` / ``while``): arrays
        a hook makes there belong to that body's trace and must not be kept for another trace.
    """

    path: str
    primitive: str
    weight_side: str
    params: dict
    layout: tuple
    activation_contracting_axes: tuple[int, ...]
    activation_reduce_axes: tuple[int, ...]
    stacked: int = 0
    in_body: bool = False


@dataclasses.dataclass(frozen=True)
class _Tagged:
    """A selected float weight on its way to a site (kind ``"hooked"``)."""

    value: Any
    path: str
    layout: tuple = ()
    stacked: int = 0  # how many enclosing scans sliced it from their xs


def _untag(value):
    return value.value if isinstance(value, _Tagged) else value


def _classify(value: Any) -> str:
    return "hooked" if isinstance(value, _Tagged) else PLAIN


def _materialize(value: _Tagged, aval: Any) -> Any:
    return value.value


def _unstack(value: _Tagged):
    return value.value, lambda sliced: dataclasses.replace(value, value=sliced, stacked=value.stacked + 1)


@dataclasses.dataclass
class _HookContext:
    hook: Callable
    observes: bool
    step: int | None = None  # the flat-program step being run (`run_steps`)
    replaces_op: bool = False  # the hook returns the contraction's output (`replace_op=True`)


def _call_hook(ev: Evaluator, site: DotSite, x, weight, op: Callable):
    """The hook's activation (or, with ``replace_op``, the contraction's output)."""
    context = ev.context
    hook = context.hook if context.step is None else functools.partial(context.hook, context.step)
    args: tuple = (site, x, weight, op) if context.replaces_op else (site, x, weight)
    if not context.observes:
        return hook(*args)

    def observe(key, value, combine="sum"):
        # "stack": one value per layer of a weight a scan slices (a plain sum where none does).
        ev.observe(key, value, combine, levels=site.stacked if combine == "stack" else 1)

    return hook(*args, observe)


def _dot(ev: Evaluator, eqn, invals: list) -> list:
    tagged = [isinstance(v, _Tagged) for v in invals]
    if sum(tagged) != 1:
        return bind(eqn, ev.plain_inputs(eqn, invals))
    lhs_contract, rhs_contract = eqn.params["dimension_numbers"][0]
    if tagged[1]:
        side, x, weight, contract = "rhs", invals[0], invals[1], lhs_contract
    else:
        side, x, weight, contract = "lhs", invals[1], invals[0], rhs_contract
    site = DotSite(weight.path, "dot_general", side, dict(eqn.params), weight.layout, tuple(contract), tuple(contract), weight.stacked, ev.in_body)

    def op(activation, kernel):
        return bind(eqn, [activation, kernel] if side == "rhs" else [kernel, activation])[0]

    result = _call_hook(ev, site, x, weight.value, op)
    return [result] if ev.context.replaces_op else [op(result, weight.value)]


def _conv(ev: Evaluator, eqn, invals: list) -> list:
    x, weight = invals
    if isinstance(x, _Tagged) or not isinstance(weight, _Tagged):
        return bind(eqn, ev.plain_inputs(eqn, invals))
    lhs_spec = eqn.params["dimension_numbers"].lhs_spec
    reduce_axes = tuple(a for a in range(x.ndim) if a != lhs_spec[0])
    site = DotSite(weight.path, "conv_general_dilated", "rhs", dict(eqn.params), weight.layout, (lhs_spec[1],), reduce_axes, weight.stacked, ev.in_body)

    def op(activation, kernel):
        return bind(eqn, [activation, kernel])[0]

    result = _call_hook(ev, site, x, weight.value, op)
    return [result] if ev.context.replaces_op else [op(result, weight.value)]


def _layout(ev: Evaluator, eqn, invals: list) -> list:
    weight = invals[0]
    name = eqn.primitive.name
    follows = isinstance(weight, _Tagged) and not any(isinstance(v, _Tagged) for v in invals[1:])
    if follows and (name != "reshape" or eqn.params.get("dimensions") is None):
        value = bind(eqn, [weight.value] + list(invals[1:]))[0]
        return [dataclasses.replace(weight, value=value, layout=weight.layout + ((name, dict(eqn.params)),))]
    return bind(eqn, ev.plain_inputs(eqn, invals))


def hook_rules(*, observes: bool = False) -> RuleSet:
    """The hooked-weight `RuleSet` (kind ``"hooked"``)."""
    rules = {(name, "hooked"): _layout for name in LAYOUT}
    rules[("dot_general", "hooked")] = _dot
    rules[("conv_general_dilated", "hooked")] = _conv
    return RuleSet(kinds=("hooked",), classify=_classify, rules=rules, materialize=_materialize, unstack=_unstack, observes=observes)


_RULES = {False: hook_rules(), True: hook_rules(observes=True)}


def call_with_dot_hook(
    fn: Callable,
    args: tuple,
    kwargs: dict | None,
    hook: Callable[..., jax.Array],
    *,
    select: Callable[[str], bool],
    params_argnum: int = 0,
    cache: TraceCache | None = None,
    observations: bool = False,
    replace_op: bool = False,
) -> Any:
    """Call ``fn(*args, **kwargs)`` with ``hook`` at each contraction a selected weight feeds.

    Args:
      fn: the unmodified function.
      args, kwargs: its arguments; ``args[params_argnum]`` is the params tree.
      hook: ``hook(site, activation, weight) -> activation``: runs (under the caller's
        tracing) where a selected weight meets a dot / conv; its result replaces the activation.
        It may close over Python containers to collect statistics (return them from the jitted
        caller, as `jaxcompress.calibrate_activations` does).
      select: ``select(path) -> bool`` on the ``/``-joined params paths.
      params_argnum: which positional argument is the params tree.
      cache: a `TraceCache` to reuse traced programs across calls.
      observations: if true, the hook is called as ``hook(site, activation, weight, observe)``
        and may record statistics with ``observe(key, value, combine)`` (``combine`` ``"sum"``,
        ``"max"``, ``"min"``, or ``"stack"``: stacked per layer at a site whose weight a ``scan``
        slices from its ``xs``, a plain sum elsewhere): they work inside loops and branches
        (carried out of the rebuilt bodies), and the call returns ``(outputs, observations)``.
      replace_op: if true, the hook replaces the whole contraction: it is called as
        ``hook(site, activation, weight, op)`` (``op(activation, weight)`` binds the original
        dot / conv with the activation and the weight in their own places) and returns the
        contraction's output (e.g. an integer kernel with a straight-through gradient, as
        integer-arithmetic QAT does).

    Returns:
      ``fn``'s outputs (and the observations, see above).

    >>> import jax, jax.numpy as jnp
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w"].T.T + p["b"])
    >>> seen = []
    >>> def hook(site, x, w):
    ...     seen.append((site.path, site.activation_contracting_axes, w.shape))
    ...     return 2 * x
    >>> call_with_dot_hook(fn, (params, jnp.ones((1, 3))), None, hook, select=lambda path: path == "w")
    Array([[6., 6.]], dtype=float32)
    >>> seen
    [('w', (1,), (3, 2))]
    """
    if not 0 <= params_argnum < len(args):
        raise ValueError(f"params_argnum {params_argnum} is out of range for {len(args)} positional arguments")
    traced = trace_call(fn, tuple(args), dict(kwargs or {}), cache)
    inputs = _tagged_inputs(traced.paths, traced.leaves, traced.dynamic_positions, select, params_argnum)
    evaluator = Evaluator(_RULES[observations], context=_HookContext(hook, observations, replaces_op=replace_op))
    outs = evaluator.run_plain(traced.closed.jaxpr, traced.closed.consts, inputs)
    outputs = jax.tree_util.tree_unflatten(traced.out_tree, outs)
    return (outputs, evaluator.observations) if observations else outputs


def _tagged_inputs(paths, leaves, dynamic_positions, select, params_argnum) -> list:
    """The jaxpr's inputs, the selected params leaves wrapped as `_Tagged`."""
    inputs = []
    for position in dynamic_positions:
        leaf, name = leaves[position], params_path(paths[position], params_argnum)
        if name is not None and select(name):
            leaf = _Tagged(leaf, name)
        inputs.append(leaf)
    return inputs


# ---------------------------------------------------------------------------------------------
# Flat programs (sequential calibration runs the program in segments)
# ---------------------------------------------------------------------------------------------


def tag_inputs(program: FlatProgram, args: tuple, kwargs: dict | None, *, select: Callable[[str], bool], params_argnum: int = 0) -> dict:
    """``{input key: value}`` of ``program`` for a call with ``args`` / ``kwargs`` of the traced
    structure (e.g. tracers inside a jitted segment), the selected params leaves tagged."""
    flat, _ = jax.tree_util.tree_flatten_with_path((tuple(args), dict(kwargs or {})), is_leaf=lambda x: isinstance(x, QArray))
    paths = [p for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    values = _tagged_inputs(paths, leaves, program.traced.dynamic_positions, select, params_argnum)
    return dict(zip(program.input_keys, values))


def run_steps(program: FlatProgram, indices: Iterable[int], env: dict, hook: Callable, *, observations: bool = False) -> Any:
    """Evaluate ``program.steps[i]`` for ``i`` in ``indices`` (in order) on ``env`` with the
    hooked-weight rules; ``hook(index, site, activation, weight) -> activation`` at each site
    (with ``observations``: ``hook(index, site, activation, weight, observe)``, and the call
    returns ``(env, observations)`` as `call_with_dot_hook` does). ``env`` is updated in place;
    its values may be tagged weights (`untag` / `retag`)."""
    context = _HookContext(hook, observes=observations)
    evaluator = Evaluator(_RULES[observations], context=context)
    program.run(evaluator, indices, env, on_step=lambda index: setattr(context, "step", index))
    return (env, evaluator.observations) if observations else env


def untag(value: Any) -> tuple[Any, tuple | None]:
    """``(array, tag)``: a tagged weight's array and its static tag (None for a plain value)."""
    if isinstance(value, _Tagged):
        return value.value, (value.path, value.layout, value.stacked)
    return value, None


def retag(value: Any, tag: tuple | None) -> Any:
    """The inverse of `untag`."""
    return value if tag is None else _Tagged(value, *tag)
