"""The export rule set: jaxpr equations on graph tensors -> `Graph` ops (internal).

One more rule set over the library's program layer (`jaxcompress._program`): a model input is a
graph `Tensor` (kind ``"tensor"``), a `QArray` weight a `WeightView` (kind ``"weight"``, following
transposes / reshapes with the shared layout rules), every other param a plain array, so the
evaluator constant-folds whatever depends on params only (BatchNorm's scale and shift, a bias
broadcast) and calls a rule here only for an equation that touches a model input. Each rule appends
graph ops and returns the output tensors.

Named activation calls (``jit[name=relu]``, ``relu6``, ``hard_silu``: what ``jax.nn`` emits) become
one graph op instead of their bodies; ``x / n`` after a sum or a window sum of ``n`` elements
becomes a mean / an average pool. An equation without a translation raises `ExportError` with the
primitive, its source line and the quantized leaf it involves.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from jaxcompress._program import call_body, source_line
from jaxcompress.execute.weight_view import WeightView
from jaxcompress.export._graph import ExportError, Graph, Quant, Tensor

__all__ = ["GraphBuilder", "ATOMIC_CALLS"]

# named calls lowered as one graph op (and observed as one value by the calibration)
ATOMIC_CALLS = {"relu": "relu", "relu6": "relu6", "hard_silu": "hard_swish", "hard_swish": "hard_swish"}
_UNARY = {"exp": "exp", "logistic": "logistic", "tanh": "tanh", "sqrt": "sqrt", "rsqrt": "rsqrt", "neg": "neg",
          "abs": "abs", "square": "square", "erfc": "erfc"}
_BINARY = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "max": "maximum", "min": "minimum"}
_IDENTITY = ("stop_gradient", "copy", "copy_p", "optimization_barrier")


def atomic_name(eqn) -> str | None:
    if eqn.primitive.name in ("jit", "pjit"):
        return ATOMIC_CALLS.get(eqn.params.get("name"))
    return None


class GraphBuilder:
    """Rules that build ``graph``; ``batch`` is the traced size of the dynamic batch dimension
    (``None``: shapes stay static). ``on_outputs(eqn, outs, new)`` is called after every recorded
    equation with its output values and the graph tensors its rule created."""

    def __init__(self, graph: Graph, batch: int | None, mode: str, on_outputs: Callable | None = None):
        self.graph, self.batch, self.mode = graph, batch, mode
        self.on_outputs = on_outputs or (lambda eqn, outs, new: None)
        self.callers: list[str] = []  # source lines of the calls being inlined (library bodies)

    # ---- helpers ---------------------------------------------------------------------------------
    def shape(self, shape) -> tuple[int, ...]:
        return tuple(-1 if self.batch is not None and i == 0 and d == self.batch else int(d) for i, d in enumerate(shape))

    def out_shape(self, eqn, index: int = 0) -> tuple[int, ...]:
        return self.shape(eqn.outvars[index].aval.shape)

    def where(self, eqn) -> str:
        """The user's source line of ``eqn`` (for an op inside a library call: the call's line)."""
        line = source_line(eqn)
        callers = [c for c in self.callers if c != "<unknown>"]
        return callers[0] if callers and (line == "<unknown>" or "site-packages" in line) else line

    def error(self, eqn, reason: str, invals=()) -> ExportError:
        leaves = [v.name for v in invals if isinstance(v, WeightView)]
        leaf = f" (quantized leaf {', '.join(leaves)})" if leaves else ""
        return ExportError(f"{self.where(eqn)}: `{eqn.primitive.name}`{leaf} cannot be exported: {reason}")

    def const(self, value, eqn) -> Tensor:
        if isinstance(value, WeightView):
            value = value.dequantize()
        data = np.asarray(value)
        if not np.issubdtype(data.dtype, np.floating):
            raise self.error(eqn, f"non-float constant operand of dtype {data.dtype}")
        return self.graph.constant("const", data.astype(np.float32))

    def tensor(self, value, eqn) -> Tensor:
        return value if isinstance(value, Tensor) else self.const(value, eqn)

    def emit(self, kind, inputs, out_shape, eqn, **attrs) -> Tensor:
        return self.graph.add(kind, inputs, out_shape, attrs, where=self.where(eqn))

    def producer(self, tensor: Tensor):
        for op in reversed(self.graph.ops):
            if any(out is tensor for out in op.outputs):
                return op
        return None

    # ---- the rule table ---------------------------------------------------------------------------
    def rules(self) -> dict:
        table = {
            "conv_general_dilated": self.conv, "dot_general": self.dot, "reshape": self.reshape,
            "squeeze": self.reshape, "expand_dims": self.reshape, "broadcast_in_dim": self.broadcast,
            "transpose": self.transpose, "concatenate": self.concatenate, "slice": self.slice, "pad": self.pad,
            "reduce_sum": self.reduce, "reduce_max": self.reduce, "reduce_window_sum": self.window_sum,
            "reduce_window_max": self.window_max, "integer_pow": self.integer_pow,
            "convert_element_type": self.convert, "jit": self.call, "pjit": self.call,
        }
        for name in _UNARY:
            table[name] = self.unary
        for name in _BINARY:
            table[name] = self.binary
        for name in _IDENTITY:
            table[name] = lambda ev, eqn, invals: [invals[0]]
        for name in ("scan", "while", "cond"):
            table[name] = self.control_flow
        return {(name, "tensor"): self._recorded(rule) for name, rule in table.items()}

    def _recorded(self, rule):
        def run(ev, eqn, invals):
            start = len(self.graph.ops)
            outs = rule(ev, eqn, invals)
            if not (eqn.primitive.name in ("jit", "pjit") and atomic_name(eqn) is None):
                self.on_outputs(eqn, outs, [out for op in self.graph.ops[start:] for out in op.outputs])
            return outs

        return run

    def default(self, ev, eqn, invals):
        raise self.error(eqn, "no export rule for this primitive", invals)

    # ---- rules ------------------------------------------------------------------------------------
    def call(self, ev, eqn, invals):
        kind = atomic_name(eqn)
        if kind is None:
            body = call_body(eqn)
            self.callers.append(source_line(eqn))
            try:
                return list(ev.run(body[0], body[1], invals))
            finally:
                self.callers.pop()
        return [self.emit(kind, [self.tensor(invals[0], eqn)], self.out_shape(eqn), eqn)]

    def control_flow(self, ev, eqn, invals):
        raise self.error(eqn, "control flow over model inputs has no graph form (unroll it)", invals)

    def convert(self, ev, eqn, invals):
        if not np.issubdtype(np.dtype(eqn.params["new_dtype"]), np.floating):
            raise self.error(eqn, f"conversion to {eqn.params['new_dtype']} (graphs are float / int8)", invals)
        return [invals[0]]

    def unary(self, ev, eqn, invals):
        return [self.emit(_UNARY[eqn.primitive.name], [invals[0]], self.out_shape(eqn), eqn)]

    def integer_pow(self, ev, eqn, invals):
        x, power = invals[0], eqn.params["y"]
        if power == 2:
            return [self.emit("square", [x], self.out_shape(eqn), eqn)]
        if power == 3:
            square = self.emit("square", [x], self.out_shape(eqn), eqn)
            return [self.emit("mul", [x, square], self.out_shape(eqn), eqn)]
        raise self.error(eqn, f"integer power {power} (2 and 3 are supported)", invals)

    def binary(self, ev, eqn, invals):
        kind = _BINARY[eqn.primitive.name]
        a, b = (self.tensor(v, eqn) for v in invals)
        if kind == "maximum" and b.is_constant and np.all(b.data == 0):
            return [self.emit("relu", [a], self.out_shape(eqn), eqn)]
        if kind == "minimum" and b.is_constant and np.all(b.data == 6):
            producer = self.producer(a)
            if producer is not None and producer.kind == "relu":
                return [self.emit("relu6", [producer.inputs[0]], self.out_shape(eqn), eqn)]
        if kind == "mul":
            gelu = self._exact_gelu(a, b)
            if gelu is not None:
                return [self.emit("gelu", [gelu], self.out_shape(eqn), eqn, approximate=False)]
        if kind == "div" and not a.is_constant and not b.is_constant:
            logits = self._softmax_logits(a, b)
            if logits is not None:
                return [self.emit("softmax", [logits], self.out_shape(eqn), eqn)]
        if kind == "div" and b.is_constant and b.data.size == 1:
            producer = self.producer(a)
            divisor = float(b.data.reshape(()))
            if producer is not None and producer.kind == "mul" and producer.attrs.get("count") == divisor:
                return [producer.inputs[0]]  # sum / count -> the mean (window sum / size -> average pool)
            return [self.emit("mul", [a, self.graph.constant("reciprocal", np.float32(1.0 / divisor))],
                              self.out_shape(eqn), eqn)]
        return [self.emit(kind, [a, b], self.out_shape(eqn), eqn)]

    # ---- composite patterns (what jax.nn emits for exact gelu and softmax) ---------------------------
    def _chain(self, tensor, *kinds):
        """The producers along first inputs, if their kinds are ``kinds``; else ``None``."""
        ops = []
        for kind in kinds:
            op = None if tensor.is_constant else self.producer(tensor)
            if op is None or op.kind != kind:
                return None
            ops.append(op)
            tensor = next((t for t in op.inputs if not t.is_constant), None)
            if tensor is None:
                return None
        return ops

    def _exact_gelu(self, a, b):
        """``(0.5 x) * erfc(-x / sqrt 2)`` -> x (jax.nn.gelu(approximate=False))."""
        for half, tail in ((a, b), (b, a)):
            chain = self._chain(tail, "erfc", "mul", "neg")
            scale = self._chain(half, "mul")
            if chain is None or scale is None:
                continue
            x = chain[2].inputs[0]
            constants = [t for t in scale[0].inputs if t.is_constant]
            inv_sqrt2 = [t for t in chain[1].inputs if t.is_constant]
            if (x in scale[0].inputs and constants and np.allclose(constants[0].data, 0.5)
                    and inv_sqrt2 and np.allclose(inv_sqrt2[0].data, 1 / np.sqrt(2))):
                return x
        return None

    def _softmax_logits(self, numerator, denominator):
        """``exp(h - m) / sum(exp(h - m), last axis)`` -> h (jax.nn.softmax)."""
        total = self._chain(denominator, "reshape", "mul", "mean")
        exp = self._chain(numerator, "exp", "sub")
        if total is None or exp is None or total[2].inputs[0] is not numerator:
            return None
        if tuple(total[2].attrs["axes"]) != (len(numerator.shape) - 1,):
            return None
        return exp[1].inputs[0]

    def reshape(self, ev, eqn, invals):
        shape = self.out_shape(eqn)
        if self.batch is not None and shape[:1] != (-1,):
            # the batch merged into another axis (e.g. (B, T, H) -> (B * T, H)): that axis is dynamic
            dims = [i for i, d in enumerate(shape) if d % self.batch == 0 and d > 0]
            if len(dims) == 1:
                shape = tuple(-1 if i == dims[0] else d for i, d in enumerate(shape))
        return [self.emit("reshape", [invals[0]], shape, eqn, shape=shape)]

    def broadcast(self, ev, eqn, invals):
        x = invals[0]
        out = eqn.outvars[0].aval.shape
        if int(np.prod(out)) != int(np.prod(eqn.invars[0].aval.shape)):
            raise self.error(eqn, "a broadcast that copies a model activation", invals)
        return self.reshape(ev, eqn, [x])

    def transpose(self, ev, eqn, invals):
        perm = tuple(int(p) for p in eqn.params["permutation"])
        return [self.emit("transpose", [invals[0]], self.out_shape(eqn), eqn, perm=perm)]

    def concatenate(self, ev, eqn, invals):
        inputs = [self.tensor(v, eqn) for v in invals]
        return [self.emit("concat", inputs, self.out_shape(eqn), eqn, axis=int(eqn.params["dimension"]))]

    def slice(self, ev, eqn, invals):
        begin = tuple(int(i) for i in eqn.params["start_indices"])
        end = tuple(int(i) for i in eqn.params["limit_indices"])
        strides = tuple(int(i) for i in (eqn.params["strides"] or (1,) * len(begin)))
        return [self.emit("slice", [invals[0]], self.out_shape(eqn), eqn, begin=begin, end=end, strides=strides)]

    def pad(self, ev, eqn, invals):
        x, value = invals
        if isinstance(value, Tensor) or float(np.asarray(value)) != 0.0:
            raise self.error(eqn, "padding with a value other than 0", invals)
        config = eqn.params["padding_config"]
        if any(interior != 0 or low < 0 or high < 0 for low, high, interior in config):
            raise self.error(eqn, f"interior or negative padding {config}", invals)
        paddings = tuple((int(low), int(high)) for low, high, _ in config)
        return [self.emit("pad", [x], self.out_shape(eqn), eqn, paddings=paddings)]

    def reduce(self, ev, eqn, invals):
        axes = tuple(int(a) for a in eqn.params["axes"])
        shape = self.out_shape(eqn)
        if eqn.primitive.name == "reduce_max":
            return [self.emit("reduce_max", [invals[0]], shape, eqn, axes=axes, keepdims=False)]
        count = int(np.prod([eqn.invars[0].aval.shape[a] for a in axes]))
        mean = self.emit("mean", [invals[0]], shape, eqn, axes=axes, keepdims=False)
        return [self._times_count(mean, count, shape, eqn)]

    def _times_count(self, tensor, count, shape, eqn):
        out = self.emit("mul", [tensor, self.graph.constant("count", np.float32(count))], shape, eqn)
        self.graph.ops[-1].attrs["count"] = float(count)
        return out

    def _window(self, eqn, invals):
        window, strides = eqn.params["window_dimensions"], eqn.params["window_strides"]
        if len(window) != 4 or window[0] != 1 or window[3] != 1 or strides[0] != 1 or strides[3] != 1:
            raise self.error(eqn, f"a window {window} / strides {strides} that is not an NHWC 2-D pool", invals)
        if any(d != 1 for d in tuple(eqn.params["base_dilation"]) + tuple(eqn.params["window_dilation"])):
            raise self.error(eqn, "a dilated pooling window", invals)
        padding = tuple(tuple(p) for p in eqn.params["padding"])
        if all(p == (0, 0) for p in padding):
            name = "VALID"
        else:
            from jaxcompress.export._tflite import same_padding

            shape = eqn.invars[0].aval.shape
            same = tuple(same_padding(shape[1 + i], window[1 + i], strides[1 + i], 1) for i in range(2))
            if padding[1:3] != same or padding[0] != (0, 0) or padding[3] != (0, 0):
                raise self.error(eqn, f"pool padding {padding} (VALID and SAME are supported)", invals)
            name = "SAME"
        return dict(window=tuple(window[1:3]), strides=tuple(strides[1:3]), padding=name)

    def window_max(self, ev, eqn, invals):
        return [self.emit("max_pool2d", [invals[0]], self.out_shape(eqn), eqn, **self._window(eqn, invals))]

    def window_sum(self, ev, eqn, invals):
        attrs = self._window(eqn, invals)
        if attrs["padding"] != "VALID":
            raise self.error(eqn, "an average pool with padding (count_include_pad differs between runtimes)")
        shape = self.out_shape(eqn)
        pooled = self.emit("avg_pool2d", [invals[0]], shape, eqn, **attrs)
        return [self._times_count(pooled, attrs["window"][0] * attrs["window"][1], shape, eqn)]

    # ---- weighted ops -------------------------------------------------------------------------------
    def weight(self, value, eqn, order) -> tuple[Tensor, float | None]:
        """The weight transposed by ``order`` into the graph layout (out first), int8 + per-output
        channel scales for a `WeightView`; and the static activation scale, if any."""
        if not isinstance(value, WeightView):
            return self.graph.constant("weight", np.transpose(np.asarray(value, np.float32), order)), None
        view = value.materialize()
        if view.qtype != "int" or view.zero_point is not None or view.input_scale is not None:
            raise self.error(eqn, "export needs symmetric integer weights without smoothing scales (integer rules "
                             "of <= 4 bits default to asymmetric: pass symmetric=True)", [value])
        scale = np.asarray(view.scale, np.float32)
        out_axis = order[0]
        if any(scale.shape[a] != 1 for a in range(scale.ndim) if a != out_axis):
            raise self.error(eqn, f"scale of shape {scale.shape}: export needs per-output-channel (or per-tensor) "
                             "weight scales, not groups or input-axis scales", [value])
        codes = np.transpose(np.asarray(view.values).astype(np.int8), order)
        scale = np.broadcast_to(scale.reshape(-1), (codes.shape[0],)).copy()
        static = None
        if self.mode == "static":
            if view.activation != "static" or view.activation_scale is None:
                raise self.error(eqn, f"activation={view.activation!r} without a static activation scale in a "
                                 "full-integer export: calibrate it (jc.calibrate_activations / jc.convert_qat)", [value])
            static = float(np.asarray(view.activation_scale))
        return self.graph.constant(view.name, codes, np.int8, Quant(scale, np.zeros_like(scale), axis=0)), static

    def conv(self, ev, eqn, invals):
        x, w = invals
        if not isinstance(x, Tensor) or isinstance(w, Tensor):
            raise self.error(eqn, "a convolution whose filter is a model input", invals)
        p = eqn.params
        numbers = p["dimension_numbers"]
        if tuple(numbers.lhs_spec) != (0, 3, 1, 2) or tuple(numbers.out_spec) != (0, 3, 1, 2):
            raise self.error(eqn, f"layout {numbers}: export supports NHWC 2-D convolutions", invals)
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise self.error(eqn, "transposed / batch-grouped convolution", invals)
        rhs = tuple(numbers.rhs_spec)
        weight, static = self.weight(w, eqn, (rhs[0], rhs[2], rhs[3], rhs[1]))
        attrs = dict(strides=tuple(p["window_strides"]), dilation=tuple(p["rhs_dilation"]),
                     padding=tuple(tuple(int(v) for v in pair) for pair in p["padding"]),
                     groups=int(p["feature_group_count"]))
        if static is not None:
            attrs["input_scale"] = static
        return [self.emit("conv2d", [x, weight], self.out_shape(eqn), eqn, **attrs)]

    def dot(self, ev, eqn, invals):
        x, w = invals
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
        if isinstance(x, Tensor) and not isinstance(w, Tensor):
            rank = len(w.shape)
            if (not lhs_batch and rank == 2 and tuple(lhs_contract) == (len(x.shape) - 1,)
                    and len(rhs_contract) == 1):
                weight, static = self.weight(w, eqn, (1 - int(rhs_contract[0]), int(rhs_contract[0])))
                attrs = {} if static is None else dict(input_scale=static)
                return [self.emit("fully_connected", [x, weight], self.out_shape(eqn), eqn, **attrs)]
        if isinstance(w, WeightView) or isinstance(x, WeightView):
            raise self.error(eqn, "a quantized weight in a dot that is not x @ W over x's last axis", invals)
        return [self._batch_matmul(eqn, self.tensor(x, eqn), self.tensor(w, eqn))]

    def _batch_matmul(self, eqn, x: Tensor, y: Tensor) -> Tensor:
        """General ``dot_general`` as transpose -> reshape -> batch matmul -> reshape."""
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lc, rc, lb, rb = (tuple(int(a) for a in axes) for axes in (lc, rc, lb, rb))
        lf = tuple(a for a in range(len(x.shape)) if a not in lc + lb)
        rf = tuple(a for a in range(len(y.shape)) if a not in rc + rb)
        xs, ys = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        size = lambda shape, axes: int(np.prod([shape[a] for a in axes]))  # noqa: E731
        batch = tuple(self.shape([xs[a] for a in lb])) if lb else ()
        left = self._layout(eqn, x, lb + lf + lc, batch + (size(xs, lf), size(xs, lc)))
        right = self._layout(eqn, y, rb + rf + rc, batch + (size(ys, rf), size(ys, rc)))
        product = self.emit("batch_matmul", [left, right], batch + (size(xs, lf), size(ys, rf)), eqn, adj_y=True)
        return self.emit("reshape", [product], self.out_shape(eqn), eqn, shape=self.out_shape(eqn))

    def _layout(self, eqn, tensor: Tensor, perm, shape) -> Tensor:
        if perm != tuple(range(len(perm))):
            moved = tuple(tensor.shape[a] for a in perm)
            tensor = self.emit("transpose", [tensor], moved, eqn, perm=perm)
        if tuple(tensor.shape) != tuple(shape):
            tensor = self.emit("reshape", [tensor], shape, eqn, shape=shape)
        return tensor
