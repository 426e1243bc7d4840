"""Which channels of which leaves belong together, read from the model's traced program.

`analyze_channels` traces ``fn(variables, *args)`` to a jaxpr and runs a channel-dataflow
analysis over it. Every axis of every variable leaf gets one NODE per index (channel ``i`` of
axis ``a`` of ``params/Conv_0/kernel`` is one node). Walking the program, each intermediate
value carries, per axis, either ``None`` (no channel meaning: spatial axes, constants) or an
array of node ids, one per index of that axis. Equations couple nodes (union-find):

* elementwise ops (add, mul, max, select, ...) unify the labels of every operand axis that is
  not broadcast -- a bias add couples the bias with its layer's filters, ``x - mean`` couples
  BatchNorm statistics, a residual ``x + f(x)`` couples two layers' filters;
* ``broadcast_in_dim``, ``reshape`` (that keeps an axis, or flattens exactly one labelled axis
  with unlabelled ones: (N, H, W, C) -> (N, H*W*C) maps channel ``c`` to its H*W rows),
  ``transpose``, ``squeeze``, ``rev``, ``concatenate`` (labels are concatenated, so a consumer of
  a concat sees each branch at its offset) and ``split`` move labels;
* ``dot_general`` / ``conv_general_dilated`` unify the contracted axes (the activation's channel
  axis with the kernel's input axis), pass the kernel's output-feature axis to the result (a new
  channel group starts there); a depthwise conv (``feature_group_count`` == input channels)
  couples its filters with its input channels;
* nested calls (``pjit``, ``custom_jvp_call`` such as ``jax.nn.relu``, ``custom_vjp_call``,
  remat) are walked recursively.

Anything that mixes channels in a way a slice cannot follow POISONS the nodes involved, with a
reason: a reduction over a channel axis (LayerNorm), a reshape that merges two channel-carrying
axes or splits one, a partial slice or pad of a channel axis, grouped convs, gathers and every
primitive not listed here. The model's inputs and outputs are poisoned too (their shapes are
fixed). Shrinking a poisoned channel is an error naming the leaves involved.

Nodes are individual channels, not layers, so offsets (concat), repeats (flatten) and the
mapping of a depthwise multiplier need no special cases: a channel's "class" is the set of
(leaf, axis, index) positions that must be removed together.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from jaxcompress.rules import path_to_str
from jaxcompress.structured.dataflow import Labels, _shape, _UnionFind, _Walker

__all__ = ["ChannelCoupling", "analyze_channels"]


@dataclasses.dataclass
class ChannelCoupling:
    """The result of `analyze_channels`: for every leaf axis, the channel class of each index.

    ``roots[path][axis][i]`` is the class id of index ``i`` of that axis; two positions with the
    same class id must be removed together. ``reasons[class_id]`` (absent when shrinkable) says
    why a class cannot be removed.
    """

    paths: list[str]
    shapes: dict[str, tuple[int, ...]]
    roots: dict[str, list[np.ndarray]]
    reasons: dict[int, list[str]]
    treedef: Any

    def members(self, classes: Iterable[int]) -> list[str]:
        """``path[axis]`` strings of every leaf axis that holds one of ``classes``."""
        wanted = np.asarray(sorted(set(int(c) for c in classes)), np.int64)
        found = []
        for path in self.paths:
            for axis, roots in enumerate(self.roots[path]):
                if np.isin(roots, wanted).any():
                    found.append(f"{path}[axis {axis}]")
        return found

    def out_classes(self, path: str) -> np.ndarray:
        """Class ids of the last axis (the filters / output features) of ``path``."""
        return self.roots[path][-1]

    def shrinkable(self, path: str) -> bool:
        """Whether every filter of ``path`` (its last axis) can be removed.

        >>> import jax.numpy as jnp
        >>> params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 2))}}
        >>> fn = lambda p, x: x @ p["a"]["kernel"] @ p["b"]["kernel"]
        >>> coupling = analyze_channels(fn, params, jnp.ones((1, 3)))
        >>> coupling.shrinkable("a/kernel"), coupling.shrinkable("b/kernel")
        (True, False)
        """
        return not any(int(c) in self.reasons for c in np.unique(self.roots[path][-1]))


def analyze_channels(fn: Callable, variables: Any, *args: Any, **kwargs: Any) -> ChannelCoupling:
    """Trace ``fn(variables, *args, **kwargs)`` and couple the channels of ``variables``' leaves.

    ``fn`` is the INFERENCE function (e.g. a linen ``model.apply`` with BatchNorm in
    ``use_running_average=True`` mode, or ``lambda state, x: nnx.merge(graphdef, state)(x)``);
    ``args`` are example inputs (any batch size; only shapes matter).

    >>> import jax.numpy as jnp
    >>> params = {"a": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}, "b": {"kernel": jnp.ones((4, 2))}}
    >>> fn = lambda p, x: (x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]
    >>> coupling = analyze_channels(fn, params, jnp.ones((1, 3)))
    >>> coupling.members(coupling.out_classes("a/kernel")[:1])
    ['a/bias[axis 0]', 'a/kernel[axis 1]', 'b/kernel[axis 0]']
    """
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(variables)
    paths = [path_to_str(p) for p, _ in leaves_with_paths]
    if len(set(paths)) != len(paths):
        raise ValueError("variables: two leaves share the same path string; cannot name channels uniquely")
    closed = jax.make_jaxpr(lambda v, a, k: fn(v, *a, **k))(variables, args, kwargs)
    jaxpr = closed.jaxpr
    nodes = _UnionFind()
    walker = _Walker(nodes)
    leaf_nodes = []
    in_labels: list[Labels] = []
    for (_, leaf), var in zip(leaves_with_paths, jaxpr.invars):
        labels = tuple(nodes.new(d) for d in np.shape(leaf))
        leaf_nodes.append(labels)
        in_labels.append(labels)
    for var in jaxpr.invars[len(leaves_with_paths):]:
        in_labels.append(walker.fresh(_shape(var), "is tied to an input of the model (its shape is fixed)"))
    outs = walker.walk(jaxpr, in_labels)
    for labels in outs:
        walker.poison_labels(labels, "reaches an output of the model (its shape is fixed)")
    roots = {path: [nodes.roots(axis_nodes) for axis_nodes in labels] for path, labels in zip(paths, leaf_nodes)}
    shapes = {path: tuple(np.shape(leaf)) for path, (_, leaf) in zip(paths, leaves_with_paths)}
    reasons = {root: list(r) for root, r in nodes.reasons.items() if nodes.find(root) == root}
    return ChannelCoupling(paths, shapes, roots, reasons, treedef)
