"""Fake quantization for quantization-aware training: quantize -> dequantize in the forward pass.

Two gradients are offered:

* **Clipped straight-through estimator** (`fake_quant_array`, and `fake_quant` without steps):
  the scale is computed from the current weights exactly as post-training quantization would
  (same `QuantSpec`, same calibration; no gradient flows into it), and the gradient with respect
  to the weight is the identity where the weight lies inside the representable range and zero
  where it was clipped (Bengio et al. 2013; the clip matters for percentile / MSE calibration).
* **LSQ** (`lsq_fake_quant`, and `fake_quant` with ``steps``): a learned step size per scale
  group (Esser et al. 2020, "Learned Step Size Quantization"). With ``v = x / s``:
  ``d x_hat / d x = 1`` inside ``[qmin, qmax]`` else 0, and
  ``d x_hat / d s = round(v) - v`` inside, ``qmin`` below, ``qmax`` above, with the step's
  gradient scaled by ``1 / sqrt(N * qmax)`` (N = elements sharing the step).

Both keep the array's shape and dtype, so a model's ``apply`` runs unchanged on the result.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.qarray import INT_QTYPE, NF4_QTYPE
from jaxcompress.quant.calibrate import calibrate_array
from jaxcompress.quant.codec import (
    blocks_to_groups,
    decode,
    encode,
    fp8_max,
    from_blocks,
    from_grouped,
    groups_to_blocks,
    int_range,
    scale_from_range,
    to_blocks,
    to_grouped,
)
from jaxcompress.quant.groups import group_lengths
from jaxcompress.quant.spec import QuantSpec, ResolvedSpec
from jaxcompress.quant.plan import as_quant_rules, plan_quantization
from jaxcompress.rules import QuantRule, path_to_keystr

__all__ = ["fake_quant_array", "lsq_fake_quant", "init_lsq_step", "fake_quant", "init_lsq_steps", "weight_ranges", "weight_range"]


def _resolve(x: jax.Array, spec: QuantSpec | ResolvedSpec, name: str) -> ResolvedSpec:
    if isinstance(spec, ResolvedSpec):
        return spec
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array to fake-quantize, got dtype {x.dtype}")
    return spec.resolve(tuple(x.shape), name)


def _blocked(x: jax.Array, spec: ResolvedSpec) -> tuple[jax.Array, int | None]:
    """``x`` as float32 in the blocked view of `jaxcompress.quant.codec` (the grouped view when
    groups align with the shards, a ragged axis zero-padded to whole groups), which keeps a
    sharded group axis sharded. `from_blocks` maps results back to ``x``'s shape."""
    return to_blocks(x.astype(jnp.float32), spec)


def weight_range(x: jax.Array, spec: ResolvedSpec) -> tuple[jax.Array, jax.Array]:
    """The calibrated clip range ``(lo, hi)`` of ``x`` in the QArray scale layout (no gradient)."""
    lo, hi = calibrate_array(jax.lax.stop_gradient(x.astype(jnp.float32)), spec)
    return from_grouped(lo, spec), from_grouped(hi, spec)


def _ste_forward(x: jax.Array, lo: jax.Array, hi: jax.Array, spec: ResolvedSpec):
    grouped, block = _blocked(x, spec)
    scale, zero_point = scale_from_range(to_grouped(lo, spec), to_grouped(hi, spec), spec)
    scale, zero_point = groups_to_blocks(scale, spec, block), groups_to_blocks(zero_point, spec, block)
    out = decode(encode(grouped, scale, zero_point, spec), scale, zero_point, spec.qtype)
    codes = grouped / scale
    if spec.qtype == NF4_QTYPE:
        inside = jnp.abs(codes) <= 1.0  # the code book spans [-1, 1]
    elif spec.qtype == INT_QTYPE:
        qmin, qmax = int_range(spec.bits, spec.symmetric)
        if zero_point is not None:
            codes = codes + zero_point
        inside = (codes >= qmin) & (codes <= qmax)
    else:
        inside = jnp.abs(codes) <= fp8_max(spec.qtype)
    shape = tuple(x.shape)
    return from_blocks(out, spec, shape).astype(x.dtype), from_blocks(inside, spec, shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ste(x: jax.Array, lo: jax.Array, hi: jax.Array, spec: ResolvedSpec) -> jax.Array:
    return _ste_forward(x, lo, hi, spec)[0]


def _ste_fwd(x, lo, hi, spec):
    out, inside = _ste_forward(x, lo, hi, spec)
    return out, (inside, lo, hi)


def _ste_bwd(spec, residuals, g):
    inside, lo, hi = residuals
    # The range is a statistic of the weights, not a learned quantity: no gradient flows into it.
    return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(lo), jnp.zeros_like(hi)


_ste.defvjp(_ste_fwd, _ste_bwd)


def fake_quant_array(
    x: jax.Array,
    spec: QuantSpec | None = None,
    *,
    clip_range: tuple[jax.Array, jax.Array] | None = None,
    name: str = "array",
    **options,
) -> jax.Array:
    """``dequantize(quantize(x))`` with a clipped straight-through gradient.

    ``clip_range``: a ``(lo, hi)`` pair in the QArray scale layout (e.g. tracked by `qat`) used
    instead of calibrating on ``x``.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> x = jnp.array([0.1, -0.6, 1.0, 0.33])
    >>> [round(float(v), 3) for v in jc.fake_quant_array(x, bits=4, symmetric=True)]
    [0.143, -0.571, 1.0, 0.286]
    >>> jax.grad(lambda w: jc.fake_quant_array(w, bits=4, symmetric=True).sum())(x).tolist()
    [1.0, 1.0, 1.0, 1.0]
    >>> clipped = (jnp.array([-0.5]), jnp.array([0.5]))  # a range that clips 1.0 and -0.6
    >>> jax.grad(lambda w: jc.fake_quant_array(w, bits=4, symmetric=True, clip_range=clipped).sum())(x).tolist()
    [1.0, 0.0, 0.0, 1.0]
    """
    if spec is None:
        spec = QuantSpec(**options)
    elif options:
        raise TypeError(f"pass either a QuantSpec or keyword options, not both (got {sorted(options)})")
    resolved = _resolve(x, spec, name)
    if clip_range is None:
        lo, hi = weight_range(x, resolved)
    else:
        lo, hi = (jnp.asarray(a, jnp.float32) for a in clip_range)
        expected = _scale_shape(resolved, tuple(x.shape))
        if tuple(lo.shape) != expected or tuple(hi.shape) != expected:
            raise ValueError(
                f"{name}: clip range has shapes {tuple(lo.shape)} / {tuple(hi.shape)}, expected {expected} for this spec"
            )
    return _ste(x, lo, hi, resolved)


def _scale_shape(spec: ResolvedSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The QArray ``scale`` shape for ``shape`` under ``spec``."""
    reduce_axes = spec.reduce_axes(len(shape))
    grouped = tuple(1 if a in reduce_axes else d for a, d in enumerate(spec.grouped_shape(shape)))
    if spec.group_axis is None:
        return grouped
    return grouped[: spec.group_axis + 1] + grouped[spec.group_axis + 2 :]


# ---- LSQ -------------------------------------------------------------------------------------


def _check_lsq(spec: ResolvedSpec, name: str) -> None:
    if spec.qtype != INT_QTYPE or not spec.symmetric:
        raise ValueError(f"{name}: LSQ supports symmetric integer quantization only (got {spec.qtype}, symmetric={spec.symmetric}; "
                         "integer rules of <= 4 bits default to asymmetric: pass symmetric=True)")


def _group_count(spec: ResolvedSpec, shape: tuple[int, ...]) -> Any:
    """Elements per scale group: an int, or for a ragged group axis an array in the grouped
    layout (the last group has fewer)."""
    grouped_shape = spec.grouped_shape(shape)
    reduce_axes = spec.reduce_axes(len(shape))
    if spec.group_axis is None or spec.group_size is None:
        return int(math.prod(grouped_shape[a] for a in reduce_axes))
    axis = spec.group_axis
    others = int(math.prod(grouped_shape[a] for a in reduce_axes if a != axis + 1))
    lengths = jnp.asarray(group_lengths(shape[axis], spec.group_size), jnp.float32) * others
    layout = [1] * len(grouped_shape)
    layout[axis] = len(group_lengths(shape[axis], spec.group_size))
    return lengths.reshape(layout)


def _lsq_parts(x, step, spec):
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    grouped, block = _blocked(x, spec)
    s = groups_to_blocks(to_grouped(step.astype(jnp.float32), spec), spec, block)
    v = grouped / s
    rounded = jnp.clip(jnp.round(v), qmin, qmax)
    return grouped, s, v, rounded, qmin, qmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lsq(x: jax.Array, step: jax.Array, spec: ResolvedSpec) -> jax.Array:
    _, s, _, rounded, _, _ = _lsq_parts(x, step, spec)
    return from_blocks(rounded * s, spec, tuple(x.shape)).astype(x.dtype)


def _lsq_fwd(x, step, spec):
    return _lsq(x, step, spec), (x, step)


def _lsq_bwd(spec, residuals, g):
    x, step = residuals
    grouped, s, v, rounded, qmin, qmax = _lsq_parts(x, step, spec)
    _, block = _blocked(x, spec)
    g = to_blocks(g.astype(jnp.float32), spec, block)[0]
    below, above = v < qmin, v > qmax
    inside = ~(below | above)
    grad_x = from_blocks(jnp.where(inside, g, 0.0), spec, tuple(x.shape)).astype(x.dtype)
    d_step = jnp.where(below, float(qmin), jnp.where(above, float(qmax), rounded - v))
    reduce_axes = spec.reduce_axes(x.ndim)
    grad_scale = 1.0 / jnp.sqrt(_group_count(spec, tuple(x.shape)) * qmax)
    per_block = jnp.sum(g * d_step, axis=reduce_axes, keepdims=True)
    grad_step = from_grouped(blocks_to_groups(per_block, spec, block, "sum") * grad_scale, spec)
    return grad_x, grad_step.reshape(step.shape).astype(step.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def init_lsq_step(x: jax.Array, spec: QuantSpec | None = None, *, name: str = "array", **options) -> jax.Array:
    """LSQ's initial step ``2 * mean|x| / sqrt(qmax)`` per scale group, in the QArray scale layout.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> step = jc.init_lsq_step(jnp.array([[1.0, -2.0], [3.0, -4.0]]), bits=4, channel_axes=(1,))
    >>> step.shape, [round(float(v), 4) for v in step[0]]  # 2 * mean|x| / sqrt(7)
    ((1, 2), [1.5119, 2.2678])
    """
    resolved = _resolve(x, spec if spec is not None else QuantSpec(**{"symmetric": True, **options}), name)  # LSQ: symmetric
    _check_lsq(resolved, name)
    _, qmax = int_range(resolved.bits, resolved.symmetric)
    grouped, block = _blocked(x, resolved)
    per_block = jnp.sum(jnp.abs(grouped), axis=resolved.reduce_axes(x.ndim), keepdims=True)
    mean_abs = blocks_to_groups(per_block, resolved, block, "sum") / _group_count(resolved, tuple(x.shape))
    return from_grouped(jnp.where(mean_abs > 0, 2.0 * mean_abs / math.sqrt(qmax), 1.0), resolved)


def lsq_fake_quant(x: jax.Array, step: jax.Array, spec: QuantSpec | None = None, *, name: str = "array", **options) -> jax.Array:
    """Fake-quantize ``x`` with a learned step size; differentiable in ``x`` and ``step``.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> x = jnp.array([[0.2, -1.4, 3.0]])
    >>> step = jnp.array([[0.5]])
    >>> jc.lsq_fake_quant(x, step, bits=3).tolist()
    [[0.0, -1.5, 1.5]]
    >>> gx, gs = jax.grad(lambda a, s: jc.lsq_fake_quant(a, s, bits=3).sum(), argnums=(0, 1))(x, step)
    >>> gx.tolist()  # 3.0 / 0.5 = 6 > qmax = 3: clipped
    [[1.0, 1.0, 0.0]]
    """
    resolved = _resolve(x, spec if spec is not None else QuantSpec(**{"symmetric": True, **options}), name)  # LSQ: symmetric
    _check_lsq(resolved, name)
    expected = _scale_shape(resolved, tuple(x.shape))
    if tuple(step.shape) != tuple(expected):
        raise ValueError(f"{name}: LSQ step has shape {tuple(step.shape)}, expected {tuple(expected)} for this spec")
    return _lsq(x, step, resolved)


# ---- pytrees ---------------------------------------------------------------------------------


_quant_rules = as_quant_rules


def _selected(params, rules, on_unused):
    """The plan's match and, per leaf, ``(path, path_str, leaf, QuantSpec or None)``."""
    plan = plan_quantization(params, rules, on_unused=on_unused)
    specs = {leaf.position: leaf.rule.spec for leaf in plan}
    matched = plan.match
    selected = [
        (path, path_str, leaf, specs.get(position))
        for position, (path, path_str, leaf) in enumerate(zip(matched.paths, matched.path_strs, matched.leaves))
    ]
    return matched, selected


def init_lsq_steps(params: Any, rules: Sequence[QuantRule] | QuantRule, *, on_unused: str = "warn") -> dict[str, jax.Array]:
    """Initial LSQ steps for every leaf the rules quantize: ``{path string: step}``.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> steps = jc.init_lsq_steps({"w": jnp.ones((4, 2))}, [jc.QuantRule(pattern="w", bits=4, symmetric=True, channel_axes=(-1,))])
    >>> {k: v.shape for k, v in steps.items()}
    {'w': (1, 2)}
    """
    rules = _quant_rules(rules)
    return {
        path_str: init_lsq_step(leaf, spec, name=path_to_keystr(path))
        for path, path_str, leaf, spec in _selected(params, rules, on_unused)[1]
        if spec is not None
    }


def weight_ranges(
    params: Any, rules: Sequence[QuantRule] | QuantRule, *, on_unused: str = "warn"
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The calibrated clip range ``(lo, hi)`` of every leaf the rules quantize, by path string,
    in the QArray scale layout. `qat` tracks these; `fake_quant` and `quantize_params` accept them.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> ranges = jc.weight_ranges({"w": jnp.array([[1.0, -3.0], [2.0, 0.5]])}, [jc.QuantRule(pattern="w", channel_axes=(-1,))])
    >>> ranges["w"][1].tolist()
    [[2.0, 3.0]]
    """
    rules = _quant_rules(rules)
    return {
        path_str: weight_range(leaf, spec.resolve(tuple(leaf.shape), path_to_keystr(path)))
        for path, path_str, leaf, spec in _selected(params, rules, on_unused)[1]
        if spec is not None
    }


def _check_keys(given: dict, quantized: set, what: str) -> None:
    unknown = set(given) - quantized
    if unknown:
        raise ValueError(f"{what} given for paths the rules do not quantize: {sorted(unknown)}")


def fake_quant(
    params: Any,
    rules: Sequence[QuantRule] | QuantRule,
    steps: dict[str, jax.Array] | None = None,
    *,
    ranges: dict[str, tuple[jax.Array, jax.Array]] | None = None,
    on_unused: str = "warn",
) -> Any:
    """Fake-quantize the leaves of ``params`` that ``rules`` select (same tree, same dtypes).

    * default: scales calibrated on the current weights (as in `quantize_params`), clipped
      straight-through gradient;
    * ``ranges`` (from `weight_ranges` or `qat_ranges` of a `qat` optimizer state): those clip
      ranges instead (tracked / frozen during QAT), clipped straight-through gradient;
    * ``steps`` (from `init_lsq_steps`, trained alongside the params): LSQ, differentiable in both.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"dense": {"kernel": jnp.linspace(-1, 1, 8).reshape(4, 2), "bias": jnp.ones(2)}}
    >>> rules = [jc.QuantRule(pattern=".*kernel", bits=4, symmetric=True, channel_axes=(-1,))]
    >>> fq = jc.fake_quant(params, rules)
    >>> bool(jnp.all(fq["dense"]["kernel"] == jc.dequantize_params(jc.quantize_params(params, rules)[0])["dense"]["kernel"]))
    True
    >>> g = jax.grad(lambda p: jc.fake_quant(p, rules)["dense"]["kernel"].sum())(params)
    >>> g["dense"]["kernel"].tolist()[0]
    [1.0, 1.0]
    """
    if steps is not None and ranges is not None:
        raise TypeError("pass LSQ steps or clip ranges, not both")
    rules = _quant_rules(rules)
    matched, selected = _selected(params, rules, on_unused)
    quantized_paths = {path_str for _, path_str, _, spec in selected if spec is not None}
    if steps is not None:
        _check_keys(steps, quantized_paths, "LSQ steps")
    if ranges is not None:
        _check_keys(ranges, quantized_paths, "clip ranges")
    leaves = []
    for path, path_str, leaf, spec in selected:
        if spec is None:
            leaves.append(leaf)
            continue
        name = path_to_keystr(path)
        if steps is not None:
            if path_str not in steps:
                raise ValueError(f"{name}: no LSQ step for this leaf (see init_lsq_steps)")
            leaves.append(lsq_fake_quant(leaf, steps[path_str], spec, name=name))
        elif ranges is not None:
            if path_str not in ranges:
                raise ValueError(f"{name}: no clip range for this leaf (see weight_ranges)")
            leaves.append(fake_quant_array(leaf, spec, clip_range=ranges[path_str], name=name))
        else:
            leaves.append(fake_quant_array(leaf, spec, name=name))
    return matched.unflatten(leaves)
