"""The one evaluator of traced programs; features are rule sets on it.

`Evaluator.run` evaluates a jaxpr equation by equation, as `jax.core.eval_jaxpr` does, except that
values may be of a *kind* the feature's `RuleSet` knows (a quantized `WeightView` under
`compressed`, a hooked float weight under activation fake-quant and calibration capture, channel
labels under structured analysis, a symbolic graph tensor under export). For each equation:

1. its kind is the first kind of ``rules.kinds`` (priority order) any input has; an equation whose
   inputs are all plain (``"plain"``: arrays, tracers, Python scalars) is bound as traced, so
   everything that does not touch a special value stays exactly as the user wrote it;
2. ``rules.rules[(primitive name, kind)]`` if there is one;
3. else, for a call-like primitive (`CALL_LIKE`: nested ``jit``, ``remat``, ``custom_jvp`` ...) its
   body is evaluated inline by this evaluator;
4. else, for ``scan`` / ``cond`` / ``while`` (when ``rules.control_flow``), the shared rules of
   `jaxcompress._program.control_flow` rebuild the loop or branch around a re-evaluated body;
5. else ``rules.default`` (by default: materialise every special input with ``rules.materialize``
   and bind the primitive, which is always correct).

A rule is ``rule(evaluator, eqn, invals) -> list`` (one value per output variable).

Observations (statistics a feature collects while the program runs: activation ranges, XᵀX, ...)
are recorded with `Evaluator.observe` and combined (``"sum"``, ``"max"``, ``"min"``) per key; inside
a loop or branch body they are returned as extra outputs of the rebuilt body and combined there, so
no traced value is ever appended to Python state from inside a body (where it would leak a tracer).
Read them from `Evaluator.observations` after `Evaluator.run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from jaxcompress._program.primitives import CALL_LIKE, CONTROL_FLOW, call_body

__all__ = ["Rule", "RuleSet", "Evaluator", "bind", "PLAIN", "COMBINES"]

PLAIN = "plain"
Rule = Callable[["Evaluator", Any, list], list]
COMBINES = ("sum", "max", "min", "stack")


def bind(eqn, invals: list) -> list:
    """Bind ``eqn``'s primitive to ``invals`` as it was traced; always returns a list."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _identity_materialize(value: Any, aval: Any) -> Any:
    return value


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """What one feature does with the values it knows.

    Attributes:
      kinds: the special value kinds, in priority order (an equation with inputs of two kinds is
        dispatched on the first).
      classify: ``value -> kind`` (one of ``kinds``, or ``"plain"``).
      rules: ``{(primitive name, kind): rule}``.
      default: the rule for an equation of a special kind that no rule, call-like inlining or
        control-flow rule handles; ``None`` materialises the special inputs and binds.
      materialize: ``(value, aval) -> array``: a special value as a plain array (where a feature
        gives up on a value, e.g. a quantized weight entering an embedding ``gather``).
      unstack: ``value -> (arrays, rebuild)`` for a special value among a ``scan``'s ``xs``:
        ``arrays`` (a pytree of arrays with the scanned axis first) travel as ``xs`` and
        ``rebuild(sliced arrays)`` is the value one iteration sees; ``None`` materialises it.
      control_flow: whether the shared ``scan`` / ``cond`` / ``while`` rules apply (a rule set
        that cannot run its values through `jax.lax` turns them off and handles them itself).
      observes: whether the rule set records observations (loops then trace their body once
        ahead to learn the observations' shapes).
    """

    kinds: tuple[str, ...]
    classify: Callable[[Any], str]
    rules: Mapping[tuple[str, str], Rule] = dataclasses.field(default_factory=dict)
    default: Rule | None = None
    materialize: Callable[[Any, Any], Any] = _identity_materialize
    unstack: Callable[[Any], tuple[Any, Callable[[Any], Any]]] | None = None
    control_flow: bool = True
    observes: bool = False

    def extend(self, rules: Mapping[tuple[str, str], Rule], **changes: Any) -> "RuleSet":
        """A new rule set with ``rules`` added (overriding same keys) and fields changed."""
        return dataclasses.replace(self, rules={**self.rules, **rules}, **changes)


class Evaluator:
    """Evaluates jaxprs under a `RuleSet` (see the module docs).

    ``context`` is whatever the feature's rules need (a hook, options); rules read it as
    ``evaluator.context``.
    """

    def __init__(self, rules: RuleSet, context: Any = None):
        self.rules = rules
        self.context = context
        self._scopes: list[dict[Any, tuple[str, Any, int]]] = [{}]

    # ---- values ------------------------------------------------------------------------
    def kind(self, value: Any) -> str:
        return self.rules.classify(value)

    def equation_kind(self, invals: list) -> str:
        kinds = {self.rules.classify(v) for v in invals}
        for kind in self.rules.kinds:
            if kind in kinds:
                return kind
        return PLAIN

    def plain(self, value: Any, aval: Any = None) -> Any:
        """``value`` as a plain array (special values materialised)."""
        if self.rules.classify(value) == PLAIN:
            return value
        return self.rules.materialize(value, aval)

    def plain_inputs(self, eqn, invals: list) -> list:
        return [self.plain(v, getattr(var, "aval", None)) for v, var in zip(invals, eqn.invars)]

    # ---- evaluation --------------------------------------------------------------------
    def run(self, jaxpr, consts, args) -> list:
        """Evaluate ``jaxpr`` on ``consts`` and ``args``; outputs as produced (maybe special)."""
        env: dict[Any, Any] = {}
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = value
        for var, value in zip(jaxpr.invars, args):
            env[var] = value
        read = lambda var: var.val if isinstance(var, Literal) else env[var]
        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def run_plain(self, jaxpr, consts, args) -> list:
        """`run`, with every output materialised (a body whose outputs leave the program)."""
        outs = self.run(jaxpr, consts, args)
        return [self.plain(v, var.aval) for v, var in zip(outs, jaxpr.outvars)]

    def equation(self, eqn, invals: list) -> list:
        """Evaluate one equation (dispatch as in the module docs); returns a list of outputs."""
        kind = self.equation_kind(invals)
        if kind == PLAIN:
            return bind(eqn, invals)
        name = eqn.primitive.name
        rule = self.rules.rules.get((name, kind))
        if rule is not None:
            return rule(self, eqn, invals)
        if name in CALL_LIKE:
            body = call_body(eqn)
            if body is not None:
                return self.run(body[0], body[1], invals)
        if name in CONTROL_FLOW and self.rules.control_flow:
            from jaxcompress._program.control_flow import CONTROL_FLOW_RULES

            return CONTROL_FLOW_RULES[name](self, eqn, invals)
        if self.rules.default is not None:
            return self.rules.default(self, eqn, invals)
        return bind(eqn, self.plain_inputs(eqn, invals))

    # ---- observations ------------------------------------------------------------------
    def observe(self, key: Any, value: Any, combine: str = "sum", *, levels: int = 1) -> None:
        """Record ``value`` under ``key``, combined with earlier values of the key by
        ``combine`` (``"sum"``, ``"max"``, ``"min"``). ``"stack"`` is for statistics of ONE slice
        of a weight stacked along a ``scan``'s ``xs`` (e.g. ``nn.scan`` layers): each of the
        ``levels`` enclosing scans that sliced the weight stacks one value per iteration, and
        beyond them the stacked values are summed like ``"sum"``."""
        if combine not in COMBINES:
            raise ValueError(f"observe: combine must be one of {COMBINES}, got {combine!r}")
        if combine == "stack" and levels <= 0:
            combine = "sum"
        scope = self._scopes[-1]
        if key in scope:
            old_combine, old, old_levels = scope[key]
            if (old_combine, old_levels) != (combine, levels if combine == "stack" else 0):
                raise ValueError(f"observe: key {key!r} recorded as {old_combine!r} and as {combine!r}")
            if combine == "stack":
                value = old + value  # the same slice seen twice in one iteration
            else:
                value = combine_values(combine, old, value)
        scope[key] = (combine, value, levels if combine == "stack" else 0)

    def merge(self, observations: Mapping[Any, tuple[str, Any, int]]) -> None:
        """Combine ``{key: (combine, value, levels)}`` (e.g. a loop body's) into the current scope."""
        for key, (combine, value, levels) in observations.items():
            self.observe(key, value, combine, levels=levels)

    @contextlib.contextmanager
    def scope(self) -> Iterator[dict]:
        """Collect the observations made inside the block into a fresh dict (not merged)."""
        self._scopes.append({})
        try:
            yield self._scopes[-1]
        finally:
            self._scopes.pop()

    @property
    def in_body(self) -> bool:
        """Whether evaluation is inside a control-flow body (a ``scan`` / ``cond`` / ``while``
        body being re-traced in its own scope): values made there belong to that body's trace."""
        return len(self._scopes) > 1

    @property
    def observations(self) -> dict[Any, Any]:
        """``{key: combined value}`` of the outermost scope."""
        return {key: value for key, (_, value, _) in self._scopes[0].items()}


def combine_values(combine: str, a: Any, b: Any) -> Any:
    if combine == "sum":
        return a + b
    if combine == "max":
        return jnp.maximum(a, b)
    if combine == "min":
        return jnp.minimum(a, b)
    raise ValueError(f"cannot combine observations with {combine!r}")


def identity(combine: str, shape_dtype: Any) -> jax.Array:
    """The neutral element of ``combine`` with ``shape_dtype``'s shape and dtype."""
    dtype = shape_dtype.dtype
    if combine == "sum":
        return jnp.zeros(shape_dtype.shape, dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        fill = -jnp.inf if combine == "max" else jnp.inf
    else:
        info = jnp.iinfo(dtype)
        fill = info.min if combine == "max" else info.max
    return jnp.full(shape_dtype.shape, fill, dtype)
