"""``scan`` / ``cond`` / ``while`` with special values inside: the rules every rule set shares.

The primitive is rebuilt with its `jax.lax` function (``lax.scan``, ``lax.switch``,
``lax.while_loop``) around a body that the same `Evaluator` re-evaluates, so a feature keeps
seeing its values inside loops and branches:

* a special value among the primitive's operands that the body only reads (``scan``'s consts,
  ``while``'s cond / body consts, any ``cond`` operand) is closed over by the new body as it is;
* a special value among ``scan``'s ``xs`` (layers stacked along axis 0, e.g. ``nn.scan``) travels
  as the arrays ``RuleSet.unstack`` gives, and the body sees the value rebuilt from one slice;
* a value in a loop carry is materialised: it changes every iteration, so it is not a stored
  weight any more (body outputs are materialised for the same reason).

Observations made in a body are outputs of the rebuilt body: ``"sum"`` / ``"max"`` / ``"min"``
ones are carried (initialised to the combine's neutral element; the body is traced once ahead
with `jax.eval_shape` to learn their shapes) and ``"stack"`` ones become stacked ``ys`` of a scan.
Branches of a ``cond`` return every key any branch observes (neutral elements where a branch
does not). Nothing is appended to Python state from inside a traced body.
"""

from __future__ import annotations

from typing import Callable

import jax

from jaxcompress._program.evaluator import PLAIN, Evaluator, combine_values, identity

__all__ = ["CONTROL_FLOW_RULES"]


def _shapes_of(fn: Callable, *args) -> dict:
    """``{key: (combine, ShapeDtypeStruct, levels)}`` of the observations ``fn(*args)`` makes
    (``fn`` returns ``(outputs, observations)``), traced abstractly."""
    static: dict = {}

    def abstract(*args):
        _, observations = fn(*args)
        for key, (combine, _, levels) in observations.items():
            static[key] = (combine, levels)
        return {key: value for key, (_, value, _) in observations.items()}

    shapes = jax.eval_shape(abstract, *args)
    return {key: (static[key][0], shapes[key], static[key][1]) for key in shapes}


def _accumulate(acc: dict, observations: dict, combines: dict) -> dict:
    out = dict(acc)
    for key, (combine, value, _) in observations.items():
        if key in out:
            out[key] = combine_values(combines[key], out[key], value)
    return out


def run_scan(ev: Evaluator, eqn, invals: list) -> list:
    params = eqn.params
    body, num_consts, num_carry = params["jaxpr"], params["num_consts"], params["num_carry"]
    consts = list(invals[:num_consts])
    carry_vars = eqn.invars[num_consts : num_consts + num_carry]
    carry = [ev.plain(v, var.aval) for v, var in zip(invals[num_consts : num_consts + num_carry], carry_vars)]
    packed, rebuilds = [], []
    for value, var in zip(invals[num_consts + num_carry :], eqn.invars[num_consts + num_carry :]):
        if ev.kind(value) != PLAIN and ev.rules.unstack is not None:
            arrays, rebuild = ev.rules.unstack(value)
        else:
            arrays, rebuild = ev.plain(value, var.aval), None
        packed.append(arrays)
        rebuilds.append(rebuild)

    def evaluate(carry, sliced):
        xs = [s if rebuild is None else rebuild(s) for s, rebuild in zip(sliced, rebuilds)]
        with ev.scope() as inner:
            outs = ev.run_plain(body.jaxpr, body.consts, consts + list(carry) + xs)
        return outs, dict(inner)

    scan = lambda step, init: jax.lax.scan(
        step, init, packed, length=params["length"], reverse=params["reverse"], unroll=params["unroll"]
    )
    if not ev.rules.observes:
        final, ys = scan(lambda c, s: (lambda o: (o[:num_carry], o[num_carry:]))(evaluate(c, s)[0]), carry)
        return list(final) + list(ys)

    one_slice = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), packed)
    shapes = _shapes_of(evaluate, carry, one_slice)
    carried = {k: v for k, v in shapes.items() if v[0] != "stack"}
    combines = {k: v[0] for k, v in carried.items()}
    acc0 = {k: identity(combine, shape) for k, (combine, shape, _) in carried.items()}

    def step(state, sliced):
        carry, acc = state
        outs, observations = evaluate(carry, sliced)
        stacked = {k: v for k, (c, v, _) in observations.items() if c == "stack"}
        return (outs[:num_carry], _accumulate(acc, observations, combines)), (outs[num_carry:], stacked)

    (final, acc), (ys, stacked) = scan(step, (carry, acc0))
    for key, value in acc.items():
        ev.observe(key, value, combines[key])
    for key, value in stacked.items():
        ev.observe(key, value, "stack", levels=shapes[key][2] - 1)
    return list(final) + list(ys)


def run_cond(ev: Evaluator, eqn, invals: list) -> list:
    index, operands = ev.plain(invals[0]), list(invals[1:])
    arrays = [v for v in operands if ev.kind(v) == PLAIN]

    def evaluate(branch, *array_operands):
        it = iter(array_operands)
        args = [next(it) if ev.kind(v) == PLAIN else v for v in operands]
        with ev.scope() as inner:
            outs = ev.run_plain(branch.jaxpr, branch.consts, args)
        return outs, dict(inner)

    branches = eqn.params["branches"]
    if not ev.rules.observes:
        return list(jax.lax.switch(index, [lambda *a, b=b: evaluate(b, *a)[0] for b in branches], *arrays))

    union: dict = {}
    for branch in branches:
        union.update(_shapes_of(lambda *a, b=branch: evaluate(b, *a), *arrays))

    def branch_fn(branch):
        def run(*array_operands):
            outs, observations = evaluate(branch, *array_operands)
            values = {}
            for key, (combine, shape, _) in union.items():
                values[key] = observations[key][1] if key in observations else identity("sum" if combine == "stack" else combine, shape)
            return outs, values

        return run

    outs, values = jax.lax.switch(index, [branch_fn(b) for b in branches], *arrays)
    for key, value in values.items():
        combine, _, levels = union[key]
        ev.observe(key, value, combine, levels=levels)
    return list(outs)


def run_while(ev: Evaluator, eqn, invals: list) -> list:
    params = eqn.params
    cond_nconsts, body_nconsts = params["cond_nconsts"], params["body_nconsts"]
    cond_jaxpr, body_jaxpr = params["cond_jaxpr"], params["body_jaxpr"]
    cond_consts = list(invals[:cond_nconsts])
    body_consts = list(invals[cond_nconsts : cond_nconsts + body_nconsts])
    start = cond_nconsts + body_nconsts
    init = [ev.plain(v, var.aval) for v, var in zip(invals[start:], eqn.invars[start:])]

    def cond_fn(carry):
        with ev.scope():  # a loop condition computes a predicate; what it observes is not kept
            return ev.run_plain(cond_jaxpr.jaxpr, cond_jaxpr.consts, cond_consts + list(carry))[0]

    def evaluate(carry):
        with ev.scope() as inner:
            outs = ev.run_plain(body_jaxpr.jaxpr, body_jaxpr.consts, body_consts + list(carry))
        return outs, dict(inner)

    if not ev.rules.observes:
        return list(jax.lax.while_loop(cond_fn, lambda c: evaluate(c)[0], init))

    shapes = _shapes_of(evaluate, init)
    combines = {k: ("sum" if c == "stack" else c) for k, (c, _, _) in shapes.items()}
    acc0 = {k: identity(combines[k], shape) for k, (_, shape, _) in shapes.items()}

    def body_fn(state):
        carry, acc = state
        outs, observations = evaluate(carry)
        return outs, _accumulate(acc, observations, combines)

    final, acc = jax.lax.while_loop(lambda state: cond_fn(state[0]), body_fn, (init, acc0))
    for key, value in acc.items():
        ev.observe(key, value, shapes[key][0], levels=shapes[key][2])
    return list(final)


CONTROL_FLOW_RULES = {"scan": run_scan, "cond": run_cond, "while": run_while}
