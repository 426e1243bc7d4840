"""A traced call as ONE flat list of equations (call-like bodies spliced in), run in segments.

Sequential one-shot calibration (`jaxcompress.oneshot.segments`) cuts the program before each
group of layers and runs the pieces one after the other, carrying the values live across a cut.
`flatten_call` inlines exactly the bodies the `Evaluator` inlines (`CALL_LIKE`), so evaluating
``steps`` in order with `Evaluator.equation` is the same computation as `Evaluator.run`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

from jax.extend.core import Literal

from jaxcompress._program.evaluator import Evaluator
from jaxcompress._program.primitives import call_body
from jaxcompress._program.trace import TraceCache, TracedCall, params_path, trace_call

__all__ = ["FlatProgram", "flatten_call"]


@dataclasses.dataclass(frozen=True)
class FlatProgram:
    """A traced call as one list of equations (`flatten_call`).

    Values are named by integer keys. ``steps[i] = (eqn, in_refs, out_keys)``: an in-ref is a key
    or a jaxpr ``Literal``. ``input_keys`` name the jaxpr's inputs (the call's array leaves, in
    order), ``consts`` the closed-over constants.
    """

    steps: tuple
    input_keys: tuple
    consts: dict
    traced: TracedCall

    def param_keys(self, params_argnum: int = 0) -> dict:
        """``{input key: path}`` of the inputs that are leaves of the params argument."""
        out = {}
        for key, position in zip(self.input_keys, self.traced.dynamic_positions):
            path = params_path(self.traced.paths[position], params_argnum)
            if path is not None:
                out[key] = path
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
        out: list = []
        for _, _, outs in self.steps[:cut]:
            out.extend(k for k in outs if last.get(k, -1) >= cut)
        return tuple(out)

    def run(self, evaluator: Evaluator, indices: Iterable[int], env: dict, on_step: Callable[[int], Any] | None = None) -> dict:
        """Evaluate ``steps[i]`` for ``i`` in ``indices`` (in order) with ``evaluator`` on ``env``
        (``{key: value}``, updated in place and returned). ``on_step(i)`` runs before each step
        (a feature uses it to know which step its rules are called from)."""
        for index in indices:
            eqn, ins, outs = self.steps[index]
            if on_step is not None:
                on_step(index)
            invals = [ref.val if isinstance(ref, Literal) else env[ref] for ref in ins]
            env.update(zip(outs, evaluator.equation(eqn, invals)))
        return env


def flatten_call(fn: Callable, args: tuple, kwargs: dict | None = None, cache: TraceCache | None = None) -> FlatProgram:
    """Trace ``fn(*args, **kwargs)`` (as `trace_call` does) into a `FlatProgram`."""
    traced = trace_call(fn, tuple(args), dict(kwargs or {}), cache)
    counter = iter(range(1 << 62))
    steps: list = []
    consts: dict = {}

    def flatten(jaxpr: Any, const_values: Any, in_refs: Any) -> list:
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
            body = call_body(eqn)
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
