"""Static activation scales: calibrate on sample batches, attach to the `QArray`\\ s.

`calibrate_activations` runs an UNMODIFIED function on sample batches through the same jaxpr
re-interpretation as `jaxcompress.compressed`, with every quantized weight in weight-only mode,
and records the activation each quantized weight meets in a ``dot_general`` /
``conv_general_dilated``. Per batch it keeps ``max|x|``, the requested percentile of ``|x|`` and
an evenly strided sample of ``|x|`` (``sample_size`` values); across batches:

* ``"absmax"``: the largest ``max|x|`` of all batches;
* ``"percentile"``: the mean over batches of the per-batch percentile of ``|x|``;
* ``"mse"``: the clip value ``c = r * absmax``, ``r`` on a grid of ``grid_size`` ratios in
  ``[min_ratio, 1]``, minimising the mean squared int8 round-trip error of the pooled samples
  (float64, NumPy); ``r = 1`` is on the grid.

The scale is ``c / 127`` (float32). A weight used by several dots (tied weights) pools them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.execute.activation import ACTIVATION_QMAX
from jaxcompress.execute.interpret import Interpreter
from jaxcompress.execute.trace import TraceCache, call_with_qarrays, is_qarray
from jaxcompress.qarray import QArray
from jaxcompress.quant.spec import ACTIVATION_MODES, CALIBRATION_METHODS

__all__ = ["calibrate_activations", "attach_activation_scales"]


def _batch_statistics(x: jax.Array, percentile: float, sample_size: int):
    magnitude = jnp.abs(x.astype(jnp.float32)).ravel()
    stride = max(1, magnitude.size // sample_size)
    sample = magnitude[::stride][:sample_size]
    return jnp.max(magnitude), jnp.percentile(magnitude, percentile), sample


def _mse_clip(samples: np.ndarray, absmax: float, grid_size: int, min_ratio: float) -> float:
    best_clip, best_error = absmax, np.inf
    for ratio in np.linspace(min_ratio, 1.0, grid_size)[::-1]:
        clip = ratio * absmax
        scale = clip / ACTIVATION_QMAX
        codes = np.clip(np.round(samples / scale), -ACTIVATION_QMAX, ACTIVATION_QMAX)
        error = float(np.mean(np.square(codes * scale - samples)))
        if error < best_error:
            best_clip, best_error = clip, error
    return best_clip


def calibrate_activations(
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    *,
    method: str = "absmax",
    percentile: float = 99.99,
    grid_size: int = 64,
    min_ratio: float = 0.3,
    sample_size: int = 4096,
) -> Any:
    """Static activation scales for the `QArray`\\ s of ``params``, from sample batches.

    Args:
      fn: the unmodified function, called as ``fn(params, *batch)`` (a tuple batch) or
        ``fn(params, batch)``.
      params: the quantized params (`QArray` leaves).
      batches: an iterable of sample batches (at least one).
      method: ``"absmax"``, ``"percentile"`` or ``"mse"`` (see the module docs).
      percentile, grid_size, min_ratio, sample_size: options of those methods.

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
    >>> from jaxcompress.compressed import compressed
    >>> y = compressed(fn)(qparams, batches[0])        # int8 x int8 with the static scale
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r} is not one of {CALIBRATION_METHODS}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile {percentile} is not in (0, 100]")
    flat_params, params_tree = jax.tree_util.tree_flatten(params, is_leaf=is_qarray)
    cache = TraceCache()

    def statistics(params, batch):
        recorded: dict[int, list] = {}

        def on_activation(view, x, reduce_axes):
            if view.leaf_index is not None:
                recorded.setdefault(view.leaf_index, []).append(_batch_statistics(x, percentile, sample_size))

        interpreter = Interpreter(weight_only=True, on_activation=on_activation)
        call_args = (params,) + (tuple(batch) if isinstance(batch, tuple) else (batch,))
        call_with_qarrays(fn, call_args, {}, interpreter, cache)
        return recorded

    statistics = jax.jit(statistics)
    pooled: dict[int, dict[str, list]] = {}
    count = 0
    for batch in batches:
        count += 1
        for index, uses in statistics(params, batch).items():
            entry = pooled.setdefault(index, {"absmax": [], "percentile": [], "samples": []})
            for absmax, pct, sample in uses:
                entry["absmax"].append(float(absmax))
                entry["percentile"].append(float(pct))
                entry["samples"].append(np.asarray(sample, np.float64))
    if count == 0:
        raise ValueError("calibrate_activations needs at least one batch")

    scales = []
    for index, leaf in enumerate(flat_params):
        if not isinstance(leaf, QArray) or index not in pooled:
            scales.append(None)
            continue
        entry = pooled[index]
        absmax = max(entry["absmax"])
        if method == "absmax":
            clip = absmax
        elif method == "percentile":
            clip = float(np.mean(entry["percentile"]))
        else:
            clip = _mse_clip(np.concatenate(entry["samples"]), absmax, grid_size, min_ratio)
        scale = clip / ACTIVATION_QMAX if clip > 0 else 1.0
        scales.append(jnp.asarray(scale, jnp.float32))
    return jax.tree_util.tree_unflatten(params_tree, scales)


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
