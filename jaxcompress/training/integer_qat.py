"""Integer arithmetic in the W8A8 QAT forward: the contraction `compressed` deploys, STE backward.

With ``fake_quant_activations(fn, rules, arithmetic="integer")`` each dot / conv a W8A8 weight
feeds runs, in the forward pass, the SAME integer kernel `jaxcompress.compressed` runs after
`jaxcompress.convert_qat` (`dot_with_weight` / `conv_with_weight` with the policy ``"rule"``:
int8 activation codes x int8 weight codes -> int32, the scales applied to the output), so the
trained forward is the deployed forward: the same codes, the same int32 sums, the same float32
rescaling. The backward pass is the float straight-through gradient of the fake-quantized op
(`integer_contraction`: a `jax.custom_vjp` over the whole contraction whose backward is the VJP
of ``op(activation_fake_quant(x), w_fake_quant)``), exactly the gradient of the float QAT
forward; that float forward is never computed (XLA drops its unused primal). It is what
`fake_quant_activations` runs by default in a call that passes ``weight_ranges`` (its
``arithmetic=None``), and always with ``arithmetic="integer"``.

What the backward keeps of the activation: its int8 codes and scale (dynamic mode; plus the
one-byte clip mask for the static tracked range, whose clipped STE zeroes the gradient beyond
the range, which the saturated codes alone cannot tell), from which it rebuilds the
fake-quantized activation ``codes * scale`` bit for bit, not the float activation; LSQ keeps the
float activation (its step gradient reads ``x / step``). Measured on ``benchmarks/qat_step.py``'s
CNN, batch 128: the compiled step's temp memory is the same either way (46.70 MiB: XLA plans
the liveness of the whole jitted step itself), so the saving is in residuals held outside one
XLA program: ``jax.vjp`` outside ``jit`` keeps 1-2 bytes per activation element instead of 4.

The weight codes come from quantizing the fake-quantized weight the forward is given with the
clip ranges `qat` tracks (``weight_ranges=jc.qat_ranges(state)``): those are the codes
`convert_qat` produces, because a fake-quantized value divided by its scale rounds back to its
own code. The static activation scale is ``static_scale(range)`` as `convert_qat` attaches it
(the batch's own ``max|x|`` while nothing has been observed, as in the float forward; the LSQ
step itself with ``steps=``).

Layout: `compressed` runs a W8A8 Dense kernel's codes stored ``(out, in)`` (contracted axis
minor, `jaxcompress.execute.layout`), which pays off for codes that are program inputs. Here the
codes are quantized from the float weight inside the step, and a transpose between the int8
convert and the dot makes XLA:CPU run the dot as s32 x s32 (the 128x3136x128 dot of
``benchmarks/qat_step.py``'s CNN: ~7.1 ms against ~0.64 ms for the codes quantized in the kernel's
own ``(in, out)`` order, an int8 dot XLA keeps in s8, and ~1.2 ms for the float32 dot, on the
shared 2-core Xeon), so the integer forward contracts the codes in the weight's logical layout.
The integer sums, hence the outputs, are the same in either layout.

Sites where the integer kernel cannot run keep the float fake-quantized op: a weight a ``scan``
slices from its ``xs`` (one layer of a stacked leaf), a layout the weight view cannot follow, a
non-float activation, and what `compressed` itself reports as `UnsupportedQuantizedOp` (e.g. an
fp8 weight).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.execute.activation import ACTIVATION_QMAX, quantize_activation
from jaxcompress.execute.conv import conv_with_weight
from jaxcompress.execute.dot import UnsupportedQuantizedOp, dot_with_weight
from jaxcompress.execute.hooks import DotSite
from jaxcompress.execute.policy import auto_choice
from jaxcompress.execute.rules import follow_layout
from jaxcompress.execute.weight_view import WeightView

__all__ = ["integer_contraction", "run_site", "site_view", "ARITHMETICS", "STES"]

ARITHMETICS = ("float", "integer", "auto")
# What the backward pass of `integer_contraction` keeps (see its docs): "input" the float
# activation (any ``activation_quant``, e.g. LSQ, whose step gradient needs ``x / step`` itself);
# "identity" / "clipped" only the int8 codes and their scale (+ the clip mask for "clipped").
STES = ("input", "identity", "clipped")


def site_view(site: DotSite, view: WeightView | None) -> WeightView | None:
    """The weight view at ``site`` (the leaf's view through the site's layout ops), or ``None``
    where the integer kernel cannot take it (a stacked weight, a layout the view cannot follow)."""
    if view is None or site.stacked:
        return None
    return follow_layout(view, site.layout)


def _zero_cotangent(like: Any) -> Any:
    """The zero cotangent of an array (or a ``ShapeDtypeStruct``): zeros for a float, float0
    for an integer (the weight codes and scales get no gradient)."""
    if jnp.issubdtype(like.dtype, jnp.inexact):
        return jnp.zeros(like.shape, like.dtype)
    return np.zeros(like.shape, jax.dtypes.float0)


def _integer_op(site: DotSite, x: jax.Array, view: WeightView, mode: str, out_dtype: Any) -> jax.Array:
    if site.primitive == "dot_general":
        return dot_with_weight(
            x,
            view,
            site.params["dimension_numbers"],
            weight_side=site.weight_side,
            out_dtype=out_dtype,
            mode=mode,
            precision=site.params.get("precision"),
            preferred_element_type=site.params.get("preferred_element_type"),
        )
    return conv_with_weight(x, view, site.params, out_dtype=out_dtype, mode=mode)


def integer_contraction(
    site: DotSite,
    x: jax.Array,
    weight: jax.Array,
    op: Callable[[jax.Array, jax.Array], jax.Array],
    view: WeightView,
    mode: str,
    activation_quant: Callable[[jax.Array, jax.Array], jax.Array],
    activation_param: jax.Array,
    activation_scale: Callable[[jax.Array, jax.Array], jax.Array] | None,
    *,
    ste: str = "input",
) -> jax.Array:
    """``op(x, weight)`` computed by the integer kernel, with the float STE gradient.

    Args:
      site: the contraction (`DotSite`).
      x: the float activation.
      weight: the fake-quantized float weight at the site (receives the gradient).
      op: the original contraction, ``op(activation, weight)``.
      view: the weight's integer codes and scales at the site (`site_view`).
      mode: ``"dynamic"`` or ``"static"``.
      activation_quant: ``activation_quant(x, activation_param)``: the float fake-quantized
        activation with its straight-through gradient (the backward pass differentiates
        ``op(activation_quant(x, p), weight)``).
      activation_param: the static range / LSQ step (differentiable for LSQ); a dummy scalar
        for dynamic mode.
      activation_scale: static mode: ``activation_scale(x, activation_param)``, the float32
        per-tensor scale the integer kernel quantizes ``x`` with.
      ste: what the backward pass keeps of the activation (the gradient is the same):
        ``"input"``: ``x`` itself, and the backward differentiates ``activation_quant``
        (needed for LSQ, whose step gradient reads ``x / step``); ``"identity"``: the int8
        codes of ``x`` and their scale, for an ``activation_quant`` whose gradient is the
        identity (dynamic mode); ``"clipped"``: the codes, the scale and the clip mask
        ``|x / scale| <= 127`` (one byte per element: the codes alone cannot tell a value just
        inside the clip range from one beyond it), for the tracked-range static mode's clipped
        STE. The fake-quantized activation the weight gradient contracts is rebuilt as
        ``codes * scale``, the very value ``activation_quant`` returns, so the gradient is the
        same bit for bit; the backward no longer holds the float activation (1 or 2 bytes per
        element instead of 4).

    Raises `UnsupportedQuantizedOp` where `compressed` would.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> from jaxcompress.execute.weight_view import WeightView
    >>> from jaxcompress.training.activations import activation_fake_quant
    >>> x = jax.random.normal(jax.random.key(0), (4, 16))
    >>> q = jc.quantize(jax.random.normal(jax.random.key(1), (16, 8)), channel_axes=(-1,))
    >>> dims = (((1,), (0,)), ((), ()))
    >>> site = DotSite("w", "dot_general", "rhs", {"dimension_numbers": dims}, (), (1,), (1,))
    >>> op = lambda a, b: jax.lax.dot_general(a, b, dims)
    >>> fq = lambda a, p: activation_fake_quant(a, "dynamic", (1,))
    >>> f = lambda x, w: integer_contraction(site, x, w, op, WeightView.from_qarray(q), "dynamic",
    ...                                      fq, jnp.float32(0), None, ste="identity")
    >>> w = q.dequantize()
    >>> bool(jnp.array_equal(f(x, w), jc.quantized_dot_general(x, q, dims, activation="dynamic")))
    True
    >>> g = jax.grad(lambda w: f(x, w).sum())(w)            # the float STE gradient
    >>> bool(jnp.array_equal(g, jax.grad(lambda w: op(fq(x, 0), w).sum())(w)))
    True
    >>> _, f_vjp = jax.vjp(f, x, w)                         # what the backward keeps of x: int8 codes
    >>> sorted({str(r.dtype) for r in jax.tree.leaves(f_vjp) if r.shape == x.shape})
    ['int8']
    """
    if ste not in STES:
        raise ValueError(f"integer_contraction: ste must be one of {STES}, got {ste!r}")
    if ste == "clipped" and (mode != "static" or activation_scale is None):
        raise ValueError("integer_contraction: ste='clipped' is the static mode's clipped STE (needs activation_scale)")
    if ste == "identity" and mode != "dynamic":
        raise ValueError("integer_contraction: ste='identity' is the dynamic mode's STE")
    out_dtype = jax.eval_shape(op, x, weight).dtype
    arrays = (view.values, view.scale, view.zero_point, view.input_scale)
    # the zero cotangents of the codes / scales and (codes residuals) of the range: built from
    # shapes, so the backward pass keeps none of these arrays
    array_zeros = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), arrays)
    param_like = jax.ShapeDtypeStruct(jnp.shape(activation_param), jnp.result_type(activation_param))
    reduce_axes = tuple(a % x.ndim for a in site.activation_reduce_axes)
    x_dtype = x.dtype

    def forward(x, weight, param, arrays):
        values, scale, zero_point, input_scale = arrays
        at_site = dataclasses.replace(
            view,
            values=values,
            scale=scale,
            zero_point=zero_point,
            input_scale=input_scale,
            activation=mode,
            activation_scale=None if activation_scale is None else activation_scale(x, param),
        )
        # The codes are computed in this program from the float weight: a pending transpose
        # (the ``(out, in)`` stored layout `quantize_params` gives a Dense kernel) is applied
        # here so that it cancels against the one that stored them, and the int8 dot runs on the
        # codes as quantized. Left pending, XLA:CPU fuses the transpose into the int8 convert
        # and upcasts the dot to s32 x s32 (~10x slower; see the module docs).
        return _integer_op(site, x, at_site.materialize(), mode, out_dtype)

    def reference(x, weight, param):
        return op(activation_quant(x, param), weight)

    contraction = jax.custom_vjp(forward)

    def forward_with_residuals(x, weight, param, arrays):
        y = forward(x, weight, param, arrays)
        if ste == "input":
            return y, (x, weight, param)
        if ste == "identity":
            codes, scale = quantize_activation(x, reduce_axes, "dynamic")
            return y, (codes, scale, None, weight)
        assert activation_scale is not None  # checked above
        scale = activation_scale(x, param)
        codes, _ = quantize_activation(x, (), "static", scale)
        # the clip mask of the static STE (`activation_fake_quant`), on the same scale
        inside = jnp.abs(x.astype(jnp.float32) / scale) <= ACTIVATION_QMAX
        return y, (codes, scale, inside, weight)

    def backward(residuals, g):
        zeros = jax.tree.map(_zero_cotangent, array_zeros)
        if ste == "input":
            x_in, weight, param = residuals
            _, vjp = jax.vjp(reference, x_in, weight, param)
            grad_x, grad_weight, grad_param = vjp(g)
            return grad_x, grad_weight, grad_param, zeros
        codes, scale, inside, weight = residuals
        # the fake-quantized activation as `activation_fake_quant` computes it
        fake = (codes.astype(jnp.float32) * scale).astype(x_dtype)
        _, vjp = jax.vjp(op, fake, weight)
        grad_x, grad_weight = vjp(g)
        if inside is not None:
            grad_x = jnp.where(inside, grad_x, jnp.zeros_like(grad_x))
        # neither STE gives the range / dummy parameter a gradient
        return grad_x, grad_weight, _zero_cotangent(param_like), zeros

    contraction.defvjp(forward_with_residuals, backward)
    return contraction(x, weight, activation_param, arrays)


def run_site(
    site: DotSite,
    x: jax.Array,
    weight: jax.Array,
    op: Callable[[jax.Array, jax.Array], jax.Array],
    view: WeightView | None,
    mode: str,
    activation_quant: Callable[[jax.Array, jax.Array], jax.Array],
    activation_param: jax.Array,
    activation_scale: Callable[[jax.Array, jax.Array], jax.Array] | None,
    arithmetic: str = "integer",
    *,
    ste: str = "input",
) -> jax.Array:
    """One site of the integer-arithmetic forward: `integer_contraction` (its ``ste``) where it
    can run (with ``arithmetic="auto"``: where `compressed`'s cost model, `auto_choice`, says the
    integer kernel is the faster one), the float fake-quantized op elsewhere (see the module
    docs)."""
    at_site = site_view(site, view)
    if at_site is not None and arithmetic == "auto":
        path, _ = auto_choice(site.primitive, tuple(x.shape), at_site, site.params, site.weight_side)
        if path != "integer":
            at_site = None
    if at_site is not None and jnp.issubdtype(x.dtype, jnp.floating):
        try:
            return integer_contraction(
                site, x, weight, op, at_site, mode, activation_quant, activation_param, activation_scale, ste=ste
            )
        except UnsupportedQuantizedOp:
            pass  # what compressed cannot run as integers either: the float fake-quantized op
    return op(activation_quant(x, activation_param), weight)
