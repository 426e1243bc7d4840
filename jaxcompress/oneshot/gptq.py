"""GPTQ (Frantar et al. 2022): one-shot weight quantization with second-order error feedback.

For a layer ``y = x W^T`` with ``W`` of shape ``(d_out, d_in)`` (the canonical matrix view of
`jaxcompress.oneshot.capture`) and calibration inputs ``X`` (rows ``x``), GPTQ quantizes the
columns of ``W`` one at a time and spreads each column's rounding error over the columns not yet
quantized so as to minimise ``||(W_q - W) X^T||^2``. With ``H = 2 X^T X``:

1. inputs never active in calibration (``H_ii = 0``, "dead") get ``H_ii = 1`` and, as in the
   paper's reference code, ``W[:, i] = 0`` (``zero_dead=False`` keeps them, rounded);
2. damping: ``H += damp * mean(diag H) * I`` (a non-finite Cholesky retries with 10x damping,
   with a warning);
3. ``U`` = the upper Cholesky factor of ``H^-1`` (from one Cholesky of the reversed ``H`` and a
   triangular inverse);
4. columns in blocks of ``block_size``: column ``j`` is rounded to ``q``, the error
   ``(w - q) / U_jj`` updates the rest of its block at once (``W1 -= err U[j, block]``), and each
   finished block updates all later columns with one matrix product (the "lazy batch" update).

Options: ``act_order`` processes columns by decreasing ``H_ii``. Groups are ALWAYS contiguous in
the ORIGINAL column order (the `QArray` layout, so ``compressed``, checkpoints and
``dequantize`` work unchanged): with ``static_groups=False`` (default) a group's scale is chosen
when the first of its columns is processed, from the group's current (error-updated) weights --
without ``act_order`` this is the reference implementation's rule; with ``act_order`` it is the
same rule applied in the permuted order (the reference's ``static_groups=False`` instead regroups
the permuted columns, which a per-group scale layout cannot store). ``static_groups=True``
computes every group's scale from the original weights before any update (the reference's
``static_groups=True``). Without groups the scale (per output channel or per tensor) is computed
from the whole matrix before the first update, as in the reference.

Groups need not divide the input width: ``group_size=128`` on 576 inputs gives 5 groups, the last
of 64 columns (the `QArray` stores ``ceil(d_in / g)`` scales, `jaxcompress.quant.groups`).

Clipping search (``clip_search=True``, the default): where a group's scale is chosen, 20 ratios
in [0.5, 1) shrink its calibrated range and the one with the least ``diag(H)``-weighted
rounding error of the group is kept (ratio 1 stays on the grid, so it is never worse by that
measure).

Dense targets (``dense_target=True``, the default): in a sequential pass each layer's inputs
``x`` come from the partly quantized model; the layer is fit to the DENSE model's output on the
same row, ``min ||W_q x - W x_d||`` (GPTAQ's "asymmetric calibration"), by quantizing the
least-squares target ``W* = (W C^T + lam W)(H + lam I)^-1`` with ``C = sum x x_d^T`` captured
alongside (`jaxcompress.oneshot.targets`; the dense model runs in the same capture pass).

Measured (``benchmarks/gptq.py``, all-MiniLM-L6-v2, W4 g128 act-order, 256 calibration
sentences, mean cosine to fp32): 0.9823 symmetric without the clipping search, 0.9850 with it,
0.9883 asymmetric with it, 0.9905 asymmetric with it and the dense target: hence the
defaults (a rule without ``symmetric`` is asymmetric at 4 bits and below, `jaxcompress.QuantSpec`).

The scale / zero-point rule is the layer's `QuantRule` (bits 2..8, symmetric or asymmetric,
``calibration`` absmax / percentile / mse on the group's current values, ``scale_dtype``), using
the same codec as `jaxcompress.quantize`, so the `QArray` built from GPTQ's codes dequantizes
to exactly GPTQ's weights.

The per-matrix algorithm (`gptq_matrix`) is one jitted function (``fori_loop`` over blocks and
over the columns of a block, vectorised rank-1 and block updates). `gptq` applies it over a
params tree, sequentially by default: each group of layers that read the same activation gets
its statistics from the forward pass with every earlier quantized layer already using its GPTQ
weights (one pass of the model in all, cut between groups; see `sequential_capture`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.oneshot.capture import (
    from_matrix,
    sequential_capture,
    sequential_groups,
    to_matrix,
)
from jaxcompress.oneshot.capture import like_leaf as _like
from jaxcompress.execute.layout import with_default_layout
from jaxcompress.oneshot.gptq_core import GPTQResult, gptq_matrix
from jaxcompress.oneshot.targets import dense_target_weight
from jaxcompress.qarray import INT_QTYPE, QArray, storage_dtype
from jaxcompress.quant.arrays import place_like_param, quantize
from jaxcompress.quant.groups import expand_groups, num_groups
from jaxcompress.quant.plan import LeafDecision, QuantizeReport, plan_quantization
from jaxcompress.quant.spec import ResolvedSpec
from jaxcompress.rules import QuantRule

__all__ = ["GPTQResult", "GPTQReport", "LayerResult", "gptq_matrix", "gptq"]



@dataclasses.dataclass(frozen=True)
class LayerResult:
    """What `gptq` did with one leaf.

    Attributes:
      path: the leaf's path.
      method: ``"gptq"``, or ``"rtn"`` (round to nearest: the leaf reaches no dot / conv).
      rows: calibration rows its statistics came from.
      dead_inputs: inputs that were zero on every row.
      damp: the relative damping used.
      error / rtn_error: the output error ``sum_rows ||(W_q - W) x||^2`` on the calibration
        rows (the rows this layer saw, with quantized predecessors in sequential mode) of GPTQ
        and of round-to-nearest with the same rule (``nan`` for ``"rtn"`` leaves); with a dense
        target, ``W`` is that target ``W*`` for both.
      seconds: wall time of the per-matrix algorithm.
    """

    path: str
    method: str
    rows: int = 0
    dead_inputs: int = 0
    damp: float = 0.0
    error: float = math.nan
    rtn_error: float = math.nan
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class GPTQReport(QuantizeReport):
    """A `QuantizeReport` (per-leaf decisions, unused rules) plus a `LayerResult` per quantized leaf."""

    layers: tuple[LayerResult, ...] = ()
    capture_seconds: float = 0.0
    gptq_seconds: float = 0.0

    def layer(self, path: str) -> LayerResult:
        return next(layer for layer in self.layers if layer.path == path)


def _scale_shape(shape, spec: ResolvedSpec) -> tuple[int, ...]:
    out = []
    for axis, dim in enumerate(shape):
        if axis in spec.channel_axes:
            out.append(dim)
        elif axis == spec.group_axis and spec.group_size is not None:
            out.append(num_groups(dim, spec.group_size))  # a ragged last group counts
        else:
            out.append(1)
    return tuple(out)


def _scale_index_map(leaf_shape, spec: ResolvedSpec, view, name: str):
    """For the matrix view: the flat scale index of every element, the column groups and whether
    rows keep their own scale. Raises when the rule's scales do not fit GPTQ's column order."""
    scale_shape = _scale_shape(leaf_shape, spec)
    index = np.arange(math.prod(scale_shape), dtype=np.float32).reshape(scale_shape)
    if spec.group_axis is not None and spec.group_size is not None:
        index = expand_groups(index, spec.group_axis, spec.group_size, leaf_shape[spec.group_axis])
    index = np.broadcast_to(index, leaf_shape)
    matrix = np.asarray(to_matrix(jnp.asarray(index), view)).astype(np.int64)
    _, column_groups = np.unique(matrix[0], return_inverse=True)
    column_groups = column_groups.reshape(-1)
    n_groups = int(column_groups.max()) + 1
    if np.all(matrix == matrix[:1]):
        per_channel = False
    else:
        per_channel = True
        first_column = np.zeros(n_groups, np.int64)
        first_column[column_groups[::-1]] = np.arange(len(column_groups))[::-1]
        consistent = np.array_equal(matrix, matrix[:, first_column][:, column_groups])
        if not consistent or len(np.unique(matrix)) != matrix.shape[0] * n_groups:
            raise ValueError(
                f"{name}: GPTQ needs each scale to cover whole output rows or all rows of a column group of the "
                f"(d_out={view.d_out}, d_in={view.d_in}) matrix view; channel_axes={spec.channel_axes}, "
                f"group_axis={spec.group_axis} do not (use the output axes as channel_axes, groups on an input axis)"
            )
    return matrix, column_groups, per_channel


def _to_qarray(leaf, result: GPTQResult, index_map, column_groups, spec: ResolvedSpec, view) -> QArray:
    d_out = view.d_out
    scale_shape = _scale_shape(tuple(leaf.shape), spec)
    rows = np.arange(d_out)[:, None]
    scale_np = np.asarray(result.scale)[column_groups[None, :], rows]
    flat_scale = np.zeros(math.prod(scale_shape), np.float32)
    flat_scale[index_map] = scale_np
    values = from_matrix(result.codes, jax.ShapeDtypeStruct(tuple(leaf.shape), jnp.float32), view)
    zero_point = None
    if not spec.symmetric:
        flat_zero = np.zeros(math.prod(scale_shape), np.float32)
        flat_zero[index_map] = np.asarray(result.zero_point)[column_groups[None, :], rows]
        zero_point = jnp.asarray(flat_zero.reshape(scale_shape)).astype(storage_dtype(spec.bits))
    # Placed where the param lives: values like it, group scales along a sharded group axis too
    # where the groups align with the shards (`place_like_param`).
    return place_like_param(leaf, QArray(
        values=values.astype(storage_dtype(spec.bits)),
        scale=jnp.asarray(flat_scale.reshape(scale_shape)).astype(spec.scale_dtype),
        zero_point=zero_point,
        bits=spec.bits,
        qtype=spec.qtype,
        channel_axes=spec.channel_axes,
        group_axis=spec.group_axis,
        group_size=spec.group_size,
        dtype=jnp.dtype(leaf.dtype),
        activation=spec.activation,
    ))


def _output_error(delta: np.ndarray, hessian: np.ndarray) -> float:
    """``sum_rows ||delta x||^2 = tr(delta H delta^T)`` with ``H = sum x x^T`` (float64)."""
    delta = np.asarray(delta, np.float64)
    return float(np.sum((delta @ hessian) * delta))


def gptq(
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    rules: Sequence[QuantRule] | QuantRule,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    static_groups: bool = False,
    sequential: bool | Callable[[str], Any] = True,
    zero_dead: bool = True,
    clip_search: bool = True,
    dense_target: bool = True,
    target_damp: float = 0.1,
    row_mask: Callable[[Any], Any] | None = None,
    params_argnum: int = 0,
    on_unused: str = "warn",
) -> tuple[Any, GPTQReport]:
    """GPTQ-quantize the leaves of ``params`` that ``rules`` select, calibrated on ``batches``.

    Args:
      fn: the unmodified function, called as ``fn(params, *batch)`` (a tuple batch) or
        ``fn(params, batch)`` (``params_argnum`` moves params).
      params: float params.
      batches: sample batches (a list; each segment of a sequential pass runs over all of them).
      rules: `QuantRule`\\ s, as for `jaxcompress.quantize_params` (bits, symmetric,
        channel_axes, group_size, calibration, scale_dtype, activation). Scales must cover whole
        output rows of the layer's matrix view, possibly split into groups along an input axis:
        per-output-channel (``channel_axes=(-1,)`` for Dense / Conv kernels), per-tensor, and
        groups along the input axis (the default ``group_axis``).
      act_order: process columns by decreasing ``H_ii`` (default ``True``; `gptq_matrix`'s
        default stays ``False``). Measured on all-MiniLM-L6-v2 (W4 g128, the default
        asymmetric rule, clipping search and dense targets): 0.98983 mean cosine without it,
        0.99048 with it.
      damp, block_size, static_groups, zero_dead: see `gptq_matrix`.
      clip_search: ``True`` (default): each group's clipping range is searched (20 shrink ratios
        in [0.5, 1], the least ``diag(H)``-weighted rounding error; `gptq_matrix`) instead of
        taken from the rule's ``calibration`` alone.
      dense_target: ``True`` (default): fit each layer to the DENSE model's outputs on the
        calibration rows (``min ||W_q x - W x_d||``, ``x_d`` the dense model's input there; the
        dense model runs alongside the capture: about 1.6x the capture time on all-MiniLM-L6-v2): GPTQ quantizes
        the least-squares target `jaxcompress.oneshot.targets.dense_target_weight` instead of
        ``W``, and the report's errors are measured against that target. ``False``: each layer
        is fit to its own weight on the inputs it sees (the paper's GPTQ). Only changes
        anything when ``sequential``.
      target_damp: the target's ridge towards ``W``, relative to ``mean(diag(X^T X))``.
        Measured on all-MiniLM-L6-v2 (W4 g128 asymmetric, act-order, clipping search, 256
        calibration sentences; mean cosine to fp32): 0.9883 without the dense target, 0.9894
        with ``target_damp=0.01``, 0.9905 with 0.1.
      sequential: ``True`` (default): each group of layers reading the same activation is
        calibrated on inputs computed with every earlier layer already quantized (one pass of
        ``fn`` in all, cut between groups: `jaxcompress.oneshot.capture.sequential_capture`).
        A callable ``stage(path) -> key``: consecutive groups whose first paths share a key are
        calibrated together (the reference implementation's per-block mode, e.g. ``lambda
        path: path.split("/")[2]`` for ``layer_3``): earlier blocks quantized, layers inside a
        block float. ``False``: all statistics from one pass of the float model.
      row_mask: ``row_mask(batch) -> array``: calibration rows where it is 0 are ignored (e.g.
        padding tokens); see `jaxcompress.oneshot.capture.capture_statistics`.
      params_argnum: where params go among ``fn``'s positional arguments.
      on_unused: rules that matched nothing: ``"warn"``, ``"error"`` or ``"ignore"``.

    Returns:
      ``(qparams, report)``: the tree with `QArray`\\ s laid out exactly as `quantize_params`
      gives (``dequantize_params``, `jaxcompress.compressed` and checkpoints work), and a
      `GPTQReport`. Selected leaves that feed no dot / conv are rounded to nearest (reported).

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = {"w1": jax.random.normal(k1, (16, 32)), "w2": jax.random.normal(k2, (32, 8))}
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    >>> batches = [jax.random.normal(k3, (64, 16))]
    >>> rules = [jc.QuantRule(pattern="w.", bits=4, channel_axes=(-1,), group_size=8)]
    >>> qparams, report = gptq(fn, params, batches, rules)
    >>> type(qparams["w1"]).__name__, report.quantized
    ('QArray', ('w1', 'w2'))
    >>> all(layer.error <= layer.rtn_error for layer in report.layers)
    True
    """
    plan = plan_quantization(params, rules, on_unused=on_unused)
    rules = plan.rules
    batches = list(batches)
    if not batches:
        raise ValueError("gptq needs at least one calibration batch")
    matched = plan.match
    leaves = list(matched.leaves)
    position = {leaf.path_str: leaf.position for leaf in plan}
    targets: dict[str, tuple[QuantRule, ResolvedSpec, str]] = {}
    for leaf in plan:
        if leaf.rule.qtype != INT_QTYPE:
            raise ValueError(f"{leaf.name}: GPTQ quantizes to integers; qtype={leaf.rule.qtype!r} is not supported")
        targets[leaf.path_str] = (leaf.rule, leaf.spec, leaf.name)
    decisions: dict[str, LeafDecision] = {d.path: d for d in plan.report({p: " gptq" for p in targets}).leaves}

    select = lambda path: path in targets
    groups = sequential_groups(fn, params, batches[0], select, params_argnum=params_argnum)
    reached = [path for group in groups for path in group]
    if sequential is False and groups:
        groups = [tuple(reached)]
    elif callable(sequential):
        stages: list[tuple[Any, list[str]]] = []
        for group in groups:
            key = sequential(group[0])
            if stages and stages[-1][0] == key:
                stages[-1][1].extend(group)
            else:
                stages.append((key, list(group)))
        groups = [tuple(paths) for _, paths in stages]
    new_leaves = list(leaves)
    current = list(leaves)
    stacked: dict[str, int] = {}
    layers: dict[str, LayerResult] = {}
    capture_seconds = gptq_seconds = 0.0
    start = time.perf_counter()
    # Group after group from one pass of fn (or one pass per group), compiled ahead in the background.
    drift = dense_target and sequential is not False
    captures = sequential_capture(
        fn, matched.unflatten(current), [frozenset(group).__contains__ for group in groups], batches,
        params_argnum=params_argnum, row_mask=row_mask, dense_params=matched.unflatten(list(leaves)) if drift else None,
    )
    capture_seconds += time.perf_counter() - start
    with captures:
        for group_index, group in enumerate(groups):
            start = time.perf_counter()
            stats = captures(group_index, matched.unflatten(current))
            capture_seconds += time.perf_counter() - start
            for path in group:
                rule, spec, name = targets[path]
                leaf = leaves[position[path]]
                s = stats[path]
                gram = s.hessian
                if gram is None:  # pragma: no cover - sequential_capture always records it
                    raise AssertionError(f"{name}: no Hessian was captured")
                if s.site.stacked:  # layers stacked along a scan's xs: one Hessian per layer
                    stacked[path] = gram.shape[0]
                    continue
                start = time.perf_counter()
                index_map, column_groups, per_channel = _scale_index_map(tuple(leaf.shape), spec, s.view, name)
                W = to_matrix(leaf, s)
                target_leaf = leaf  # what round-to-nearest is compared on: the same target as GPTQ
                if drift and s.cross is not None:
                    W = jnp.asarray(dense_target_weight(W, gram, s.cross, damp=target_damp, name=name), jnp.float32)
                    target_leaf = from_matrix(W, jnp.asarray(leaf), s)
                hessian = 2.0 * gram / max(s.count, 1)
                result = gptq_matrix(
                    W, hessian, spec.bits, symmetric=spec.symmetric, per_channel=per_channel,
                    column_groups=column_groups, damp=damp, block_size=block_size, act_order=act_order,
                    static_groups=static_groups, zero_dead=zero_dead, clip_search=clip_search,
                    calibration=spec.calibration,
                    scale_dtype=spec.scale_dtype, name=name,
                )
                qarray = _to_qarray(leaf, result, index_map, column_groups, spec, s.view)
                rtn = to_matrix(quantize(target_leaf, rule.spec, name=name).dequantize(jnp.float32), s)
                W64 = np.asarray(W, np.float64)
                gptq_seconds += time.perf_counter() - start
                layers[path] = LayerResult(
                    path, "gptq", s.count, int(np.sum(np.diag(gram) == 0)), result.damp,
                    _output_error(np.asarray(result.weights) - W64, gram),
                    _output_error(np.asarray(rtn) - W64, gram),
                    time.perf_counter() - start,
                )
                new_leaves[position[path]] = qarray
                if sequential is not False:
                    current[position[path]] = _like(leaf, qarray.dequantize())
    for path, (rule, spec, name) in targets.items():
        if path not in layers:  # round to nearest, and say so
            why = (
                f"used inside lax.scan as {stacked[path]} stacked layers (GPTQ of stacked layers is not supported)"
                if path in stacked else "it reaches no dot / conv in fn"
            )
            warnings.warn(f"gptq: {name}: {why}; rounded to nearest instead", UserWarning, stacklevel=2)
            new_leaves[position[path]] = quantize(leaves[position[path]], rule.spec, name=name)
            layers[path] = LayerResult(path, "rtn")
            short = "stacked along a scan" if path in stacked else "no dot/conv site"
            decisions[path] = dataclasses.replace(decisions[path], spec=rule.spec.describe() + f" rtn ({short})")
    report = GPTQReport(
        tuple(decisions[p] for p in matched.path_strs),
        matched.unused_rules,
        tuple(r.pattern for r in rules),
        layers=tuple(layers[p] for p in matched.path_strs if p in layers),
        capture_seconds=capture_seconds,
        gptq_seconds=gptq_seconds,
    )
    return with_default_layout(matched.unflatten(new_leaves)), report
