"""Run an unmodified function with a hook at every dot / conv that a selected FLOAT weight feeds.

`compressed` finds where a `QArray` meets ``dot_general`` / ``conv_general_dilated`` by
re-interpreting the traced program. Training-time and calibration-time tools need the same
sites while the weights are still float: activation fake-quantization for W8A8 QAT must
fake-quantize exactly the activations `compressed` will quantize, and one-shot methods (GPTQ,
SmoothQuant, Wanda, ...) need statistics of the activation each weight multiplies.
`call_with_dot_hook` provides that: ``fn`` is traced with float stand-ins, the params leaves
``select`` picks are followed through the same layout ops `compressed` sees through
(``transpose``, ``reshape``, ``broadcast_in_dim``, ``squeeze``, ``convert_element_type``,
``slice``, ``copy``) and into inlined ``jit`` / ``remat`` / ``custom_jvp`` / ``custom_vjp`` bodies,
and where one reaches a ``dot_general`` (the other operand not a selected weight) or is the kernel
of a ``conv_general_dilated``, ``hook(site, activation, weight)`` runs and its return value
replaces the activation. Everything else is bound unchanged, so the hooked function is
differentiable (``jax.grad`` through a hook that is differentiable) and jit-able.

Not seen (the hook does not run there; documented limits, as for `compressed`'s integer path):
weights used inside ``scan`` / ``cond`` / ``while`` bodies, ``shard_map`` / ``pmap`` bodies, and any
op other than the layout ops and the two contractions (e.g. an embedding ``gather``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from jaxcompress.execute.trace import TraceCache, trace_call
from jaxcompress.qarray import QArray
from jaxcompress.rules import path_to_str

__all__ = ["DotSite", "call_with_dot_hook", "FlatProgram", "flatten_call", "run_steps", "untag", "retag"]

_INLINED = ("jit", "pjit", "closed_call", "core_call", "call", "remat2", "checkpoint", "custom_jvp_call", "custom_vjp_call")
_LAYOUT = ("transpose", "reshape", "broadcast_in_dim", "squeeze", "convert_element_type", "slice", "copy", "copy_p")


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
    """

    path: str
    primitive: str
    weight_side: str
    params: dict
    layout: tuple
    activation_contracting_axes: tuple[int, ...]
    activation_reduce_axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Tagged:
    value: Any
    path: str
    layout: tuple = ()


def _untag(value):
    return value.value if isinstance(value, _Tagged) else value


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **params)


def _run(jaxpr: Jaxpr, consts, args, hook) -> list:
    env: dict[Any, Any] = {}

    def read(var):
        return var.val if isinstance(var, Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(v, _Tagged) for v in invals):
            outs = _tagged_eqn(eqn, invals, hook)
        else:
            outs = _bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _tagged_eqn(eqn, invals, hook):
    name = eqn.primitive.name
    tagged = [isinstance(v, _Tagged) for v in invals]
    if name == "dot_general" and sum(tagged) == 1:
        lhs_contract, rhs_contract = eqn.params["dimension_numbers"][0]
        if tagged[1]:
            side, x, weight, contract = "rhs", invals[0], invals[1], lhs_contract
        else:
            side, x, weight, contract = "lhs", invals[1], invals[0], rhs_contract
        site = DotSite(weight.path, name, side, dict(eqn.params), weight.layout, tuple(contract), tuple(contract))
        x = hook(site, x, weight.value)
        operands = [x, weight.value] if side == "rhs" else [weight.value, x]
        return _bind(eqn, operands)
    if name == "conv_general_dilated" and tagged == [False, True]:
        lhs_spec = eqn.params["dimension_numbers"].lhs_spec
        x, weight = invals
        reduce_axes = tuple(a for a in range(x.ndim) if a != lhs_spec[0])
        site = DotSite(weight.path, name, "rhs", dict(eqn.params), weight.layout, (lhs_spec[1],), reduce_axes)
        return _bind(eqn, [hook(site, x, weight.value), weight.value])
    if name in _INLINED:
        body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if isinstance(body, ClosedJaxpr):
            return _run(body.jaxpr, body.consts, invals, hook)
        if isinstance(body, Jaxpr) and not body.constvars:
            return _run(body, [], invals, hook)
    if name in _LAYOUT and tagged[0] and not any(tagged[1:]):
        if name != "reshape" or eqn.params.get("dimensions") is None:
            weight = invals[0]
            value = _bind(eqn, [weight.value] + list(invals[1:]))
            return _Tagged(value, weight.path, weight.layout + ((name, dict(eqn.params)),))
    return _bind(eqn, [_untag(v) for v in invals])


def call_with_dot_hook(
    fn: Callable,
    args: tuple,
    kwargs: dict | None,
    hook: Callable[[DotSite, jax.Array, jax.Array], jax.Array],
    *,
    select: Callable[[str], bool],
    params_argnum: int = 0,
    cache: TraceCache | None = None,
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

    Returns:
      ``fn``'s outputs.

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
    outs = _run(traced.closed.jaxpr, traced.closed.consts, inputs, hook)
    return jax.tree_util.tree_unflatten(traced.out_tree, [_untag(v) for v in outs])


def _tagged_inputs(paths, leaves, dynamic_positions, select, params_argnum) -> list:
    """The jaxpr's inputs, the selected params leaves wrapped as `_Tagged`."""
    inputs = []
    for position in dynamic_positions:
        leaf, path = leaves[position], paths[position]
        in_params = len(path) >= 2 and getattr(path[0], "idx", None) == 0 and getattr(path[1], "idx", None) == params_argnum
        if in_params:
            name = path_to_str(tuple(path[2:]))
            if select(name):
                leaf = _Tagged(leaf, name)
        inputs.append(leaf)
    return inputs


# ---------------------------------------------------------------------------------------------
# Flat programs: the traced call as one equation list, run in segments
# ---------------------------------------------------------------------------------------------


def _inlined_body(eqn):
    """``(jaxpr, consts)`` of a call-like equation `_run` inlines, else None."""
    if eqn.primitive.name not in _INLINED:
        return None
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(body, ClosedJaxpr):
        return body.jaxpr, body.consts
    if isinstance(body, Jaxpr) and not body.constvars:
        return body, []
    return None


@dataclasses.dataclass(frozen=True)
class FlatProgram:
    """A traced call as one list of equations, inlined bodies spliced in (`flatten_call`).

    Values are named by integer keys. ``steps[i] = (eqn, in_refs, out_keys)``: an in-ref is a key
    or a jaxpr ``Literal``. ``input_keys`` name the jaxpr's inputs (the call's array leaves, in
    order), ``consts`` the closed-over constants. The equations are those `call_with_dot_hook`
    would evaluate, in the same order, so `run_steps` over ``range(len(steps))`` is that call;
    over a sub-range it is one segment of it (a caller carries the values live across the cut).
    """

    steps: tuple
    input_keys: tuple
    consts: dict
    traced: Any  # the `TracedCall`

    def inputs(self, args: tuple, kwargs: dict | None, *, select: Callable[[str], bool], params_argnum: int = 0) -> dict:
        """``{input key: value}`` for a call with ``args`` / ``kwargs`` of the traced structure
        (e.g. tracers inside a jitted segment), the selected params leaves tagged."""
        flat, _ = jax.tree_util.tree_flatten_with_path((tuple(args), dict(kwargs or {})), is_leaf=lambda x: isinstance(x, QArray))
        paths = [p for p, _ in flat]
        leaves = [leaf for _, leaf in flat]
        values = _tagged_inputs(paths, leaves, self.traced.dynamic_positions, select, params_argnum)
        return dict(zip(self.input_keys, values))

    def param_keys(self, params_argnum: int = 0) -> dict:
        """``{input key: path}`` of the inputs that are leaves of the params argument."""
        out = {}
        for key, position in zip(self.input_keys, self.traced.dynamic_positions):
            path = self.traced.paths[position]
            if len(path) >= 2 and getattr(path[0], "idx", None) == 0 and getattr(path[1], "idx", None) == params_argnum:
                out[key] = path_to_str(tuple(path[2:]))
        return out

    def last_uses(self, end: int) -> dict:
        """``{key: index of the last step before end that reads it}``."""
        last = {}
        for index, (_, ins, _) in enumerate(self.steps[:end]):
            for ref in ins:
                if not isinstance(ref, Literal):
                    last[ref] = index
        return last

    def carried(self, cut: int, end: int, last_uses: dict | None = None) -> tuple:
        """Keys computed by the steps before ``cut`` and read by a step in ``[cut, end)``."""
        last = self.last_uses(end) if last_uses is None else last_uses
        out = []
        for _, _, outs in self.steps[:cut]:
            out.extend(k for k in outs if last.get(k, -1) >= cut)
        return tuple(out)


def flatten_call(fn: Callable, args: tuple, kwargs: dict | None = None, cache: TraceCache | None = None) -> FlatProgram:
    """Trace ``fn(*args, **kwargs)`` (as `call_with_dot_hook` does) into a `FlatProgram`."""
    traced = trace_call(fn, tuple(args), dict(kwargs or {}), cache)
    counter = iter(range(1 << 62))
    steps: list = []
    consts: dict = {}

    def flatten(jaxpr, const_values, in_refs):
        scope: dict = {}
        ref = lambda var: var if isinstance(var, Literal) else scope[var]
        for var, value in zip(jaxpr.constvars, const_values):
            key = next(counter)
            consts[key] = value
            scope[var] = key
        for var, in_ref in zip(jaxpr.invars, in_refs):
            scope[var] = in_ref
        for eqn in jaxpr.eqns:
            ins = [ref(v) for v in eqn.invars]
            body = _inlined_body(eqn)
            if body is not None:
                for var, out_ref in zip(eqn.outvars, flatten(body[0], body[1], ins)):
                    scope[var] = out_ref
                continue
            outs = [next(counter) for _ in eqn.outvars]
            scope.update(zip(eqn.outvars, outs))
            steps.append((eqn, ins, outs))
        return [ref(v) for v in jaxpr.outvars]

    input_keys = [next(counter) for _ in traced.closed.jaxpr.invars]
    flatten(traced.closed.jaxpr, traced.closed.consts, input_keys)
    return FlatProgram(tuple(steps), tuple(input_keys), consts, traced)


def run_steps(program: FlatProgram, indices: Iterable[int], env: dict, hook: Callable) -> dict:
    """Evaluate ``program.steps[i]`` for ``i`` in ``indices`` (in order) on ``env`` (``{key:
    value}``, updated in place and returned); ``hook(index, site, activation, weight) ->
    activation`` at each site, as in `call_with_dot_hook`. Values in ``env`` may be tagged
    weights (`untag` / `retag`)."""
    for index in indices:
        eqn, ins, outs = program.steps[index]
        invals = [ref.val if isinstance(ref, Literal) else env[ref] for ref in ins]
        if any(isinstance(v, _Tagged) for v in invals):
            result = _tagged_eqn(eqn, invals, lambda site, x, weight, index=index: hook(index, site, x, weight))
        else:
            result = _bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            result = [result]
        env.update(zip(outs, result))
    return env


def untag(value: Any) -> tuple[Any, tuple | None]:
    """``(array, tag)``: a tagged weight's array and its static tag (None for a plain value)."""
    return (value.value, (value.path, value.layout)) if isinstance(value, _Tagged) else (value, None)


def retag(value: Any, tag: tuple | None) -> Any:
    """The inverse of `untag`."""
    return value if tag is None else _Tagged(value, *tag)

