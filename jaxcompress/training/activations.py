"""Activation fake-quantization for W8A8 quantization-aware training.

`fake_quant_activations(fn, rules)` returns ``fn`` with every activation that `compressed` would
quantize to int8 fake-quantized instead: the activation a rule-matched weight meets in a
``dot_general`` / ``conv_general_dilated`` (found in the traced program by
`jaxcompress.execute.hooks.call_with_dot_hook`, the same sites and the same axes `compressed`
uses), according to the rule's ``activation`` mode:

* ``"dynamic"``: per-row absmax int8 (per token for a dot, per example for a conv), computed from
  the activation itself as `compressed` does at run time; straight-through gradient (nothing is
  clipped, the scale gets no gradient).
* ``"static"``: one per-tensor scale ``range / 127``. The range is either

  - **tracked**: passed as ``ranges={path: absmax}`` (e.g. `qat_activation_ranges` of a `qat`
    optimizer state, an exponential moving average of the observed ``max|x|`` that `qat` keeps
    and freezes); a range of 0 (nothing observed yet) uses the batch's own ``max|x|``; gradient:
    clipped straight-through (zero where the activation saturated); or
  - **learned**: passed as ``steps={path: step}`` (LSQ, Esser et al. 2020): the scale is a
    trainable scalar with LSQ's gradient, scaled by ``1 / sqrt(N * 127)`` with ``N`` the
    activation's features per row (`init_activation_steps` gives the paper's initial value).

* ``"weight_only"`` leaves no activation untouched.

The wrapped function returns ``(outputs, observed)`` where ``observed`` is ``{path: max|x|}``
(float32, no gradient) over every activation quantized at that path in this call: pass it to the
`qat` update (``opt.update(grads, state, params, activation_stats=observed)``) to track ranges.

The fake-quantized value is computed by the same `quantize_activation` `compressed` uses (codes
``clip(round(x / scale), -127, 127)`` times the same float32 scale), so after conversion
(`convert_qat`) the integer model sees the same activation codes the trained model saw.

With ``arithmetic="integer"`` (the default whenever the call passes the weights' clip ranges,
``weight_ranges=qat_ranges(state)``) each quantized dot / conv of the forward pass runs the
integer kernel `compressed` deploys (int8 x int8 -> int32, `jaxcompress.training.integer_qat`)
with the straight-through gradient of the fake-quantized float op, so the trained forward is the
deployed one; ``arithmetic="float"`` (the default without ``weight_ranges``) runs the float op on
the fake-quantized values instead (equal up to float rounding; the gradient is the same). Without
the ranges the integer path could only re-quantize each fake-quantized weight on its own absmax
grid, which is not the grid `convert_qat` deploys once `qat` tracks or freezes a range.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.execute.activation import ACTIVATION_QMAX, quantize_activation
from jaxcompress.execute.hooks import DotSite, call_with_dot_hook
from jaxcompress.execute.weight_view import WeightView
from jaxcompress._program import TraceCache
from jaxcompress.qarray import QArray
from jaxcompress.quant.plan import plan_quantization
from jaxcompress.rules import QuantRule, path_to_str
from jaxcompress.training.integer_qat import ARITHMETICS, run_site

__all__ = ["fake_quant_activations", "activation_fake_quant", "init_activation_steps", "activation_modes", "static_scale"]


def _dynamic_forward(x, reduce_axes):
    codes, scale = quantize_activation(x, reduce_axes, "dynamic")
    return (codes.astype(jnp.float32) * scale).astype(x.dtype)


def _static_forward(x, scale):
    codes, scale = quantize_activation(x, (), "static", scale)
    return (codes.astype(jnp.float32) * scale).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _dynamic(x, reduce_axes):
    return _dynamic_forward(x, reduce_axes)


def _dynamic_fwd(x, reduce_axes):
    return _dynamic_forward(x, reduce_axes), None


def _dynamic_bwd(reduce_axes, _, g):
    return (g,)


_dynamic.defvjp(_dynamic_fwd, _dynamic_bwd)


@jax.custom_vjp
def _static_ste(x, scale):
    return _static_forward(x, scale)


def _static_ste_fwd(x, scale):
    # Keep only the clip mask for the backward pass (1 byte per element instead of the float x).
    inside = jnp.abs(x.astype(jnp.float32) / scale) <= ACTIVATION_QMAX
    return _static_forward(x, scale), (inside, jnp.zeros_like(scale))


def _static_ste_bwd(residuals, g):
    inside, zero_scale = residuals
    return jnp.where(inside, g, jnp.zeros_like(g)), zero_scale


_static_ste.defvjp(_static_ste_fwd, _static_ste_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _static_lsq(x, step, features):
    return _static_forward(x, step)


def _static_lsq_fwd(x, step, features):
    return _static_forward(x, step), (x, step)


def _static_lsq_bwd(features, residuals, g):
    x, step = residuals
    v = x.astype(jnp.float32) / step
    below, above = v < -ACTIVATION_QMAX, v > ACTIVATION_QMAX
    inside = ~(below | above)
    grad_x = jnp.where(inside, g, jnp.zeros_like(g))
    d_step = jnp.where(below, -float(ACTIVATION_QMAX), jnp.where(above, float(ACTIVATION_QMAX), jnp.round(v) - v))
    grad_step = jnp.sum(g.astype(jnp.float32) * d_step) / math.sqrt(features * ACTIVATION_QMAX)
    return grad_x, grad_step.astype(step.dtype).reshape(step.shape)


_static_lsq.defvjp(_static_lsq_fwd, _static_lsq_bwd)


def activation_fake_quant(
    x: jax.Array,
    mode: str,
    reduce_axes: Sequence[int],
    *,
    absmax: jax.Array | None = None,
    step: jax.Array | None = None,
) -> jax.Array:
    """Fake-quantize one activation as `compressed` quantizes it (see the module docs).

    Args:
      x: the activation.
      mode: ``"dynamic"`` or ``"static"``.
      reduce_axes: the axes one dynamic scale is shared over (for LSQ: the feature axes, whose
        size is LSQ's ``N``).
      absmax: static mode, tracked range: the clip value (scale ``absmax / 127``); 0 means "use
        this batch's ``max|x|``".
      step: static mode, learned: the LSQ step (the scale itself).

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[0.5, -1.0, 3.0]])
    >>> [round(v, 4) for v in activation_fake_quant(x, "static", (1,), absmax=jnp.float32(1.27))[0].tolist()]
    [0.5, -1.0, 1.27]
    >>> jax.grad(lambda v: activation_fake_quant(v, "static", (1,), absmax=jnp.float32(1.27)).sum())(x).tolist()
    [[1.0, 1.0, 0.0]]
    """
    reduce_axes = tuple(a % x.ndim for a in reduce_axes)
    if mode == "dynamic":
        return _dynamic(x, reduce_axes)
    if mode != "static":
        raise ValueError(f"activation mode {mode!r} is not 'dynamic' or 'static'")
    if (absmax is None) == (step is None):
        raise ValueError("static activation fake-quant needs exactly one of absmax= (tracked) or step= (LSQ)")
    if step is not None:
        features = math.prod(x.shape[a] for a in reduce_axes) if reduce_axes else 1
        return _static_lsq(x, jnp.asarray(step, jnp.float32).reshape(()), int(features))
    absmax = jnp.asarray(absmax, jnp.float32).reshape(())
    observed = jax.lax.stop_gradient(jnp.max(jnp.abs(x.astype(jnp.float32))))
    clip = jnp.where(absmax > 0, absmax, observed)
    return _static_ste(x, static_scale(clip))


def static_scale(absmax: jax.Array) -> jax.Array:
    """The float32 per-tensor scale of a clip range, ``absmax / 127`` (1.0 for a zero range), as
    `attach_activation_scales` stores it for `compressed`."""
    absmax = jnp.asarray(absmax, jnp.float32)
    return jnp.where(absmax > 0, absmax / ACTIVATION_QMAX, jnp.ones_like(absmax))


def activation_modes(params: Any, rules: Sequence[QuantRule] | QuantRule, *, on_unused: str = "warn") -> dict[str, str]:
    """``{path: "dynamic" | "static"}`` for every float leaf whose rule quantizes its activation.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> rules = [jc.QuantRule(pattern="w", activation="static"), jc.QuantRule(pattern="v")]
    >>> activation_modes({"w": jnp.ones((2, 2)), "v": jnp.ones((2, 2))}, rules)
    {'w': 'static'}
    """
    plan = plan_quantization(params, rules, on_unused=on_unused)
    return {leaf.path_str: leaf.rule.activation for leaf in plan if leaf.rule.activation != "weight_only"}


def fake_quant_activations(
    fn: Callable,
    rules: Sequence[QuantRule] | QuantRule,
    *,
    params_argnum: int = 0,
    on_unused: str = "warn",
    arithmetic: Literal["float", "integer", "auto"] | None = None,
) -> Callable:
    """Wrap ``fn`` so the activations `compressed` would quantize are fake-quantized.

    Args:
      fn: the unmodified function (a linen ``apply``, an nnx forward through ``nnx.merge``,
        plain JAX), called with the params as positional argument ``params_argnum``.
      rules: the `QuantRule`\\ s (their ``activation`` mode says what to do per weight).
      params_argnum: which positional argument holds the params.
      on_unused: ``"warn"``, ``"error"`` or ``"ignore"`` for rules that match no param.
      arithmetic: ``None`` (default): ``"integer"`` in a call that passes ``weight_ranges``,
        ``"float"`` in one that does not. ``"integer"``: each quantized site runs the integer kernel
        `compressed` deploys (int8 x int8 -> int32) with the straight-through gradient of the
        fake-quantized float op (`jaxcompress.training.integer_qat`; the backward keeps the
        int8 activation codes, not the float activation): the forward is then what
        `convert_qat` + `compressed` compute. Pass the weight clip ranges the weights were
        fake-quantized with (``weight_ranges=qat_ranges(state)``); without them each weight's
        range is its fake-quantized absmax. Sites the integer kernel cannot take (a weight a
        ``scan`` slices, an fp8 weight, ...) run the float fake-quantized op. ``"float"``: every
        site runs the float op on the fake-quantized activation and weight (the same gradient;
        outputs equal up to float rounding). ``"auto"``: the integer kernel where
        `compressed`'s cost model (`jaxcompress.execute.policy.auto_choice`) says it is the
        faster one, the float fake-quantized op elsewhere.

    Returns:
      ``wrapped(*args, ranges=None, steps=None, weight_ranges=None, **kwargs) -> (outputs,
      observed)``: ``ranges`` ``{path: absmax}`` (tracked, e.g. `qat_activation_ranges`) or
      ``steps`` ``{path: step}`` (LSQ) for the ``"static"`` leaves; ``weight_ranges`` (integer
      arithmetic only): the weights' clip ranges; ``observed`` is ``{path: max|x|}`` of this
      call. Works under ``jit``, ``grad`` and ``vmap``; compose with `fake_quant` for the
      weights.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxcompress as jc
    >>> model = nn.Dense(3)
    >>> x = jax.random.normal(jax.random.key(0), (4, 8))
    >>> params = model.init(jax.random.key(1), x)
    >>> rules = [jc.QuantRule(pattern=".*kernel", channel_axes=(-1,), activation="static")]
    >>> apply = jc.fake_quant_activations(model.apply, rules)  # no weight_ranges below: the float forward
    >>> y, observed = apply(jc.fake_quant(params, rules), x, ranges={"params/kernel": jnp.float32(2.0)})
    >>> y.shape, sorted(observed)
    ((4, 3), ['params/kernel'])
    >>> bool(observed["params/kernel"] == jnp.max(jnp.abs(x)))
    True
    >>> ranges = {"params/kernel": jnp.float32(2.0)}
    >>> deployed = jc.compressed(model.apply)(jc.convert_qat(params, rules, activation_ranges=ranges), x)
    >>> bool(jnp.allclose(y, deployed, atol=1e-5))
    True
    >>> in_int8 = jc.fake_quant_activations(model.apply, rules, arithmetic="integer")
    >>> y_int8, _ = in_int8(jc.fake_quant(params, rules), x, ranges=ranges)
    >>> bool(jnp.array_equal(y_int8, deployed))       # the integer forward is the deployed one
    True
    """
    from jaxcompress.training.fake_quantize import _quant_rules

    if arithmetic is not None and arithmetic not in ARITHMETICS:
        raise ValueError(f"fake_quant_activations: arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    rules = _quant_rules(rules)
    cache = TraceCache()

    def wrapped(*args, ranges: dict | None = None, steps: dict | None = None, weight_ranges: dict | None = None, **kwargs):
        if ranges is not None and steps is not None:
            raise TypeError("pass tracked activation ranges or LSQ steps, not both")
        if weight_ranges is not None and arithmetic == "float":
            raise TypeError("weight_ranges is only used with integer arithmetic (the float forward takes fake_quant's weights as given)")
        if not 0 <= params_argnum < len(args):
            raise ValueError(f"params_argnum {params_argnum} is out of range for {len(args)} positional arguments")
        chosen = arithmetic if arithmetic is not None else ("integer" if weight_ranges is not None else "float")
        modes = activation_modes(args[params_argnum], rules, on_unused=on_unused)
        static = {path for path, mode in modes.items() if mode == "static"}
        given = ranges if ranges is not None else steps
        if given is not None:
            unknown = set(given) - static
            if unknown:
                raise ValueError(
                    f"activation ranges/steps given for paths without static activation quantization: {sorted(unknown)} "
                    f"(paths are relative to the params argument of the wrapped function, static ones here: "
                    f"{sorted(static)}; qat keys them by the tree given to opt.init, so pass the same tree)"
                )
            for path, value in given.items():
                if jnp.size(value) != 1:
                    raise ValueError(
                        f"activation {'ranges' if ranges is not None else 'steps'}[{path!r}]: expected a scalar "
                        f"(one per-tensor value per weight, as qat_activation_ranges returns), got shape {tuple(jnp.shape(value))}"
                    )
        def hook(site: DotSite, x: jax.Array, weight: jax.Array, observe) -> jax.Array:
            mode = modes[site.path]
            if not jnp.issubdtype(x.dtype, jnp.floating):
                return x
            absmax = jax.lax.stop_gradient(jnp.max(jnp.abs(x.astype(jnp.float32))))
            observe(site.path, absmax, "max")
            if mode == "dynamic":
                return activation_fake_quant(x, "dynamic", site.activation_reduce_axes)
            if steps is not None:
                if site.path not in steps:
                    raise ValueError(f"{site.path}: no LSQ activation step (see init_activation_steps)")
                return activation_fake_quant(x, "static", site.activation_reduce_axes, step=steps[site.path])
            tracked = jnp.asarray(ranges.get(site.path, 0.0) if ranges is not None else 0.0, jnp.float32)
            return activation_fake_quant(x, "static", site.activation_reduce_axes, absmax=tracked)

        if chosen == "float":
            outputs, observed = call_with_dot_hook(
                fn, args, kwargs, hook, select=modes.__contains__, params_argnum=params_argnum, cache=cache, observations=True
            )
            return outputs, dict(observed)
        views = integer_views(args[params_argnum], rules, modes, weight_ranges)

        def integer_hook(site: DotSite, x: jax.Array, weight: jax.Array, op: Callable, observe) -> jax.Array:
            mode = modes[site.path]
            if not jnp.issubdtype(x.dtype, jnp.floating):
                return op(x, weight)
            observe(site.path, jax.lax.stop_gradient(jnp.max(jnp.abs(x.astype(jnp.float32)))), "max")
            axes = site.activation_reduce_axes
            if mode == "dynamic":
                return run_site(site, x, weight, op, views.get(site.path), mode,
                                lambda a, p: activation_fake_quant(a, "dynamic", axes), jnp.zeros((), jnp.float32), None, chosen,
                                ste="identity")
            if steps is not None:
                if site.path not in steps:
                    raise ValueError(f"{site.path}: no LSQ activation step (see init_activation_steps)")
                step = jnp.asarray(steps[site.path], jnp.float32).reshape(())
                return run_site(site, x, weight, op, views.get(site.path), mode,
                                lambda a, p: activation_fake_quant(a, "static", axes, step=p), step, lambda a, p: p, chosen)
            tracked = jnp.asarray(ranges.get(site.path, 0.0) if ranges is not None else 0.0, jnp.float32).reshape(())
            return run_site(site, x, weight, op, views.get(site.path), mode,
                            lambda a, p: activation_fake_quant(a, "static", axes, absmax=p), tracked, _tracked_scale, chosen,
                            ste="clipped")

        outputs, observed = call_with_dot_hook(
            fn, args, kwargs, integer_hook, select=modes.__contains__, params_argnum=params_argnum, cache=cache,
            observations=True, replace_op=True,
        )
        return outputs, dict(observed)

    return wrapped


def _tracked_scale(x: jax.Array, absmax: jax.Array) -> jax.Array:
    # as activation_fake_quant: a range of 0 (nothing observed yet) uses the batch's own max|x|
    observed = jax.lax.stop_gradient(jnp.max(jnp.abs(x.astype(jnp.float32))))
    return static_scale(jnp.where(absmax > 0, absmax, observed))


def integer_views(params: Any, rules: Sequence[QuantRule], modes: dict[str, str], weight_ranges: dict | None) -> dict[str, WeightView]:
    """``{path: WeightView}``: the integer codes and scales of the W8A8 leaves of the
    fake-quantized ``params`` (quantized with ``weight_ranges``, as `convert_qat` does), for the
    integer-arithmetic forward; no gradient flows through them."""
    from jaxcompress.params import quantize_params

    qparams, _ = quantize_params(jax.lax.stop_gradient(params), rules, ranges=weight_ranges, on_unused="ignore")
    flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda leaf: isinstance(leaf, QArray))[0]
    views = {}
    for path, leaf in flat:
        name = path_to_str(path)
        if isinstance(leaf, QArray) and name in modes:
            views[name] = WeightView.from_qarray(leaf, name=name, path=name)
    return views


def init_activation_steps(
    fn: Callable,
    rules: Sequence[QuantRule] | QuantRule,
    *args,
    params_argnum: int = 0,
    **kwargs,
) -> dict[str, jax.Array]:
    """LSQ's initial activation steps ``2 * mean|x| / sqrt(127)`` from one call of ``fn``.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jnp.ones((2, 2))}
    >>> rules = [jc.QuantRule(pattern="w", activation="static")]
    >>> steps = jc.init_activation_steps(lambda p, x: x @ p["w"], rules, params, jnp.array([[1.0, -3.0]]))
    >>> round(float(steps["w"]), 4)  # 2 * 2 / sqrt(127)
    0.3549
    """
    from jaxcompress.training.fake_quantize import _quant_rules

    rules = _quant_rules(rules)
    modes = activation_modes(args[params_argnum], rules)
    def hook(site, x, weight, observe):
        if modes[site.path] == "static":
            observe((site.path, "mean_abs"), jnp.mean(jnp.abs(x.astype(jnp.float32))), "sum")
            observe((site.path, "uses"), jnp.ones((), jnp.float32), "sum")
        return x

    _, observed = call_with_dot_hook(fn, args, kwargs, hook, select=modes.__contains__, params_argnum=params_argnum, observations=True)
    steps = {}
    for (path, name), total in observed.items():
        if name != "mean_abs":
            continue
        mean_abs = total / observed[(path, "uses")]
        steps[path] = jnp.where(mean_abs > 0, 2.0 * mean_abs / math.sqrt(ACTIVATION_QMAX), 1.0).astype(jnp.float32)
    return steps
