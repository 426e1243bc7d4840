"""Traced program + params -> calibrated, folded `Graph` (internal).

``fn(qparams, *inputs)`` is traced once by the program layer with a marker batch size (the
dynamic batch axis is the axis of that size), then evaluated twice with the same evaluator:

1. calibration (one jitted program per batch shape): every value that depends on a model input is
   a `_Probe` (params dequantized), and every such equation reports its output's min / max with
   ``ev.observe``; the observations are the program's outputs, combined over the batches;
2. lowering: model inputs are graph `Tensor`\\ s, `QArray`\\ s `WeightView`\\ s (the shared weight
   layout rules apply), and the `GraphBuilder` rules append graph ops; the n-th recorded equation
   of the lowering is the n-th observed equation of the calibration, so its output tensors get
   the calibrated ranges.

Then BatchNorm is folded, relus fused and, for a full-integer export, every activation gets its
int8 quantization. The export mode comes from the weights: no `QArray` -> a float graph; static
activation scales -> full-integer; ``"dynamic"`` / ``"weight_only"`` -> a dynamic-range graph
(int8 weights, float activations).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress._program import Evaluator, RuleSet, TraceCache, bind, call_body, params_path, trace_call
from jaxcompress.execute.rules import WEIGHT_LAYOUT_RULES
from jaxcompress.execute.weight_view import WeightView
from jaxcompress.export import _passes
from jaxcompress.export._graph import ExportError, Graph, Tensor
from jaxcompress.export._rules import GraphBuilder, atomic_name
from jaxcompress.qarray import QArray
from jaxcompress.rules import path_to_str

__all__ = ["build_graph", "MARKER_BATCH"]

# the batch size the program is traced with when the batch is dynamic: an axis of this size is it
MARKER_BATCH = 1031


class _Probe:
    """A concrete value that depends on a model input (calibration kind ``"probe"``)."""

    def __init__(self, value):
        self.value = value


def _is_qarray(x) -> bool:
    return isinstance(x, QArray)


def export_mode(qparams: Any) -> str:
    flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_qarray)[0]
    qarrays = [(path_to_str(path), leaf) for path, leaf in flat if isinstance(leaf, QArray)]
    if not qarrays:
        return "float"
    static = [name for name, q in qarrays if q.activation == "static"]
    if not static:
        return "dynamic"
    for name, q in qarrays:
        if q.activation != "static" or q.activation_scale is None:
            raise ExportError(
                f"{name}: activation={q.activation!r}"
                + ("" if q.activation != "static" else " without an activation scale")
                + f" in a full-integer export (other leaves, e.g. {static[0]}, are static): every quantized "
                "weight needs a static activation scale (jc.calibrate_activations / jc.convert_qat)"
            )
    return "static"


def _inputs(example_args, batch: str) -> list[np.ndarray]:
    arrays = []
    for index, arg in enumerate(example_args):
        if not hasattr(arg, "shape") or not np.issubdtype(np.asarray(arg).dtype, np.floating):
            raise ExportError(f"example_args[{index}]: expected a float array (a model input), got {type(arg).__name__}")
        if batch == "dynamic" and np.ndim(arg) == 0:
            raise ExportError(f"example_args[{index}]: a scalar has no batch axis; pass batch='static'")
        arrays.append(np.asarray(arg, np.float32))
    if batch not in ("dynamic", "static"):
        raise ExportError(f"batch must be 'dynamic' or 'static', got {batch!r}")
    return arrays


def _trace(fn, qparams, inputs, cache):
    traced = trace_call(fn, (qparams, *inputs), {}, cache)
    positions = []
    for position in traced.dynamic_positions:
        path = traced.paths[position]
        positions.append((position, int(path[1].idx), traced.leaves[position], path))
    return traced, positions


def _calibrate(fn, qparams, batches: Iterable[tuple], cache) -> dict:
    """``{(equation ordinal, output index, "min" | "max"): value}`` over ``batches`` (one compiled
    program per batch shape), plus ``("input", k, ...)`` for the model inputs."""

    def probe_rule(ev, eqn, invals):
        outs = bind(eqn, [v.value if isinstance(v, _Probe) else v for v in invals])
        key = ev.context["count"]
        ev.context["count"] += 1
        for index, out in enumerate(outs):
            ev.observe((key, index, "min"), jnp.min(out).astype(jnp.float32), "min")
            ev.observe((key, index, "max"), jnp.max(out).astype(jnp.float32), "max")
        return [_Probe(out) for out in outs]

    def call_rule(ev, eqn, invals):
        if atomic_name(eqn) is not None:
            return probe_rule(ev, eqn, invals)
        body = call_body(eqn)
        return list(ev.run(body[0], body[1], invals))

    rules = RuleSet(
        kinds=("probe",),
        classify=lambda v: "probe" if isinstance(v, _Probe) else "plain",
        rules={("jit", "probe"): call_rule, ("pjit", "probe"): call_rule},
        default=probe_rule,
        materialize=lambda value, aval: value.value,
        control_flow=False,
    )
    dequantized = jax.tree_util.tree_map(lambda x: x.dequantize() if isinstance(x, QArray) else x, qparams,
                                         is_leaf=_is_qarray)

    @jax.jit
    def observe(params, batch):
        traced, positions = _trace(fn, params, batch, cache)
        values = [_Probe(leaf) if arg > 0 else leaf for _, arg, leaf, _ in positions]
        ev = Evaluator(rules, context={"count": 0})
        ev.run(traced.closed.jaxpr, traced.closed.consts, values)
        return ev.observations

    ranges: dict = {}
    for batch in batches:
        batch = tuple(np.asarray(b, np.float32) for b in (batch if isinstance(batch, (tuple, list)) else (batch,)))
        observed = {key: float(value) for key, value in observe(dequantized, batch).items()}
        for index, x in enumerate(batch):
            observed[("input", index, "min")], observed[("input", index, "max")] = float(x.min()), float(x.max())
        for key, value in observed.items():
            ranges[key] = (min if key[-1] == "min" else max)(ranges.get(key, value), value)
    return ranges


def build_graph(
    fn: Callable,
    qparams: Any,
    example_args: tuple,
    *,
    calibration: Iterable | None = None,
    batch: str = "dynamic",
) -> tuple[Graph, str]:
    """Lower ``fn(qparams, *example_args)`` to a graph; returns ``(graph, mode)``."""
    mode = export_mode(qparams)
    inputs = _inputs(example_args, batch)
    cache = TraceCache()
    ranges = {}
    if mode == "static":
        ranges = _calibrate(fn, qparams, calibration if calibration is not None else [tuple(inputs)], cache)
    marker = MARKER_BATCH if batch == "dynamic" else None
    stand_ins = [np.zeros((marker,) + x.shape[1:], np.float32) for x in inputs] if marker else inputs
    traced, positions = _trace(fn, qparams, stand_ins, cache)
    graph = Graph()
    counter = [0]

    def on_outputs(eqn, outs, new):
        key = counter[0]
        counter[0] += 1
        for index, out in enumerate(outs):
            if isinstance(out, Tensor) and (key, index, "min") in ranges:
                out.range = (ranges[(key, index, "min")], ranges[(key, index, "max")])
        for tensor in new:
            if tensor.range is None and isinstance(outs[0], Tensor):
                tensor.range = outs[0].range

    builder = GraphBuilder(graph, marker, mode, on_outputs)
    values = []
    for position, arg, leaf, path in positions:
        if arg == 0:
            values.append(WeightView.from_qarray(leaf, name=params_path(path, 0) or "weight", leaf_index=position)
                          if isinstance(leaf, QArray) else leaf)
        else:
            tensor = graph.input(f"input_{arg - 1}", builder.shape(np.shape(leaf)))
            if ("input", arg - 1, "min") in ranges:
                tensor.range = (ranges[("input", arg - 1, "min")], ranges[("input", arg - 1, "max")])
            values.append(tensor)
    if any(arg > 0 and not isinstance(v, Tensor) for (_, arg, _, _), v in zip(positions, values)):
        raise ExportError("every model input must be an array")
    rules = RuleSet(
        kinds=("tensor", "weight"),
        classify=lambda v: "tensor" if isinstance(v, Tensor) else ("weight" if isinstance(v, WeightView) else "plain"),
        rules={**WEIGHT_LAYOUT_RULES, **builder.rules()},
        default=builder.default,
        materialize=lambda value, aval: value.dequantize() if isinstance(value, WeightView) else value,
        control_flow=False,
    )
    outs = Evaluator(rules).run(traced.closed.jaxpr, traced.closed.consts, values)
    for index, out in enumerate(outs):
        if not isinstance(out, Tensor):
            raise ExportError(f"output {index} of fn does not depend on the model inputs (a constant)")
    graph.outputs = list(outs)
    _passes.fold_affine(graph)
    _passes.fuse_activations(graph)
    graph.prune()
    if mode == "static":
        _passes.assign_quantization(graph)
    return graph, mode

