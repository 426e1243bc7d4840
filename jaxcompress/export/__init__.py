"""Deployable integer files: full-integer LiteRT (``.tflite``) and ONNX (QDQ) export.

``to_tflite(fn, qparams, *example_args, path=...)`` / ``to_onnx(...)`` trace ``fn(qparams,
*example_args)`` once, lower it to a small quantized graph (one rule set over the library's program
layer) and write one file. What the file is follows from the params:

* `QArray` weights with static activation scales (`jaxcompress.calibrate_activations`,
  `jaxcompress.convert_qat`): a full-integer model (int8 activations with calibrated ranges, int8
  per-output-channel weights, int32 biases; float in, float out);
* `QArray` weights quantized with ``activation="dynamic"`` / ``"weight_only"``: a dynamic-range
  model (int8 weights; the runtime quantizes activations itself);
* plain float params: the float32 model (the baseline to compare against).

The runtimes store dense int8 weights, so pruning does not shrink these files (only the
safetensors / sparse formats do).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from jaxcompress.export._files import write_atomic
from jaxcompress.export._graph import ExportError
from jaxcompress.export._lower import build_graph
from jaxcompress.export._measure import FileReport, evaluate_file

__all__ = ["to_tflite", "to_onnx", "ExportError", "evaluate_file", "FileReport"]


def to_tflite(
    fn: Callable,
    qparams: Any,
    *example_args: Any,
    path: str | os.PathLike,
    calibration: Iterable | None = None,
    batch: str = "dynamic",
) -> str:
    """Write ``fn(qparams, *example_args)`` as a LiteRT ``.tflite`` file; return its path.

    Args:
      fn: the model, called as ``fn(qparams, *inputs)`` (e.g. a linen ``apply``).
      qparams: the params; `QArray` leaves decide the kind of model (see the module docs).
      *example_args: float arrays with the inputs' shapes (axis 0 is the batch).
      path: the file to write (atomically: it is the old file or the whole new one).
      calibration: for a full-integer model, batches (arrays, or tuples of arrays for several
        inputs) whose intermediate ranges set the activation quantization of tensors no weight's
        activation scale fixes (logits, residual sums, pooled features); defaults to the example.
      batch: ``"dynamic"`` (any batch size at run time) or ``"static"``.

    >>> import tempfile, os, jax, jax.numpy as jnp, flax.linen as nn, jaxcompress as jc
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 5))
    >>> params = model.init(jax.random.key(0), x)
    >>> rules = [jc.QuantRule(pattern=".*kernel", channel_axes=(-1,), activation="static")]
    >>> qparams, _ = jc.quantize_params(params, rules)
    >>> qparams = jc.attach_activation_scales(qparams, jc.calibrate_activations(model.apply, qparams, [x]))
    >>> path = to_tflite(model.apply, qparams, x, path=os.path.join(tempfile.mkdtemp(), "m.tflite"))
    >>> os.path.getsize(path) > 0
    True
    """
    from jaxcompress.export._tflite import to_flatbuffer

    graph, _ = build_graph(fn, qparams, example_args, calibration=calibration, batch=batch)
    return write_atomic(path, to_flatbuffer(graph))


def to_onnx(
    fn: Callable,
    qparams: Any,
    *example_args: Any,
    path: str | os.PathLike,
    calibration: Iterable | None = None,
    batch: str = "dynamic",
) -> str:
    """Write ``fn(qparams, *example_args)`` as an ONNX model (QDQ form); return its path.

    The arguments are those of `to_tflite`. Input ``k`` is named ``input_k``, output ``k``
    ``output_k``; a dynamic batch is the symbolic dimension ``batch``.

    >>> import tempfile, os, jax, jax.numpy as jnp, flax.linen as nn
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 5))
    >>> params = model.init(jax.random.key(0), x)
    >>> path = to_onnx(model.apply, params, x, path=os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> os.path.getsize(path) > 0
    True
    """
    from jaxcompress.export._onnx import to_model

    graph, _ = build_graph(fn, qparams, example_args, calibration=calibration, batch=batch)
    return write_atomic(path, to_model(graph).SerializeToString())
