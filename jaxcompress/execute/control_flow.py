"""``scan`` / ``cond`` / ``while`` with quantized weights inside (part of the interpreter).

The control-flow primitive is rebuilt with its `jax.lax` function (``lax.scan``,
``lax.switch``, ``lax.while_loop``) whose body re-interprets the original body jaxpr, so the
quantized weights keep running integer dots inside the loop or branch:

* a weight among a primitive's constants (closed over by the body) is closed over by the new
  body as a `WeightView`;
* a weight among ``scan``'s ``xs`` (layers stacked along axis 0, e.g. ``nn.scan``) is sliced
  per iteration: its codes, scale and zero point travel as ``xs`` (the scale broadcast along the
  stacked axis when it was shared over it) and the body sees a `WeightView` of one layer;
* a weight in a loop carry (or a ``cond`` operand) is dequantized: a carry changes every
  iteration, so it is not a stored weight any more.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcompress.execute.weight_view import WeightView

__all__ = ["run_scan", "run_cond", "run_while"]


def _stackable(view: WeightView) -> WeightView:
    """The view with scale / zero point of full size along axis 0 (so lax.scan can slice it)."""
    view = view.materialize()
    length = view.shape[0]
    scale, zero_point = view.full_scale([0])
    if scale.shape[0] != length:
        scale = jnp.broadcast_to(scale, (length,) + scale.shape[1:])
        if zero_point is not None:
            zero_point = jnp.broadcast_to(zero_point, (length,) + zero_point.shape[1:])
    input_scale = view.input_scale
    if input_scale is not None and input_scale.shape[0] != length:
        input_scale = jnp.broadcast_to(input_scale, (length,) + input_scale.shape[1:])
    return dataclasses.replace(view, scale=scale, zero_point=zero_point, input_scale=input_scale)


def run_scan(interpreter, eqn, invals, as_array):
    params = eqn.params
    body, num_consts, num_carry = params["jaxpr"], params["num_consts"], params["num_carry"]
    consts = list(invals[:num_consts])
    carry = [as_array(v, var.aval) for v, var in zip(invals[num_consts : num_consts + num_carry], eqn.invars[num_consts:])]
    xs = list(invals[num_consts + num_carry :])
    packed_xs, templates = [], []
    for value in xs:
        if isinstance(value, WeightView):
            view = _stackable(value)
            packed_xs.append((view.values, view.scale, view.zero_point, view.input_scale))
            templates.append(view)
        else:
            packed_xs.append(value)
            templates.append(None)

    def step(carry, sliced):
        x_values = []
        for value, template in zip(sliced, templates):
            if template is None:
                x_values.append(value)
            else:
                values, scale, zero_point, input_scale = value
                x_values.append(
                    dataclasses.replace(template, values=values, scale=scale, zero_point=zero_point, input_scale=input_scale)
                )
        outs = interpreter.run(body.jaxpr, body.consts, consts + list(carry) + x_values)
        return outs[:num_carry], outs[num_carry:]

    final_carry, ys = jax.lax.scan(
        step,
        carry,
        packed_xs,
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    return list(final_carry) + list(ys)


def run_cond(interpreter, eqn, invals, as_array):
    index, operands = invals[0], list(invals[1:])
    branches = eqn.params["branches"]
    # Every operand is visible to every branch; quantized weights are closed over.
    arrays = [v for v in operands if not isinstance(v, WeightView)]

    def branch_fn(branch):
        def run(*array_operands):
            it = iter(array_operands)
            args = [v if isinstance(v, WeightView) else next(it) for v in operands]
            return interpreter.run(branch.jaxpr, branch.consts, args)

        return run

    outs = jax.lax.switch(index, [branch_fn(b) for b in branches], *arrays)
    return list(outs)


def run_while(interpreter, eqn, invals, as_array):
    params = eqn.params
    cond_nconsts, body_nconsts = params["cond_nconsts"], params["body_nconsts"]
    cond_jaxpr, body_jaxpr = params["cond_jaxpr"], params["body_jaxpr"]
    cond_consts = list(invals[:cond_nconsts])
    body_consts = list(invals[cond_nconsts : cond_nconsts + body_nconsts])
    start = cond_nconsts + body_nconsts
    init = [as_array(v, var.aval) for v, var in zip(invals[start:], eqn.invars[start:])]

    def cond_fn(carry):
        return interpreter.run(cond_jaxpr.jaxpr, cond_jaxpr.consts, cond_consts + list(carry))[0]

    def body_fn(carry):
        return list(interpreter.run(body_jaxpr.jaxpr, body_jaxpr.consts, body_consts + list(carry)))

    return list(jax.lax.while_loop(cond_fn, body_fn, init))
