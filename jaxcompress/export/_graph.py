"""A small quantized graph: what the lowering produces and the serializers write (internal).

Layouts follow JAX's conventions, so the lowering stays a one-to-one translation: images are NHWC,
a convolution's filter is ``(out, kh, kw, in / groups)`` (TFLite's layout; ONNX transposes it), a
fully-connected weight is ``(out, in)``. A batch dimension of ``-1`` is dynamic.

A `Tensor` is either a constant (``data`` set) or an activation. Activations carry float semantics:
``quant`` set means the tensor is stored as int8 codes ``q`` with ``x = (q - zero_point) * scale``
(the full-integer formats store it that way; ONNX as a QuantizeLinear/DequantizeLinear pair), and
``range`` is the calibrated ``(min, max)`` the quantization pass derives ``quant`` from. Constant
weights of an integer op are int8 with per-output-channel ``quant`` (axis 0, zero point 0); its bias
is float32 (the serializer quantizes it to int32 with scale ``input scale x weight scale``).

An `Op` has a ``kind`` from `OP_KINDS` (semantics in the comments there), inputs, outputs, static
``attrs`` and an optional fused ``activation`` (``"relu"`` / ``"relu6"``) applied to its output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["Quant", "Tensor", "Op", "Graph", "OP_KINDS", "FUSABLE", "SAME_QUANT", "FIXED_OUTPUT_QUANT", "ExportError"]


class ExportError(ValueError):
    """A program or graph that cannot be exported as asked (names the op / leaf / source line)."""


# kind -> what it computes (x: first input, y: second; attrs in brackets)
OP_KINDS = {
    "conv2d": "NHWC conv, filter (O, kh, kw, I/groups) [strides, dilation, padding ((t, b), (l, r)), groups]",
    "fully_connected": "x (..., K) @ w(N, K).T + b",
    "batch_matmul": "x @ y over the last two axes, leading axes broadcast [adj_y]",
    "add": "x + y", "sub": "x - y", "mul": "x * y", "div": "x / y", "maximum": "max(x, y)", "minimum": "min(x, y)",
    "relu": "max(x, 0)", "relu6": "clip(x, 0, 6)", "logistic": "sigmoid", "tanh": "tanh",
    "hard_swish": "x * relu6(x + 3) / 6", "gelu": "gelu [approximate]", "exp": "exp", "rsqrt": "1 / sqrt",
    "sqrt": "sqrt", "neg": "-x", "abs": "|x|", "square": "x * x", "erfc": "1 - erf(x) (ONNX only)",
    "softmax": "softmax over the last axis",
    "max_pool2d": "NHWC max pool [window, strides, padding]", "avg_pool2d": "NHWC mean pool, VALID [window, strides]",
    "mean": "mean over [axes] [keepdims]", "sum": "sum over [axes] [keepdims]", "reduce_max": "max over [axes] [keepdims]",
    "pad": "zero padding [paddings ((lo, hi) per axis)]",
    "reshape": "[shape] (-1 allowed once)", "transpose": "[perm]", "concat": "[axis]",
    "slice": "x[begin:end:strides] [begin, end, strides]",
    "quantize": "float -> int8, or int8 -> int8 requantization", "dequantize": "int8 -> float",
}
# ops whose output can carry a fused relu / relu6 in both formats' integer kernels
FUSABLE = ("conv2d", "fully_connected", "add", "sub", "mul")
# ops whose int8 kernels need the output quantized exactly like the (first) input
SAME_QUANT = ("reshape", "transpose", "max_pool2d", "avg_pool2d", "pad", "slice", "concat", "relu", "relu6")
# (scale, zero point) the TFLite int8 spec fixes for these outputs
FIXED_OUTPUT_QUANT = {"softmax": (1 / 256, -128), "logistic": (1 / 256, -128), "tanh": (1 / 128, 0)}


@dataclasses.dataclass(init=False)
class Quant:
    """Affine quantization: ``x = (q - zero_point) * scale``; per-channel along ``axis`` if set.
    ``scale`` / ``zero_point`` may be given as scalars; they are stored as 1-D arrays."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    def __init__(self, scale: ArrayLike, zero_point: ArrayLike, axis: int | None = None) -> None:
        self.scale = np.atleast_1d(np.asarray(scale, np.float32))
        self.zero_point = np.atleast_1d(np.asarray(zero_point, np.int64))
        self.axis = axis
        if not np.all(self.scale > 0) or not np.all(np.isfinite(self.scale)):
            raise ExportError(f"quantization scales must be positive and finite, got {self.scale[:4]}")

    @classmethod
    def from_range(cls, low: float, high: float, qmin: int = -128, qmax: int = 127) -> "Quant":
        """Asymmetric int8 quantization covering ``[low, high]`` (always including 0)."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        scale = (high - low) / (qmax - qmin) if high > low else 1.0 / 256
        zero_point = int(np.clip(np.round(qmin - low / scale), qmin, qmax))
        return cls(scale=scale, zero_point=zero_point)

    def same(self, other: "Quant | None") -> bool:
        return (
            other is not None and self.axis == other.axis and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
        )


@dataclasses.dataclass(eq=False)
class Tensor:
    """A graph value (see the module docs). Identity is the object: ``eq=False``."""

    name: str
    shape: tuple[int, ...]
    dtype: Any = np.float32
    data: np.ndarray | None = None
    quant: Quant | None = None
    range: tuple[float, float] | None = None

    @property
    def is_constant(self) -> bool:
        return self.data is not None


@dataclasses.dataclass(eq=False)
class Op:
    kind: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    attrs: dict = dataclasses.field(default_factory=dict)
    activation: str | None = None
    where: str = ""  # source line of the equation it came from, for error messages

    def __post_init__(self):
        if self.kind not in OP_KINDS:
            raise ExportError(f"unknown graph op kind {self.kind!r}")


class Graph:
    """Tensors and ops in execution order; ``inputs`` / ``outputs`` are float activations."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        base, index = name, 1
        while name in self._names:
            name, index = f"{base}_{index}", index + 1
        self._names.add(name)
        return name

    def tensor(self, name: str, shape, dtype=np.float32, **fields) -> Tensor:
        return Tensor(self._unique(name), tuple(int(d) for d in shape), np.dtype(dtype), **fields)

    def constant(self, name: str, data, dtype=None, quant: Quant | None = None) -> Tensor:
        data = np.asarray(data, dtype)
        return Tensor(self._unique(name), tuple(data.shape), data.dtype, data=data, quant=quant)

    def input(self, name: str, shape) -> Tensor:
        tensor = self.tensor(name, shape)
        self.inputs.append(tensor)
        return tensor

    def add(self, kind: str, inputs, out_shape, attrs=None, *, name: str | None = None, where: str = "") -> Tensor:
        """Append an op with one float output of ``out_shape``; return the output."""
        out = self.tensor(name or kind, out_shape)
        self.ops.append(Op(kind, list(inputs), [out], dict(attrs or {}), where=where))
        return out

    # ---- structure queries used by the passes and the writers -------------------------------
    def consumers(self) -> dict[int, list[Op]]:
        uses: dict[int, list[Op]] = {}
        for op in self.ops:
            for tensor in op.inputs:
                uses.setdefault(id(tensor), []).append(op)
        return uses

    def producers(self) -> dict[int, Op]:
        return {id(out): op for op in self.ops for out in op.outputs}

    def replace_uses(self, old: Tensor, new: Tensor) -> None:
        for op in self.ops:
            op.inputs = [new if t is old else t for t in op.inputs]
        self.outputs = [new if t is old else t for t in self.outputs]

    def prune(self) -> None:
        """Drop ops whose outputs nothing uses (after folding)."""
        while True:
            used = {id(t) for op in self.ops for t in op.inputs} | {id(t) for t in self.outputs}
            kept = [op for op in self.ops if any(id(out) in used for out in op.outputs)]
            if len(kept) == len(self.ops):
                return
            self.ops = kept

    def quantized(self) -> bool:
        return any(t.quant is not None for op in self.ops for t in op.inputs + op.outputs if not t.is_constant)
