"""The channel-dataflow rules behind `analyze_channels`: one rule per jaxpr primitive.

`_Walker.walk` evaluates a jaxpr abstractly, as a rule set on the program layer's one
`Evaluator` (which inlines call-like bodies): each value carries, per axis, ``None`` or an array
of channel-node ids; primitives move, unify (`_UnionFind.union`) or poison those nodes. See
`jaxcompress.structured.coupling` for what each kind of equation does and why.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxcompress._program import Evaluator, RuleSet

__all__ = []

Labels = tuple  # per axis: np.ndarray of node ids, or None


class _UnionFind:
    """Union-find over channel nodes; a root may carry the reasons its class cannot be shrunk."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.reasons: dict[int, list[str]] = {}

    def new(self, size: int, reason: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + size))
        nodes = np.arange(start, start + size, dtype=np.int64)
        if reason is not None:
            self.poison(nodes, reason)
        return nodes

    def find(self, node: int) -> int:
        parent = self.parent
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def roots(self, nodes: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(n)) for n in np.ravel(nodes)), np.int64, np.size(nodes)).reshape(np.shape(nodes))

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if a is b:
            return
        for x, y in zip(np.ravel(a).tolist(), np.ravel(b).tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            if rx > ry:
                rx, ry = ry, rx
            self.parent[ry] = rx
            moved = self.reasons.pop(ry, None)
            if moved:
                kept = self.reasons.setdefault(rx, [])
                kept.extend(r for r in moved if r not in kept and len(kept) < 4)

    def poison(self, nodes: np.ndarray, reason: str) -> None:
        for root in set(self.roots(nodes).tolist()):
            kept = self.reasons.setdefault(root, [])
            if reason not in kept and len(kept) < 4:
                kept.append(reason)


_ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma imag integer_pow
    is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow real reduce_precision
    rem round rsqrt select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square
    sub tan tanh xor sharding_constraint mesh_cast reshard pvary optimization_barrier""".split()
)
_REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin".split())
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_WINDOWED = frozenset("reduce_window_sum reduce_window_max reduce_window_min reduce_window".split())


def _shape(var) -> tuple[int, ...]:
    return tuple(getattr(var.aval, "shape", ()))


def _describe(eqn) -> str:
    ins = ", ".join(str(getattr(v, "aval", v).str_short()) if hasattr(getattr(v, "aval", None), "str_short") else "?" for v in eqn.invars)
    outs = ", ".join(v.aval.str_short() for v in eqn.outvars)
    return f"`{eqn.primitive.name}` ({ins} -> {outs})"


def _as_labels(value) -> Labels:
    """A labels tuple, or no labels for a literal / constant (not tied to any channel)."""
    return value if isinstance(value, tuple) else (None,) * np.ndim(value)


class _Walker:
    def __init__(self, nodes: _UnionFind):
        self.nodes = nodes

    # -- helpers ------------------------------------------------------------------------
    def fresh(self, shape: Sequence[int], reason: str) -> Labels:
        return tuple(self.nodes.new(d, reason) for d in shape)

    def poison_labels(self, labels: Labels, reason: str) -> None:
        for label in labels:
            if label is not None:
                self.nodes.poison(label, reason)

    def unify(self, a, b):
        if a is None:
            return b
        if b is not None:
            self.nodes.union(a, b)
        return a

    # -- the walk: a rule set on the program layer ----------------------------------------
    def walk(self, jaxpr, in_labels: Sequence[Labels], consts: Sequence[Any] = ()) -> list[Labels]:
        """Evaluate ``jaxpr`` on labels with the program layer's `Evaluator` (call-like bodies
        are inlined by it; every other equation goes to `_Walker.equation`)."""
        const_labels = [(None,) * len(_shape(var)) for var in jaxpr.constvars]
        outs = Evaluator(self.rules).run(jaxpr, const_labels, list(in_labels))
        return [_as_labels(value) for value in outs]

    @property
    def rules(self) -> RuleSet:
        # Every value is a labels tuple (kind "labels"): nothing is ever bound, loops and branches
        # are not rebuilt (they reach `unknown`, which poisons what flows in).
        return RuleSet(kinds=("labels",), classify=lambda value: "labels", default=self._rule, control_flow=False)

    def _rule(self, ev, eqn, invals) -> list[Labels]:
        return self.equation(eqn, [_as_labels(value) for value in invals])

    def equation(self, eqn, ins: list[Labels]) -> list[Labels]:
        name = eqn.primitive.name
        params = eqn.params
        in_shapes = [_shape(v) for v in eqn.invars]
        out_shapes = [_shape(v) for v in eqn.outvars]
        if name in _ELEMENTWISE:
            return self.elementwise(ins, in_shapes, out_shapes)
        handler = getattr(self, "op_" + name, None)
        if handler is not None:
            return handler(eqn, ins, in_shapes, out_shapes, params)
        if name in _REDUCTIONS:
            return self.reduction(eqn, ins, in_shapes, params["axes"])
        if name in _CUMULATIVE:
            label = ins[0][params["axis"]]
            if label is not None:
                self.nodes.poison(label, f"{_describe(eqn)} runs along a channel axis")
            return [ins[0]]
        if name in _WINDOWED:
            return self.windowed(eqn, ins, in_shapes, out_shapes, params)
        return self.unknown(eqn, ins, out_shapes)

    def unknown(self, eqn, ins, out_shapes) -> list[Labels]:
        if all(label is None for labels in ins for label in labels):
            return [(None,) * len(s) for s in out_shapes]
        reason = f"{_describe(eqn)} is not understood by the channel analysis"
        for labels in ins:
            self.poison_labels(labels, reason)
        return [self.fresh(s, reason) for s in out_shapes]

    def elementwise(self, ins, in_shapes, out_shapes) -> list[Labels]:
        out_shape = out_shapes[0]
        out = [None] * len(out_shape)
        for labels, shape in zip(ins, in_shapes):
            if len(shape) != len(out_shape):
                continue  # a scalar operand
            for axis, label in enumerate(labels):
                if label is not None and shape[axis] == out_shape[axis]:
                    out[axis] = self.unify(out[axis], label)
        return [tuple(out)] * len(out_shapes)

    def reduction(self, eqn, ins, in_shapes, axes) -> list[Labels]:
        labels = ins[0]
        for axis in axes:
            if labels[axis] is not None:
                self.nodes.poison(labels[axis], f"{_describe(eqn)} reduces over a channel axis")
        kept = tuple(label for axis, label in enumerate(labels) if axis not in axes)
        return [kept] * len(eqn.outvars)

    def windowed(self, eqn, ins, in_shapes, out_shapes, params) -> list[Labels]:
        n = len(out_shapes)
        windows = params.get("window_dimensions")
        strides = params.get("window_strides")
        padding = params.get("padding")
        base = params.get("base_dilation") or (1,) * len(windows)
        dilation = params.get("window_dilation") or (1,) * len(windows)
        outs = []
        for labels, out_shape in zip(ins[:n], out_shapes):
            out = []
            for axis, label in enumerate(labels):
                plain = windows[axis] == 1 and strides[axis] == 1 and tuple(padding[axis]) == (0, 0) and base[axis] == 1 and dilation[axis] == 1
                if label is not None and not plain:
                    reason = f"{_describe(eqn)} pools across a channel axis"
                    self.nodes.poison(label, reason)
                    label = self.nodes.new(out_shape[axis], reason)
                out.append(label)
            outs.append(tuple(out))
        return outs

    # -- structural primitives ----------------------------------------------------------
    def op_broadcast_in_dim(self, eqn, ins, in_shapes, out_shapes, params):
        out = [None] * len(out_shapes[0])
        for axis, target in enumerate(params["broadcast_dimensions"]):
            if in_shapes[0][axis] == out_shapes[0][target]:
                out[target] = ins[0][axis]
        return [tuple(out)]

    def op_reshape(self, eqn, ins, in_shapes, out_shapes, params):
        if params.get("dimensions"):
            return self.unknown(eqn, ins, out_shapes)
        labels, in_shape, out_shape = ins[0], in_shapes[0], out_shapes[0]
        out = [None] * len(out_shape)
        in_axes = [a for a, d in enumerate(in_shape) if d != 1]
        out_axes = [a for a, d in enumerate(out_shape) if d != 1]
        p = q = 0
        while p < len(in_axes) and q < len(out_axes):
            block_in, block_out = [in_axes[p]], [out_axes[q]]
            size_in, size_out = in_shape[in_axes[p]], out_shape[out_axes[q]]
            while size_in != size_out:
                if size_in < size_out:
                    p += 1
                    block_in.append(in_axes[p])
                    size_in *= in_shape[in_axes[p]]
                else:
                    q += 1
                    block_out.append(out_axes[q])
                    size_out *= out_shape[out_axes[q]]
            p, q = p + 1, q + 1
            labelled = [a for a in block_in if labels[a] is not None]
            if not labelled:
                continue
            if len(block_in) == 1 and len(block_out) == 1:
                out[block_out[0]] = labels[block_in[0]]
            elif len(labelled) == 1 and len(block_out) == 1:
                # Flatten: one channel axis merged with unlabelled ones; every merged index
                # belongs to the channel it came from (NHWC -> N,(H*W*C): c repeats H*W times).
                (axis,) = labelled
                dims = [in_shape[a] for a in block_in]
                view = [1] * len(dims)
                view[block_in.index(axis)] = dims[block_in.index(axis)]
                out[block_out[0]] = np.broadcast_to(labels[axis].reshape(view), dims).ravel()
            else:
                what = "splits a channel axis" if len(block_out) > 1 else "merges several channel-carrying axes"
                reason = f"{_describe(eqn)} {what}"
                for a in labelled:
                    self.nodes.poison(labels[a], reason)
                for a in block_out:
                    out[a] = self.nodes.new(out_shape[a], reason)
        return [tuple(out)]

    def op_transpose(self, eqn, ins, in_shapes, out_shapes, params):
        return [tuple(ins[0][a] for a in params["permutation"])]

    def op_squeeze(self, eqn, ins, in_shapes, out_shapes, params):
        dims = {d % len(in_shapes[0]) for d in params["dimensions"]}
        return [tuple(label for a, label in enumerate(ins[0]) if a not in dims)]

    def op_expand_dims(self, eqn, ins, in_shapes, out_shapes, params):
        return self.op_reshape(eqn, ins, in_shapes, out_shapes, {})

    def op_rev(self, eqn, ins, in_shapes, out_shapes, params):
        dims = set(params["dimensions"])
        return [tuple(label[::-1] if a in dims and label is not None else label for a, label in enumerate(ins[0]))]

    def op_concatenate(self, eqn, ins, in_shapes, out_shapes, params):
        dimension = params["dimension"]
        out_shape = out_shapes[0]
        out = [None] * len(out_shape)
        for axis in range(len(out_shape)):
            if axis == dimension:
                if any(labels[axis] is not None for labels in ins):
                    pieces = [
                        labels[axis] if labels[axis] is not None else self.nodes.new(shape[axis])
                        for labels, shape in zip(ins, in_shapes)
                    ]
                    out[axis] = np.concatenate(pieces)
                continue
            for labels, shape in zip(ins, in_shapes):
                if labels[axis] is not None and shape[axis] == out_shape[axis]:
                    out[axis] = self.unify(out[axis], labels[axis])
        return [tuple(out)]

    def op_split(self, eqn, ins, in_shapes, out_shapes, params):
        axis = params["axis"]
        label = ins[0][axis]
        outs, start = [], 0
        for size in params["sizes"]:
            piece = None if label is None else label[start : start + size]
            outs.append(ins[0][:axis] + (piece,) + ins[0][axis + 1 :])
            start += size
        return outs

    def _partial(self, eqn, ins, out_shapes, full: Sequence[bool]):
        out = []
        for axis, label in enumerate(ins[0]):
            if label is None or full[axis]:
                out.append(label)
            else:
                reason = f"{_describe(eqn)} takes part of a channel axis"
                self.nodes.poison(label, reason)
                out.append(self.nodes.new(out_shapes[0][axis], reason))
        return [tuple(out)]

    def op_slice(self, eqn, ins, in_shapes, out_shapes, params):
        full = [a == b for a, b in zip(in_shapes[0], out_shapes[0])]
        return self._partial(eqn, ins, out_shapes, full)

    def op_dynamic_slice(self, eqn, ins, in_shapes, out_shapes, params):
        full = [a == b for a, b in zip(in_shapes[0], out_shapes[0])]
        return self._partial(eqn, ins[:1], out_shapes, full)

    def op_pad(self, eqn, ins, in_shapes, out_shapes, params):
        full = [tuple(c) == (0, 0, 0) for c in params["padding_config"]]
        return self._partial(eqn, ins[:1], out_shapes, full)

    # -- contractions ---------------------------------------------------------------------
    def op_dot_general(self, eqn, ins, in_shapes, out_shapes, params):
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = params["dimension_numbers"]
        lhs, rhs = ins
        for a, b in zip(lhs_contract, rhs_contract):
            self.unify(lhs[a], rhs[b])
        batch = [self.unify(lhs[a], rhs[b]) for a, b in zip(lhs_batch, rhs_batch)]
        lhs_free = [lhs[a] for a in range(len(lhs)) if a not in lhs_contract and a not in lhs_batch]
        rhs_free = [rhs[a] for a in range(len(rhs)) if a not in rhs_contract and a not in rhs_batch]
        return [tuple(batch + lhs_free + rhs_free)]

    def op_conv_general_dilated(self, eqn, ins, in_shapes, out_shapes, params):
        lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
        lhs, rhs = ins
        groups = params["feature_group_count"]
        out = [None] * len(out_shapes[0])
        out[out_spec[0]] = lhs[lhs_spec[0]]
        in_features = in_shapes[0][lhs_spec[1]]
        out_features = in_shapes[1][rhs_spec[0]]
        if params.get("batch_group_count", 1) != 1:
            return self.unknown(eqn, ins, out_shapes)
        if groups == 1:
            self.unify(lhs[lhs_spec[1]], rhs[rhs_spec[1]])
            out[out_spec[1]] = rhs[rhs_spec[0]]
        elif groups == in_features:
            # Depthwise: output channel j reads input channel j // multiplier only.
            multiplier = out_features // in_features
            if lhs[lhs_spec[1]] is not None:
                repeated = np.repeat(lhs[lhs_spec[1]], multiplier)
                if rhs[rhs_spec[0]] is not None:
                    self.nodes.union(repeated, rhs[rhs_spec[0]])
            out[out_spec[1]] = rhs[rhs_spec[0]] if rhs[rhs_spec[0]] is not None else (
                np.repeat(lhs[lhs_spec[1]], multiplier) if lhs[lhs_spec[1]] is not None else None)
        else:
            reason = f"{_describe(eqn)} is a grouped convolution ({groups} groups)"
            for labels in ins:
                for axis in (lhs_spec[1],) if labels is lhs else (rhs_spec[0], rhs_spec[1]):
                    if labels[axis] is not None:
                        self.nodes.poison(labels[axis], reason)
            out[out_spec[1]] = self.nodes.new(out_shapes[0][out_spec[1]], reason)
        return [tuple(out)]
