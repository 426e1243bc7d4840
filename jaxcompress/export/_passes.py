"""Graph passes between the lowering and the writers (internal).

* `fold_affine`: BatchNorm (inference) folded into the conv / fully-connected before it. A
  per-output-channel constant ``mul`` / ``div`` scales the weight (for an int8 weight: its
  per-channel scale, exact; a negative factor flips the codes' sign) and the bias; ``add`` /
  ``sub`` move the bias.
* `fuse_activations`: a ``relu`` / ``relu6`` that is the only consumer of a conv, fully-connected
  or add / sub / mul output becomes that op's fused activation.
* `assign_quantization`: int8 quantization for every activation of a full-integer graph. An int8
  conv / fully-connected input uses the weight's static activation scale (symmetric, zero point
  0: exactly the codes `jaxcompress.compressed` computes), carried back through layout ops, pools
  and standalone relus (which keep the quantization); softmax / logistic / tanh get the fixed
  output quantization of the TFLite spec; everything else its calibrated range.
"""

from __future__ import annotations

import numpy as np

from jaxcompress.export._graph import FIXED_OUTPUT_QUANT, FUSABLE, SAME_QUANT, ExportError, Graph, Quant, Tensor

__all__ = ["fold_affine", "fuse_activations", "assign_quantization"]


def _per_channel(constant: Tensor, channels: int) -> np.ndarray | None:
    """The constant as a (channels,) vector if it broadcasts along the last axis only."""
    data = np.asarray(constant.data, np.float64)
    if data.size == 1:
        return np.full(channels, float(data.reshape(())))
    if data.shape[-1:] == (channels,) and data.size == channels:
        return data.reshape(channels)
    return None


def fold_affine(graph: Graph) -> None:
    consumers = graph.consumers()
    producers = graph.producers()
    outputs = {id(t) for t in graph.outputs}
    for op in list(graph.ops):
        if op.kind not in ("mul", "div", "add", "sub") or op.activation is not None:
            continue
        activations = [t for t in op.inputs if not t.is_constant]
        constants = [t for t in op.inputs if t.is_constant]
        if len(activations) != 1 or len(constants) != 1:
            continue
        x, constant = activations[0], constants[0]
        producer = producers.get(id(x))
        if (
            producer is None or producer.kind not in ("conv2d", "fully_connected") or producer.activation is not None
            or len(consumers.get(id(x), [])) != 1 or id(x) in outputs
            or (op.kind in ("sub", "div") and op.inputs[0] is not x)
            or constant.data is None or np.ndim(constant.data) > len(x.shape)
        ):
            continue
        weight = producer.inputs[1]
        channels = weight.shape[0]
        factor = _per_channel(constant, channels)
        if factor is None or (op.kind in ("mul", "div") and np.any(factor == 0)):
            continue
        if len(producer.inputs) < 3:
            producer.inputs.append(graph.constant(weight.name + "/bias", np.zeros(channels, np.float32)))
        bias = np.asarray(producer.inputs[2].data, np.float64)
        if op.kind in ("add", "sub"):
            bias = bias + factor if op.kind == "add" else bias - factor
        else:
            factor = factor if op.kind == "mul" else 1.0 / factor
            bias = bias * factor
            _scale_weight(graph, producer, factor)
        producer.inputs[2] = graph.constant(producer.inputs[2].name, bias.astype(np.float32))
        out = op.outputs[0]
        producer.outputs = [out]
        graph.ops.remove(op)
        producers[id(out)] = producer
        consumers = graph.consumers()


def _scale_weight(graph: Graph, producer, factor: np.ndarray) -> None:
    weight = producer.inputs[1]
    shape = (-1,) + (1,) * (len(weight.shape) - 1)
    if weight.quant is None:
        data = np.asarray(weight.data, np.float64) * factor.reshape(shape)
        producer.inputs[1] = graph.constant(weight.name, data.astype(np.float32))
        return
    sign = np.where(factor < 0, -1, 1)
    codes = (np.asarray(weight.data, np.int64) * sign.reshape(shape)).astype(np.int8)
    scale = np.broadcast_to(weight.quant.scale.astype(np.float64), factor.shape) * np.abs(factor)
    producer.inputs[1] = graph.constant(weight.name, codes, np.int8, Quant(scale, np.zeros_like(scale), axis=0))


def fuse_activations(graph: Graph) -> None:
    consumers = graph.consumers()
    producers = graph.producers()
    outputs = {id(t) for t in graph.outputs}
    for op in list(graph.ops):
        if op.kind not in ("relu", "relu6"):
            continue
        x = op.inputs[0]
        producer = producers.get(id(x))
        if (
            producer is None or producer.kind not in FUSABLE or producer.activation is not None
            or len(consumers.get(id(x), [])) != 1 or id(x) in outputs
        ):
            continue
        producer.activation = op.kind
        producer.outputs = [op.outputs[0]]
        producers[id(op.outputs[0])] = producer
        graph.ops.remove(op)


def assign_quantization(graph: Graph) -> None:
    """Set ``quant`` on every activation tensor (see the module docs); ``input_quant`` on int8
    weighted ops. Needs the calibrated ``range`` of every tensor no consumer fixes."""
    preferred: dict[int, Quant] = {}
    for op in reversed(graph.ops):
        out = op.outputs[0]
        if op.kind in FIXED_OUTPUT_QUANT:
            preferred[id(out)] = Quant(*FIXED_OUTPUT_QUANT[op.kind])
        if op.kind in ("conv2d", "fully_connected") and op.inputs[1].quant is not None:
            scale = op.attrs.get("input_scale")
            if scale is None:
                raise ExportError(
                    f"{op.where}: weight {op.inputs[1].name} has no static activation scale: calibrate it "
                    "(jc.calibrate_activations / jc.convert_qat) or export with activations='dynamic'"
                )
            op.attrs["input_quant"] = Quant(scale, 0)
            preferred.setdefault(id(op.inputs[0]), op.attrs["input_quant"])
        elif op.kind in SAME_QUANT and id(out) in preferred:
            for tensor in op.inputs:
                if not tensor.is_constant:
                    preferred.setdefault(id(tensor), preferred[id(out)])
    tensors = list(graph.inputs) + [out for op in graph.ops for out in op.outputs]
    for tensor in tensors:
        if id(tensor) in preferred:
            tensor.quant = preferred[id(tensor)]
        elif tensor.range is not None:
            tensor.quant = Quant.from_range(*tensor.range)
        else:
            raise ExportError(f"tensor {tensor.name} has no calibrated range: pass calibration batches")
    # layout ops and pools keep their input's quantization when nothing downstream fixed it
    for op in graph.ops:
        if op.kind in SAME_QUANT and id(op.outputs[0]) not in preferred and op.kind != "concat":
            op.outputs[0].quant = op.inputs[0].quant
