"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales for low-bit weight-only
quantization.

Input channels that see large activations matter more; scaling them up before rounding shrinks
their relative rounding error. Per weight (matrix view ``W``, ``(d_out, d_in)``)::

    s(a) = mean|X_j| ** a, normalised to sqrt(max s * min s) = 1,  a on a grid in [0, 1]
    error(a) = tr(E H E^T),  E = Q(W diag s) diag(s)^-1 - W,  H = X^T X

and the ``a`` with the smallest error is kept. ``a = 0`` (``s = 1``) is plain round-to-nearest
and is on the grid, so AWQ's calibration error is never above RTN's. The error is computed from
the captured ``H`` alone: no activation is stored. Optionally (``clip_grid``) each output row then
gets a clip ratio ``r`` (the row's values clipped to ``r`` times their group's absmax before
rounding), chosen per row by the same error (rows are independent in ``tr(E H E^T)``);
``r = 1`` is always a candidate.

The result is a `QArray` of ``Q(W diag s)`` carrying ``s`` as `QArray.input_scale`; in
`jaxcompress.compressed` the activation is divided by ``s`` before the (weight-only or integer)
dot, and `QArray.dequantize` gives ``Q(W s) / s``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.oneshot.capture import from_matrix, to_matrix
from jaxcompress.oneshot.smoothquant import (
    LayerSmoothing,
    SmoothingReport,
    all_zero_inputs,
    input_scale_layout,
    matrix_quantizer,
    output_error,
    run_smoothing,
)
from jaxcompress.qarray import QArray
from jaxcompress.quant.arrays import place_like_param, quantize
from jaxcompress.quant.groups import merge_groups, split_groups
from jaxcompress.rules import QuantRule

__all__ = ["awq", "awq_scales", "awq_matrix", "row_errors", "fake_quant_rows"]


def awq_scales(act_mean: Any, exponent: float) -> jax.Array:
    """``mean|X_j| ** exponent`` normalised so that ``sqrt(max * min) = 1``; channels with zero
    mean get the smallest positive mean (never 0 or NaN); all-zero input gives ones.

    >>> import jax.numpy as jnp
    >>> awq_scales(jnp.array([4.0, 1.0]), 1.0).tolist(), awq_scales(jnp.array([4.0, 1.0]), 0.0).tolist()
    ([2.0, 0.5], [1.0, 1.0])
    """
    mean = jnp.asarray(act_mean, jnp.float32)
    positive = mean > 0
    if not bool(jnp.any(positive)):
        return jnp.ones_like(mean)
    floor = jnp.min(jnp.where(positive, mean, jnp.inf))
    mean = jnp.maximum(mean, floor)
    log_scale = exponent * jnp.log(mean)
    log_scale = log_scale - 0.5 * (jnp.max(log_scale) + jnp.min(log_scale))
    return jnp.exp(log_scale)


def row_errors(delta: Any, hessian: Any) -> jax.Array:
    """Per output row ``delta_i H delta_i^T`` (their sum is `output_error`).

    >>> import jax.numpy as jnp
    >>> row_errors(jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.diag(jnp.array([2.0, 3.0]))).tolist()
    [2.0, 3.0]
    """
    return _row_errors(jnp.asarray(delta, jnp.float32), jnp.asarray(hessian, jnp.float32))


@jax.jit
def _row_errors(delta, hessian):
    return jnp.sum(jnp.matmul(delta, hessian, precision="highest") * delta, axis=1)


def fake_quant_rows(weight: Any, bits: int, group_size: int | None = None) -> jax.Array:
    """Symmetric absmax round-to-nearest of a ``(d_out, d_in)`` matrix, one scale per row (per
    group of ``group_size`` columns when given; a last group shorter when it does not divide
    ``d_in``): the default quantizer of `awq_matrix`.

    >>> import jax.numpy as jnp
    >>> fake_quant_rows(jnp.array([[1.0, 0.6, 0.3, 0.0]]), bits=2).tolist()
    [[1.0, 1.0, 0.0, 0.0]]
    >>> fake_quant_rows(jnp.array([[1.0, 0.6, 0.5, 0.2, 0.25]]), bits=2, group_size=2).tolist()
    [[1.0, 1.0, 0.5, 0.0, 0.25]]
    """
    weight = jnp.asarray(weight, jnp.float32)
    d_out, d_in = weight.shape
    group = d_in if group_size is None else min(group_size, d_in)
    if group < 1:
        raise ValueError(f"group size must be a positive int, got {group_size!r}")
    padded = split_groups(weight, 1, group, "zero")  # (d_out, n_groups, group); zeros change no absmax
    qmax = 2 ** (bits - 1) - 1
    scale = jnp.max(jnp.abs(padded), axis=-1, keepdims=True) / qmax
    scale = jnp.where(scale > 0, scale, 1.0)
    return merge_groups(jnp.clip(jnp.round(padded / scale), -qmax, qmax) * scale, 1, d_in)


def awq_matrix(
    weight: Any,
    hessian: Any,
    act_mean: Any,
    fake_quant: Callable[[jax.Array], jax.Array],
    *,
    grid: int = 20,
    clip_grid: Sequence[float] = (),
    group_absmax: Callable[[jax.Array], jax.Array] | None = None,
) -> dict[str, Any]:
    """AWQ search for one matrix (see the module docs).

    Args:
      weight: ``(d_out, d_in)``.
      hessian: ``(d_in, d_in)`` ``sum x x^T`` (any positive multiple).
      act_mean: ``(d_in,)`` mean |x_j|.
      fake_quant: the quantizer as a matrix function (quantize then dequantize).
      grid: number of exponents ``a`` in ``linspace(0, 1, grid)``.
      clip_grid: clip ratios to try per row (``1.0`` is always added); empty: no clip search.
      group_absmax: ``M -> per-element absmax of its quantization group`` (needed for the clip
        search; default: the whole row).

    Returns:
      dict with ``scale`` (d_in,), ``exponent``, ``clip`` (d_out,) ratios, ``matrix`` (the matrix
      to quantize: ``W diag(s)``, clipped), ``error`` and ``error_rtn`` (``tr(E H E^T)``).

    >>> import jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (8, 16))
    >>> x = jax.random.normal(jax.random.key(1), (64, 16)) * jnp.linspace(0.1, 5.0, 16)
    >>> out = awq_matrix(w, x.T @ x, jnp.abs(x).mean(0), lambda m: fake_quant_rows(m, 4), grid=5)
    >>> bool(out["error"] <= out["error_rtn"])
    True
    """
    weight = jnp.asarray(weight, jnp.float32)
    hessian = jnp.asarray(hessian, jnp.float32)
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    error_rtn = float(output_error(fake_quant(weight) - weight, hessian))
    best = (error_rtn, 0.0, jnp.ones(weight.shape[1], jnp.float32))
    for exponent in np.linspace(0.0, 1.0, grid)[1:] if grid > 1 else ():
        scale = awq_scales(act_mean, float(exponent))
        delta = fake_quant(weight * scale[None, :]) / scale[None, :] - weight
        error = float(output_error(delta, hessian))
        if np.isfinite(error) and error < best[0]:
            best = (error, float(exponent), scale)
    error, exponent, scale = best
    matrix = weight * scale[None, :]
    clip = jnp.ones(weight.shape[0], jnp.float32)
    if len(clip_grid):
        if group_absmax is None:
            group_absmax = lambda m: jnp.broadcast_to(jnp.max(jnp.abs(m), axis=1, keepdims=True), m.shape)
        limit = group_absmax(matrix)
        ratios = sorted({1.0, *(float(r) for r in clip_grid)}, reverse=True)
        candidates, errors = [], []
        for ratio in ratios:
            clipped = jnp.clip(matrix, -ratio * limit, ratio * limit)
            candidates.append(clipped)
            errors.append(row_errors(fake_quant(clipped) / scale[None, :] - weight, hessian))
        choice = jnp.argmin(jnp.stack(errors), axis=0)  # first (largest ratio) on ties
        clipped = jnp.take_along_axis(jnp.stack(candidates), choice[None, :, None], axis=0)[0]
        clipped_error = float(output_error(fake_quant(clipped) / scale[None, :] - weight, hessian))
        if clipped_error < error:  # rows interact through a shared (per-tensor) scale: re-check
            matrix, error = clipped, clipped_error
            clip = jnp.asarray(ratios, jnp.float32)[choice]
    return {"scale": scale, "exponent": exponent, "clip": clip, "matrix": matrix, "error": error, "error_rtn": error_rtn}


def _group_absmax(leaf: Any, stats, rule: QuantRule, name: str) -> Callable[[jax.Array], jax.Array]:
    """Per-element absmax of the element's quantization group (rule's spec), in matrix view."""
    spec = dataclasses.replace(rule.spec, symmetric=True, calibration="absmax", activation="weight_only")
    qmax = 2 ** (spec.bits - 1) - 1 if spec.qtype == "int" else 1.0
    dtype = jnp.asarray(leaf).dtype

    def group_absmax(matrix):
        q = quantize(from_matrix(matrix, leaf, stats).astype(dtype), spec, name=name)
        per_element = dataclasses.replace(q, values=jnp.ones_like(q.values)).dequantize(jnp.float32)
        return to_matrix(per_element * qmax, stats)

    return group_absmax


def awq(
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    rules: Sequence[QuantRule] | QuantRule,
    *,
    grid: int = 20,
    clip_grid: Sequence[float] = (),
    params_argnum: int = 0,
    row_mask: Callable | None = None,
) -> tuple[Any, Any]:
    """AWQ-then-quantize the leaves ``rules`` select (see the module docs).

    Args:
      fn: the unmodified function, ``fn(params, *batch)`` / ``fn(params, batch)``.
      params: float params.
      batches: calibration batches.
      rules: `QuantRule`s, typically ``bits=4, channel_axes=(-1,), group_size=128`` (weight-only);
        8-bit and W8A8 rules work too.
      grid: exponents ``a`` searched in ``linspace(0, 1, grid)`` per layer.
      clip_grid: optional clip ratios searched per output row after the scale (e.g.
        ``(0.95, 0.9, 0.85, 0.8)``); ``()`` (default) skips the clip search.
      params_argnum: where ``params`` sits in ``fn``'s positional arguments.
      row_mask: optional ``row_mask(batch) -> array`` of rows to keep in the statistics (e.g.
        ``lambda batch: batch[1]``, an attention mask, to leave padding tokens out).

    Returns:
      ``(qparams, report)``: `QArray`\\ s with ``input_scale`` (run them with
      `jaxcompress.compressed` or dequantize them), and a `SmoothingReport` whose layers give the
      chosen exponent, mean clip ratio and the calibration error vs round-to-nearest.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jax.random.normal(jax.random.key(0), (32, 8))}
    >>> fn = lambda p, x: x @ p["w"]
    >>> x = jax.random.normal(jax.random.key(1), (64, 32)) * jnp.linspace(0.1, 10.0, 32)
    >>> rules = [jc.QuantRule(pattern="w", bits=4, channel_axes=(-1,), group_size=16)]
    >>> qparams, report = awq(fn, params, [x], rules, grid=5)
    >>> layer = report.layers[0]
    >>> layer.error <= layer.error_plain, qparams["w"].input_scale.shape
    (True, (32, 1))
    """

    def per_layer(leaf, stats, rule, name):
        weight = to_matrix(leaf, stats)
        fake_quant = matrix_quantizer(leaf, stats, rule, name)
        if all_zero_inputs(stats, name, "awq"):
            ones = jnp.ones(stats.view.d_in, jnp.float32)
            q = dataclasses.replace(quantize(jnp.asarray(leaf), rule.spec, name=name), input_scale=input_scale_layout(ones, leaf, stats))
            return place_like_param(leaf, q), LayerSmoothing(stats.view.path, 0.0, 1.0, 0.0, 0.0)
        hessian = np.asarray(stats.hessian) / max(stats.count, 1)
        act_mean = np.asarray(stats.abs_sums) / max(stats.count, 1)
        group_absmax = _group_absmax(leaf, stats, rule, name) if len(clip_grid) else None
        result = awq_matrix(
            weight, hessian, act_mean, fake_quant, grid=grid, clip_grid=clip_grid, group_absmax=group_absmax
        )
        input_scale = input_scale_layout(result["scale"], leaf, stats)
        smoothed = from_matrix(result["matrix"], leaf, stats).astype(jnp.asarray(leaf).dtype)
        # Computed on the whole matrix: put back where the param lives (values like it, group
        # scales along a sharded group axis where the groups align with the shards).
        q = place_like_param(leaf, dataclasses.replace(quantize(smoothed, rule.spec, name=name), input_scale=input_scale))
        layer = LayerSmoothing(
            stats.view.path,
            result["exponent"],
            float(jnp.mean(result["clip"])),
            result["error_rtn"],
            result["error"],
        )
        return q, layer

    return run_smoothing(
        "awq", fn, params, batches, rules, per_layer, hessian=True, params_argnum=params_argnum, row_mask=row_mask
    )
