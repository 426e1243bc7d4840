"""Static activation scales: calibrate on sample batches, attach to the `QArray`\\ s.

`calibrate_activations` runs an UNMODIFIED function on sample batches with the integer-execution
rule set of the program layer (`jaxcompress.execute.rules`), every quantized weight in weight-only
mode, and observes the activation each quantized weight meets in a ``dot_general`` /
``conv_general_dilated`` (inside loops and branches too: observations are outputs of the rebuilt
bodies). Only what the method needs is computed, in ONE compiled program per batch signature:

* ``"absmax"``: ``max|x|`` over every use and batch (no sort);
* ``"percentile"``: the mean over batches and uses of the per-use percentile of ``|x|`` (no
  sort: `magnitude_percentile` bisects on the float bits with counting passes);
* ``"mse"``: a first pass finds ``max|x|``, a second accumulates a histogram of ``|x|`` over
  ``[0, max|x|]`` (``bins`` bins); the clip value ``c = r * absmax``, ``r`` on a grid of
  ``grid_size`` ratios in ``[min_ratio, 1]``, minimises the int8 round-trip error of the histogram
  (bin centres weighted by counts, float64, NumPy); ``r = 1`` is on the grid.

The scale is ``c / 127`` (float32). A weight used by several dots (tied weights) pools them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.execute.activation import ACTIVATION_QMAX
from jaxcompress._program import TraceCache, is_qarray
from jaxcompress.execute.rules import ExecutionOptions, run_with_qarrays
from jaxcompress.qarray import QArray
from jaxcompress.quant.spec import ACTIVATION_MODES, CALIBRATION_METHODS

__all__ = ["calibrate_activations", "attach_activation_scales"]


def _histogram_errors(counts: np.ndarray, absmax: float, ratios: np.ndarray) -> np.ndarray:
    """Mean squared int8 round-trip error of a histogram of ``|x|`` over ``[0, absmax]`` for each
    clip ``ratio * absmax`` (bin centres stand for their values; all ratios in one array op)."""
    edges = np.linspace(0.0, absmax, counts.size + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    total = max(float(counts.sum()), 1.0)
    scales = (np.asarray(ratios, np.float64) * absmax / ACTIVATION_QMAX)[:, None]
    codes = np.clip(np.round(centres[None, :] / scales), -ACTIVATION_QMAX, ACTIVATION_QMAX)
    return np.sum(counts[None, :] * np.square(codes * scales - centres[None, :]), axis=1) / total


def _mse_clip(counts: np.ndarray, absmax: float, grid_size: int, min_ratio: float) -> float:
    ratios = np.linspace(min_ratio, 1.0, grid_size)[::-1]  # r = 1 first: ties keep absmax
    errors = _histogram_errors(counts, absmax, ratios)
    return float(ratios[int(np.argmin(errors))] * absmax)


_INF_BITS = 0x7F800000  # float32 +inf: the bit patterns of |x| (>= 0) sort as the values do


def magnitude_percentile(magnitude: jax.Array, percentile: float) -> jax.Array:
    """``jnp.percentile(magnitude, percentile)`` (linear interpolation) of a 1-D array of values
    ``>= 0``, without sorting: the lower order statistic it interpolates is found by bisection on
    the float32 bit patterns (31 counting passes, each one compare and sum over the values), its
    neighbour by one more pass (count and minimum of the values above it).

    >>> x = jnp.arange(1000.0)[::-1]
    >>> float(magnitude_percentile(x, 99.9)), float(jnp.percentile(x, 99.9))
    (998.0009765625, 998.0009765625)
    """
    n = magnitude.shape[0]
    position = percentile / 100.0 * (n - 1)
    lower = int(math.floor(position))
    upper = min(lower + 1, n - 1)
    k = n - lower  # sorted[lower] is the k-th largest value
    keys = jax.lax.bitcast_convert_type(magnitude.astype(jnp.float32), jnp.int32)

    def bisect(_, bounds):
        lo, hi = bounds  # count(keys >= lo) >= k > count(keys > hi)
        mid = lo + (hi - lo + 1) // 2
        enough = jnp.sum(keys >= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    found, _ = jax.lax.fori_loop(0, 31, bisect, (jnp.int32(0), jnp.int32(_INF_BITS)))
    if upper == lower:
        following = found
    else:
        # sorted[upper] is the (k - 1)-th largest: the smallest value above sorted[lower] when
        # exactly k - 1 values lie above it, else a tie with sorted[lower] (one more pass)
        above = keys > found
        smallest_above = jnp.min(jnp.where(above, keys, jnp.int32(_INF_BITS)))
        following = jnp.where(jnp.sum(above, dtype=jnp.int32) >= k - 1, smallest_above, found)
    low, high = jax.lax.bitcast_convert_type(jnp.stack([found, following]), jnp.float32)
    return low + (high - low) * jnp.float32(position - lower)


def _observer(method: str, percentile: float, bins: int):
    """``observe(evaluator, view, x, reduce_axes)`` recording what ``method`` needs per leaf."""

    def observe(ev, view, x, reduce_axes):
        if view.leaf_index is None:
            return
        magnitude = jnp.abs(x.astype(jnp.float32)).ravel()
        key = view.leaf_index
        ev.observe(("absmax", key), jnp.max(magnitude), "max")
        if method == "percentile":
            ev.observe(("percentile", key), magnitude_percentile(magnitude, percentile), "sum")
            ev.observe(("uses", key), jnp.ones((), jnp.float32), "sum")
        if method == "mse" and ev.context.limits is not None and key in ev.context.limits:
            limit = ev.context.limits[key]
            index = jnp.clip((magnitude / jnp.maximum(limit, 1e-30) * bins).astype(jnp.int32), 0, bins - 1)
            ev.observe(("histogram", key), jnp.zeros((bins,), jnp.float32).at[index].add(1.0), "sum")

    return observe


@dataclasses.dataclass(frozen=True)
class _CalibrationOptions(ExecutionOptions):
    limits: Any = None  # {leaf index: absmax} for the histogram pass of "mse"


def calibrate_activations(
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    *,
    method: str = "absmax",
    percentile: float = 99.99,
    grid_size: int = 64,
    min_ratio: float = 0.3,
    bins: int = 2048,
) -> Any:
    """Static activation scales for the `QArray`\\ s of ``params``, from sample batches.

    Args:
      fn: the unmodified function, called as ``fn(params, *batch)`` (a tuple batch) or
        ``fn(params, batch)``.
      params: the quantized params (`QArray` leaves).
      batches: an iterable of sample batches (at least one).
      method: ``"absmax"``, ``"percentile"`` or ``"mse"`` (see the module docs).
      percentile, grid_size, min_ratio, bins: options of those methods.

    Returns:
      A pytree with ``params``' structure: at each `QArray` a float32 scalar activation scale
      (``None`` if the weight never met a dot / conv), ``None`` at every other leaf. Attach it
      with `attach_activation_scales`.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> from jaxcompress.execute.calibration import attach_activation_scales
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4)), "b": jnp.zeros(4)}
    >>> rules = [jc.QuantRule(pattern="w", channel_axes=(-1,), activation="static")]
    >>> qparams, _ = jc.quantize_params(params, rules)
    >>> fn = lambda p, x: x @ p["w"] + p["b"]
    >>> batches = [jnp.full((2, 8), 0.5), jnp.full((2, 8), -2.54)]
    >>> scales = calibrate_activations(fn, qparams, batches)
    >>> round(float(scales["w"]), 4), scales["b"]
    (0.02, None)
    >>> qparams = attach_activation_scales(qparams, scales)
    >>> from jaxcompress.execute.transform import compressed
    >>> y = compressed(fn)(qparams, batches[0])        # int8 x int8 with the static scale
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r} is not one of {CALIBRATION_METHODS}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile {percentile} is not in (0, 100]")
    if bins < 16:
        raise ValueError(f"calibrate_activations: bins must be >= 16, got {bins}")
    flat_params, params_tree = jax.tree_util.tree_flatten(params, is_leaf=is_qarray)
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate_activations needs at least one batch")
    program = _calibration_program(fn, method, float(percentile), int(bins))

    totals: dict = {}
    for batch in batches:
        _merge(totals, program(params, _as_args(batch), None))
    if method == "mse":
        limits = {key: totals[("absmax", key)] for (name, key) in list(totals) if name == "absmax"}
        limits = {key: jnp.asarray(value, jnp.float32) for key, value in limits.items()}
        for batch in batches:
            _merge(totals, program(params, _as_args(batch), limits), only="histogram")

    scales: list[jax.Array | None] = []
    for index, leaf in enumerate(flat_params):
        if not isinstance(leaf, QArray) or ("absmax", index) not in totals:
            scales.append(None)
            continue
        absmax = float(totals[("absmax", index)])
        if method == "absmax":
            clip = absmax
        elif method == "percentile":
            clip = float(totals[("percentile", index)]) / float(totals[("uses", index)])
        else:
            counts = np.asarray(totals[("histogram", index)], np.float64)
            clip = _mse_clip(counts, absmax, grid_size, min_ratio) if absmax > 0 else 0.0
        scale = clip / ACTIVATION_QMAX if clip > 0 else 1.0
        scales.append(jnp.asarray(scale, jnp.float32))
    return jax.tree_util.tree_unflatten(params_tree, scales)


def _as_args(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, tuple) else (batch,)


@functools.lru_cache(maxsize=16)
def _calibration_program(fn: Callable, method: str, percentile: float, bins: int) -> Callable:
    """One jitted ``(params, batch_args, limits) -> observations``, shared by every call with the
    same function and options (compiled once per batch signature, not once per call)."""
    observe = _observer(method, percentile, bins)
    cache = TraceCache()

    def statistics(params, batch_args, limits):
        options = _CalibrationOptions(weight_only=True, observe_activations=observe, limits=limits)
        _, observations = run_with_qarrays(fn, (params,) + tuple(batch_args), {}, options, cache)
        if limits is None:
            return {k: v for k, v in observations.items() if k[0] != "histogram"}
        return {k: v for k, v in observations.items() if k[0] == "histogram"}

    return jax.jit(statistics)


def _merge(totals: dict, observed: dict, only: str | None = None) -> None:
    if only is not None:
        observed = {key: value for key, value in observed.items() if key[0] == only}
    for key, value in jax.device_get(observed).items():  # one transfer for all observations
        value = np.asarray(value, np.float64)
        if key not in totals:
            totals[key] = value
        elif key[0] == "absmax":
            totals[key] = np.maximum(totals[key], value)
        else:
            totals[key] = totals[key] + value


def attach_activation_scales(params: Any, scales: Any, *, activation: str | None = None) -> Any:
    """Store calibrated activation scales on the `QArray`\\ s of ``params``.

    Args:
      params: quantized params.
      scales: the output of `calibrate_activations` for these params.
      activation: if given (e.g. ``"static"``), also set this activation mode on every `QArray`
        that received a scale; by default each keeps the mode its rule chose.

    Returns:
      ``params`` with ``activation_scale`` set (`QArray.nbytes` counts it).

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> q = {"w": jc.quantize(jnp.ones((4, 2)))}
    >>> q = attach_activation_scales(q, {"w": jnp.float32(0.1)}, activation="static")
    >>> q["w"].activation, float(q["w"].activation_scale), q["w"].nbytes
    ('static', 0.10000000149011612, 16)
    """
    if activation is not None and activation not in ACTIVATION_MODES:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATION_MODES}")

    def attach(leaf, scale):
        if not isinstance(leaf, QArray) or scale is None:
            return leaf
        changes = {"activation_scale": jnp.asarray(scale, jnp.float32).reshape(())}
        if activation is not None:
            changes["activation"] = activation
        return dataclasses.replace(leaf, **changes)

    return jax.tree_util.tree_map(attach, params, scales, is_leaf=is_qarray)
