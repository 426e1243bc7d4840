"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before W8A8.

Per input channel ``j`` of a weight ``W`` (matrix view ``(d_out, d_in)``)::

    s_j = max|X_j| ** alpha / max_i |W_ij| ** (1 - alpha)        (alpha: migration strength)

and ``x W^T = (x / s)(W diag(s))^T``: the activation ``x / s`` has flatter channels, the weight
``W diag(s)`` absorbs them, and both quantize to int8 with less error. The paper folds ``1/s`` into
the preceding LayerNorm; that needs graph knowledge, so here the quantized weight carries ``s`` as
`QArray.input_scale` and `jaxcompress.compressed` divides the activation by it right before the
int8 dot (one elementwise multiply per dot; the integer dot itself is unchanged). The float path
(`QArray.dequantize`) is exactly the smoothed model, so everything that dequantizes stays correct.

``alpha`` may be a grid: per layer the value minimising a proxy of the W8A8 output error on the
calibration statistics is kept (`smoothquant_error`): the weight-quantization error
``tr(E H E^T)`` (``E = Q(W s)/s - W``, ``H = X^T X``) plus the activation-quantization noise of a
per-tensor int8 grid over ``x / s`` (``rows * step^2 / 12 * ||Q(W s)||_F^2``, an upper bound of
the dynamic per-token grid). Only activation statistics are stored (capture's ``absmax`` and
``X^T X``), never activations.

The helpers at the bottom (`apply_input_scales` and friends) are shared with `awq`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.execute.calibration import attach_activation_scales, calibrate_activations
from jaxcompress.execute.layout import with_default_layout
from jaxcompress.oneshot.capture import LayerStatistics, capture_statistics, from_matrix, to_matrix
from jaxcompress.quant.plan import QuantizeReport, plan_quantization
from jaxcompress.qarray import QArray
from jaxcompress.quant.arrays import quantize
from jaxcompress.rules import QuantRule

__all__ = [
    "smoothquant",
    "smoothquant_scales",
    "smoothquant_error",
    "output_error",
    "LayerSmoothing",
    "SmoothingReport",
]

_SCALE_MIN, _SCALE_MAX = 1e-4, 1e4


def smoothquant_scales(act_absmax: Any, weight: Any, alpha: float) -> jax.Array:
    """Per-input-channel smoothing factors ``max|X_j|^alpha / max_i|W_ij|^(1-alpha)``.

    Channels whose activation or weight column is all zero get ``s = 1``; the rest are clipped to
    ``[1e-4, 1e4]`` (float32 safe).

    Args:
      act_absmax: ``(d_in,)`` max |x_j| over the calibration rows.
      weight: ``(d_out, d_in)`` matrix view.
      alpha: migration strength in ``[0, 1]`` (0: no smoothing, 1: all into the weight).

    >>> import jax.numpy as jnp
    >>> smoothquant_scales(jnp.array([4.0, 1.0, 0.0]), jnp.array([[1.0, 4.0, 2.0]]), 0.5).tolist()
    [2.0, 0.5, 1.0]
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha {alpha} is not in [0, 1]")
    act = jnp.asarray(act_absmax, jnp.float32)
    col = jnp.max(jnp.abs(jnp.asarray(weight, jnp.float32)), axis=0)
    if act.shape != col.shape:
        raise ValueError(f"act_absmax has shape {act.shape}, expected ({col.shape[0]},) (the weight's d_in)")
    valid = (act > 0) & (col > 0)
    safe_act = jnp.where(valid, act, 1.0)
    safe_col = jnp.where(valid, col, 1.0)
    scale = jnp.exp(alpha * jnp.log(safe_act) - (1.0 - alpha) * jnp.log(safe_col))
    return jnp.where(valid, jnp.clip(scale, _SCALE_MIN, _SCALE_MAX), 1.0)


def output_error(delta: Any, hessian: Any) -> jax.Array:
    """``tr(delta H delta^T) = sum_rows ||delta x||^2`` for a weight change ``delta`` (d_out, d_in)
    and ``H = sum_rows x x^T``: the squared output error on the calibration data, without the
    activations.

    >>> import jax.numpy as jnp
    >>> float(output_error(jnp.array([[1.0, 0.0]]), jnp.array([[2.0, 0.0], [0.0, 3.0]])))
    2.0
    """
    return _output_error(jnp.asarray(delta, jnp.float32), jnp.asarray(hessian, jnp.float32))


@jax.jit
def _output_error(delta, hessian):
    return jnp.sum(jnp.matmul(delta, hessian, precision="highest") * delta)


def smoothquant_error(weight, smoothed_dequant, scale, hessian, act_absmax, count: int) -> float:
    """The W8A8 error proxy used to pick ``alpha`` (see the module docs): weight error of
    ``Q(W s)/s`` plus per-tensor int8 activation noise on ``x / s``.

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 2.0]])
    >>> round(smoothquant_error(w, w, jnp.ones(2), jnp.eye(2), jnp.array([127.0, 0.0]), 1), 3)
    0.417
    """
    weight = jnp.asarray(weight, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    delta = jnp.asarray(smoothed_dequant, jnp.float32) / scale - weight
    weight_error = float(output_error(delta, hessian))
    step = float(jnp.max(jnp.asarray(act_absmax, jnp.float32) / scale)) / 127.0
    activation_error = count * step**2 / 12.0 * float(jnp.sum(jnp.square(smoothed_dequant)))
    return weight_error + activation_error


@dataclasses.dataclass(frozen=True)
class LayerSmoothing:
    """What a smoothing method chose for one weight.

    Attributes:
      path: the leaf's path.
      parameter: SmoothQuant's ``alpha`` or AWQ's exponent ``a``.
      clip: AWQ's clip ratio (mean over output rows; 1.0 = no clipping), else 1.0.
      error_plain: the method's error measure without smoothing (plain round-to-nearest).
      error: the same measure for the chosen setting (never above ``error_plain`` when the
        method searched a grid containing "no smoothing").
    """

    path: str
    parameter: float
    clip: float
    error_plain: float
    error: float


@dataclasses.dataclass(frozen=True)
class SmoothingReport:
    """Per-layer choices of `smoothquant` / `awq` and the underlying `QuantizeReport`.

    ``uncalibrated`` lists leaves the rules quantized that met no dot on the calibration data
    (quantized plainly, without an input scale).
    """

    method: str
    layers: tuple[LayerSmoothing, ...]
    quantize_report: QuantizeReport
    uncalibrated: tuple[str, ...]

    @property
    def quantized(self) -> tuple[str, ...]:
        return self.quantize_report.quantized

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "uncalibrated": list(self.uncalibrated),
            "quantize": self.quantize_report.to_dict(),
        }


# ---- shared tree-level machinery (used by awq too) -------------------------------------------
def input_scale_layout(scale: Any, leaf: Any, stats: LayerStatistics) -> jax.Array:
    """The ``(d_in,)`` factor in `QArray.input_scale` layout: the leaf's rank, full size on the
    leaf axes that make up ``d_in``, 1 on the others."""
    view = stats.view
    if view.kind != "dot":
        raise ValueError(
            f"{stats.view.path}: per-input-channel smoothing is implemented for dot / einsum weights, "
            f"not {view.kind} kernels"
        )
    d_out, d_in = view.shape
    full = from_matrix(jnp.broadcast_to(jnp.asarray(scale, jnp.float32)[None, :], (d_out, d_in)), leaf, stats)
    rows = np.asarray(from_matrix(jnp.broadcast_to(jnp.arange(d_out, dtype=jnp.float32)[:, None], (d_out, d_in)), leaf, stats))
    index = []
    for axis in range(rows.ndim):
        varies = rows.shape[axis] > 1 and bool(np.any(np.diff(rows, axis=axis) != 0))
        index.append(slice(0, 1) if varies else slice(None))
    result = jnp.asarray(full, jnp.float32)[tuple(index)]
    # check: d_in must be exactly the non-output axes (no axis mixes rows and columns)
    if int(np.prod(result.shape)) != d_in:
        raise ValueError(f"{view.path}: the weight's input and output axes are not separate leaf axes")
    return result


def quantize_smoothed(leaf: Any, scale: Any, stats: LayerStatistics, rule: QuantRule, name: str) -> QArray:
    """Quantize ``W diag(s)`` with the rule's spec and attach ``s`` as the input scale."""
    input_scale = input_scale_layout(scale, leaf, stats)
    smoothed = (jnp.asarray(leaf, jnp.float32) * input_scale).astype(jnp.asarray(leaf).dtype)
    q = quantize(smoothed, rule.spec, name=name)
    return dataclasses.replace(q, input_scale=input_scale)


def matrix_quantizer(leaf: Any, stats: LayerStatistics, rule: QuantRule, name: str) -> Callable[[jax.Array], jax.Array]:
    """``M -> to_matrix(dequantize(quantize(from_matrix(M))))``: the rule's quantizer seen in the
    ``(d_out, d_in)`` matrix view."""
    spec = rule.spec
    dtype = jnp.asarray(leaf).dtype

    def fake_quant(matrix):
        as_leaf = from_matrix(matrix, leaf, stats).astype(dtype)
        return to_matrix(quantize(as_leaf, spec, name=name).dequantize(jnp.float32), stats)

    return fake_quant


def run_smoothing(
    method: str,
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    rules: Sequence[QuantRule] | QuantRule,
    per_layer: Callable,
    *,
    hessian: bool,
    params_argnum: int = 0,
    row_mask: Callable | None = None,
) -> tuple[Any, SmoothingReport]:
    """Quantize ``params`` with ``rules``, then replace every quantized leaf that has calibration
    statistics by ``per_layer(leaf, stats, rule, name) -> (QArray, LayerSmoothing)``; static
    activation scales are calibrated afterwards on the smoothed weights."""
    plan = plan_quantization(params, rules)
    batches = list(batches)
    if not batches:
        raise ValueError(f"{method} needs at least one calibration batch")
    stats = capture_statistics(
        fn, params, batches, plan.__contains__, params_argnum=params_argnum, hessian=hessian, row_mask=row_mask
    )
    layers, uncalibrated, new_leaves = [], [], list(plan.leaves)
    for leaf in plan:
        value = plan.leaves[leaf.position]
        if leaf.path_str not in stats:
            uncalibrated.append(leaf.path_str)
            new_leaves[leaf.position] = quantize(value, leaf.rule.spec, name=leaf.name)
            continue
        qarray, layer = per_layer(value, stats[leaf.path_str], leaf.rule, leaf.name)
        layers.append(layer)
        new_leaves[leaf.position] = qarray
    quantize_report = plan.report()
    treedef = plan.match.treedef
    qparams = with_default_layout(jax.tree_util.tree_unflatten(treedef, new_leaves))  # as quantize_params
    if any(isinstance(q, QArray) and q.activation == "static" for q in new_leaves):
        scales = treedef.flatten_up_to(calibrate_activations(fn, qparams, batches))
        scales = [s if isinstance(q, QArray) and q.activation == "static" else None for q, s in zip(new_leaves, scales)]
        qparams = attach_activation_scales(qparams, jax.tree_util.tree_unflatten(treedef, scales))
    report = SmoothingReport(method, tuple(layers), quantize_report, tuple(uncalibrated))
    return qparams, report


def all_zero_inputs(stats: LayerStatistics, name: str, method: str) -> bool:
    """Warn (and return True) when every calibration input of a weight is zero."""
    if np.any(np.asarray(stats.absmax) > 0):
        if stats.hessian is not None and stats.count < stats.view.d_in:
            warnings.warn(
                f"{name}: only {stats.count} calibration rows for {stats.view.d_in} inputs; {method}'s "
                f"per-layer search is fitted to few samples (add calibration data)",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    warnings.warn(
        f"{name}: every calibration input of this weight is zero ({stats.count} rows); {method} has "
        f"no activation information here and quantizes it plainly (input scale 1)",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


# ---- SmoothQuant -----------------------------------------------------------------------------
def smoothquant(
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    rules: Sequence[QuantRule] | QuantRule,
    *,
    alpha: float | Sequence[float] = 0.5,
    params_argnum: int = 0,
    row_mask: Callable | None = None,
) -> tuple[Any, SmoothingReport]:
    """SmoothQuant-then-quantize the leaves ``rules`` select (see the module docs).

    Args:
      fn: the unmodified function, called as ``fn(params, *batch)`` (tuple batch) or
        ``fn(params, batch)``.
      params: float params.
      batches: calibration batches.
      rules: `QuantRule`s, typically W8A8: ``bits=8, channel_axes=(-1,)`` (per output channel)
        with ``activation="dynamic"`` (per-token) or ``"static"`` (per-tensor; the activation
        scales are calibrated here on the smoothed weights).
      alpha: migration strength, or a grid of them searched per layer (error proxy in the module
        docs; include 0.0 to allow "no smoothing").
      params_argnum: where ``params`` sits in ``fn``'s positional arguments.
      row_mask: optional ``row_mask(batch) -> array`` of rows to keep in the statistics (e.g.
        ``lambda batch: batch[1]``, an attention mask, to leave padding tokens out); see
        `jaxcompress.oneshot.capture.capture_statistics`.

    Returns:
      ``(qparams, report)``: `QArray`s carrying ``input_scale`` where calibration statistics
      exist (run them with `jaxcompress.compressed`), and a `SmoothingReport`.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 4))}
    >>> fn = lambda p, x: x @ p["w"]
    >>> x = jax.random.normal(jax.random.key(1), (32, 16)) * jnp.linspace(0.1, 30.0, 16)
    >>> rules = [jc.QuantRule(pattern="w", bits=8, channel_axes=(-1,), activation="dynamic")]
    >>> qparams, report = smoothquant(fn, params, [x], rules, alpha=0.5)
    >>> qparams["w"].input_scale.shape, report.layers[0].parameter
    ((16, 1), 0.5)
    >>> y = jc.compressed(fn)(qparams, x)                    # int8 x int8 on x / s
    >>> bool(jnp.abs(y - fn(params, x)).max() < 0.02 * jnp.abs(fn(params, x)).max())
    True
    """
    alphas = tuple(float(a) for a in np.ravel(np.asarray(alpha, np.float64)))  # a value or a grid
    if not alphas:
        raise ValueError("alpha grid is empty")
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha {a} is not in [0, 1]")
    search = len(alphas) > 1

    def per_layer(leaf, stats, rule, name):
        weight = to_matrix(leaf, stats)
        if all_zero_inputs(stats, name, "smoothquant"):
            q = quantize_smoothed(leaf, jnp.ones(stats.view.d_in), stats, rule, name)
            return q, LayerSmoothing(stats.view.path, 0.0, 1.0, 0.0, 0.0)
        fake_quant = matrix_quantizer(leaf, stats, rule, name)
        best = None
        plain_error = np.nan
        if search:
            ones = jnp.ones(stats.view.d_in)
            plain_error = smoothquant_error(weight, fake_quant(weight), ones, stats.hessian, stats.absmax, stats.count)
        for a in alphas:
            scale = smoothquant_scales(stats.absmax, weight, a)
            error = np.nan
            if search:
                smoothed = fake_quant(weight * scale[None, :])
                error = smoothquant_error(weight, smoothed, scale, stats.hessian, stats.absmax, stats.count)
            if best is None or error < best[0]:
                best = (error, a, scale)
        error, a, scale = best
        q = quantize_smoothed(leaf, scale, stats, rule, name)
        return q, LayerSmoothing(stats.view.path, a, 1.0, float(plain_error), float(error))

    return run_smoothing(
        "smoothquant", fn, params, batches, rules, per_layer, hessian=search, params_argnum=params_argnum, row_mask=row_mask
    )
