"""Re-interpret a jaxpr with quantized weights (the engine of `jaxcompress.compressed`).

`Interpreter.run` evaluates a jaxpr equation by equation, like `jax.core.eval_jaxpr`, except that
some variables hold a `WeightView` (a quantized weight, possibly transposed / reshaped / converted)
instead of an array. Equations that see no `WeightView` are bound unchanged, so everything else
in the program (including nested ``jit``\\ s, custom derivatives and control flow that do not touch a
quantized weight) stays as it was traced. Where a `WeightView` is an input:

* layout ops (``transpose``, ``reshape``, ``broadcast_in_dim``, ``squeeze``, ``slice``,
  ``convert_element_type`` to a float, ``copy``) produce another `WeightView`;
* ``dot_general`` / ``conv_general_dilated`` run the quantized op of the weight's activation
  mode (`dot_with_weight`, `conv_with_weight`);
* ``jit`` (pjit), ``closed_call``, ``remat2`` (``jax.checkpoint``), ``custom_jvp_call`` and
  ``custom_vjp_call`` are inlined: their body is interpreted with the `WeightView` inside (their
  custom derivative rules are dropped, which is fine for inference, and jax's own tracing of the
  caller -- jit, vmap -- applies to the inlined ops as usual);
* ``scan``, ``cond`` and ``while`` are rebuilt with ``lax.scan`` / ``lax.switch`` /
  ``lax.while_loop`` around a re-interpreted body (`jaxcompress.execute.control_flow`): weights
  closed over by the body, and weights stacked along ``scan``'s ``xs``, stay quantized inside; a
  weight passed through a loop *carry* or as a ``cond`` operand that is also returned is
  dequantized (a carry is not a stored weight);
* anything else gets the dequantized weight (correct, in float): e.g. ``gather`` (an embedding
  lookup), elementwise arithmetic on the weight, ``pmap`` / ``shard_map`` bodies.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from jaxcompress.execute.control_flow import run_cond, run_scan, run_while
from jaxcompress.execute.conv import conv_with_weight
from jaxcompress.execute.dot import dot_with_weight
from jaxcompress.execute.weight_view import WeightView

__all__ = ["Interpreter"]

_CONTROL_FLOW = {"scan": run_scan, "cond": run_cond, "while": run_while}
_INLINED = ("jit", "pjit", "closed_call", "core_call", "call", "remat2", "checkpoint", "custom_jvp_call", "custom_vjp_call")
_IDENTITY = ("copy", "copy_p", "name")


class Interpreter:
    """Evaluates jaxprs whose inputs may be `WeightView`\\ s.

    Args:
      on_unsupported: ``"error"`` (default) raises `UnsupportedQuantizedOp` naming the primitive
        and the weight when an integer activation mode cannot run on the integer path;
        ``"dequantize"`` falls back to the weight-only float op there.
      weight_only: run every quantized weight in weight-only mode (used by calibration).
      on_activation: ``callback(view, activation, reduce_axes)`` for every activation that meets
        a quantized weight in a dot / conv (used by calibration).
    """

    def __init__(
        self,
        *,
        on_unsupported: str = "error",
        weight_only: bool = False,
        on_activation: Callable | None = None,
    ):
        if on_unsupported not in ("error", "dequantize"):
            raise ValueError(f"on_unsupported must be 'error' or 'dequantize', got {on_unsupported!r}")
        self.on_unsupported = on_unsupported
        self.weight_only = weight_only
        self.on_activation = on_activation

    # ---- evaluation --------------------------------------------------------------------
    def run(self, jaxpr: Jaxpr, consts, args, *, keep_views: bool = False) -> list[Any]:
        """Evaluate ``jaxpr``; `WeightView` outputs are returned dequantized unless
        ``keep_views`` (used for inlined bodies, whose outputs flow on to later equations)."""
        env: dict[Any, Any] = {}

        def read(var):
            return var.val if isinstance(var, Literal) else env[var]

        for var, value in zip(jaxpr.constvars, consts):
            env[var] = value
        for var, value in zip(jaxpr.invars, args):
            env[var] = value
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            if any(isinstance(v, WeightView) for v in invals):
                outs = self._quantized_eqn(eqn, invals)
            else:
                outs = self._bind(eqn, invals)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        if keep_views:
            return [read(v) for v in jaxpr.outvars]
        return [self._as_array(read(v), v.aval) for v in jaxpr.outvars]

    @staticmethod
    def _bind(eqn, invals):
        params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:
            return eqn.primitive.bind(*invals, **params)

    @staticmethod
    def _as_array(value, aval):
        if isinstance(value, WeightView):
            return value.dequantize(getattr(aval, "dtype", None))
        return value

    def _materialized(self, eqn, invals):
        return [self._as_array(v, var.aval) for v, var in zip(invals, eqn.invars)]

    # ---- equations that touch a quantized weight ---------------------------------------
    def _quantized_eqn(self, eqn, invals):
        name = eqn.primitive.name
        params = eqn.params
        if name == "dot_general":
            return self._dot(eqn, invals)
        if name == "conv_general_dilated":
            return self._conv(eqn, invals)
        if name in _CONTROL_FLOW:
            return _CONTROL_FLOW[name](self, eqn, invals, self._as_array)
        if name in _INLINED:
            body = params.get("jaxpr", params.get("call_jaxpr"))
            if isinstance(body, ClosedJaxpr):
                return self.run(body.jaxpr, body.consts, invals, keep_views=True)
            if isinstance(body, Jaxpr) and not body.constvars:
                return self.run(body, [], invals, keep_views=True)
        if len(invals) == 1 or name == "broadcast_in_dim":
            view = invals[0]
            result = None
            if isinstance(view, WeightView) and not any(isinstance(v, WeightView) for v in invals[1:]):
                result = _layout_op(name, view, params)
            if result is not None:
                return result
        return self._bind(eqn, self._materialized(eqn, invals))

    def _dot(self, eqn, invals):
        lhs, rhs = invals
        if isinstance(lhs, WeightView) and isinstance(rhs, WeightView):
            lhs = self._as_array(lhs, eqn.invars[0].aval)
        if isinstance(lhs, WeightView):
            x, view, side = rhs, lhs, "lhs"
        else:
            x, view, side = lhs, rhs, "rhs"
        params = eqn.params
        return dot_with_weight(
            x,
            view,
            params["dimension_numbers"],
            weight_side=side,
            out_dtype=eqn.outvars[0].aval.dtype,
            mode="weight_only" if self.weight_only else None,
            precision=params.get("precision"),
            preferred_element_type=params.get("preferred_element_type"),
            on_activation=self.on_activation,
            on_unsupported=self.on_unsupported,
        )

    def _conv(self, eqn, invals):
        lhs, rhs = invals
        if isinstance(lhs, WeightView) or not isinstance(rhs, WeightView):
            # A quantized *input* to a conv is unusual (not a kernel): dequantize it.
            return self._bind(eqn, self._materialized(eqn, invals))
        return conv_with_weight(
            lhs,
            rhs,
            eqn.params,
            out_dtype=eqn.outvars[0].aval.dtype,
            mode="weight_only" if self.weight_only else None,
            on_activation=self.on_activation,
            on_unsupported=self.on_unsupported,
        )


def _layout_op(name: str, view: WeightView, params: dict) -> WeightView | None:
    """Apply a layout primitive to a `WeightView`, or ``None`` if it cannot stay quantized."""
    if name in _IDENTITY:
        return view
    if name == "transpose":
        return view.transpose(params["permutation"])
    if name == "reshape":
        if params.get("dimensions") is not None:
            return None
        return view.reshape(params["new_sizes"])
    if name == "broadcast_in_dim":
        return view.broadcast_in_dim(params["shape"], params["broadcast_dimensions"])
    if name == "squeeze":
        return view.squeeze(params["dimensions"])
    if name == "convert_element_type":
        return view.astype(params["new_dtype"])
    if name == "slice":
        return view.slice(params["start_indices"], params["limit_indices"], params.get("strides"))
    return None
