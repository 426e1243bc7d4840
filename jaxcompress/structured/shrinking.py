"""Physically remove pruned channels: masks in, a smaller dense params tree out.

`shrink` takes filter masks (one keep-vector per layer's output features, e.g. from
`channel_masks` or `jaxcompress.structured_mask`) and returns the same tree with smaller arrays:
each removed channel disappears from every leaf position its class holds (`analyze_channels`):
the layer's kernel columns and bias, its BatchNorm scale/bias/mean/var (``batch_stats`` too),
the input rows of every consumer (H*W rows each through a flatten), the filters of depthwise
convs that read it, and the other members of a residual add or concat. The new per-layer
feature counts (``result.features``) are what the smaller module is built with.

`channel_masks` builds such masks for a target fraction: it ranks the channels of every coupled
group (the filters joined by residual adds are one group, scored by the sum of their members'
L1/L2 filter norms) and keeps the same channels for all members, so its masks never disagree.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.pruning import scores as scores_lib
from jaxcompress.pruning.masks import num_to_prune
from jaxcompress.rules import path_to_str
from jaxcompress.structured.coupling import ChannelCoupling, analyze_channels

__all__ = ["ShrinkResult", "shrink", "channel_masks", "ALIGNMENTS"]

ALIGNMENTS = (None, "union", "intersection")
Alignment = Literal["union", "intersection"]


@dataclasses.dataclass(frozen=True)
class ShrinkResult:
    """What `shrink` returns.

    * ``params``: the variables with the same tree structure and smaller arrays;
    * ``features``: ``{module path: new number of output features}`` for every kernel whose last
      axis shrank (``"params/Conv_0": 16``) -- build the smaller module with these;
    * ``kept``: ``{leaf path: {axis: kept indices}}`` for every leaf that changed;
    * ``shapes``: ``{leaf path: (old shape, new shape)}`` for every leaf that changed;
    * ``size_before`` / ``size_after``: number of elements over all leaves.
    """

    params: Any
    features: dict[str, int]
    kept: dict[str, dict[int, np.ndarray]]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    size_before: int
    size_after: int


def _resolve(path: str, coupling: ChannelCoupling) -> str:
    if path in coupling.shapes:
        return path
    matches = [p for p in coupling.paths if p.endswith("/" + path)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(f"masks[{path!r}]: no leaf of the variables has this path (leaves: {coupling.paths[:8]}...)")
    raise ValueError(f"masks[{path!r}]: ambiguous, matches {matches}; give the full path")


def _as_keep_vector(path: str, mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if not shape:
        raise ValueError(f"{path}: a scalar leaf has no channels to remove")
    features = shape[-1]
    if mask.shape == (features,):
        return mask.astype(bool)
    if mask.shape == shape:
        flat = mask.astype(bool).reshape(-1, features)
        keep = flat.any(axis=0)
        if not (flat == keep).all():
            raise ValueError(
                f"{path}: mask of shape {shape} is not a filter mask (it must be the same for every "
                f"element of a filter: the last axis); use structured_mask(..., axis=-1)"
            )
        return keep
    raise ValueError(f"{path}: expected a keep-mask of shape ({features},) or {shape}, got {mask.shape}")


def _mask_items(masks: Any, coupling: ChannelCoupling) -> dict[str, np.ndarray]:
    """``{full leaf path: keep vector}`` from a ``{path: mask}`` mapping or a masks pytree."""
    items: list[tuple[str, Any]]
    if isinstance(masks, Mapping) and masks and all(isinstance(k, str) and "/" in k or k in coupling.shapes for k in masks):
        items = list(masks.items())
    else:
        flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
        items = [(path_to_str(p), m) for p, m in flat if m is not None and hasattr(m, "shape")]
    result = {}
    for key, mask in items:
        path = _resolve(key, coupling)
        result[path] = _as_keep_vector(path, mask, coupling.shapes[path])
    return result


def _decide(keeps: dict[str, np.ndarray], coupling: ChannelCoupling, align: str | None) -> np.ndarray:
    """Class ids to remove, after checking agreement within coupled groups."""
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    class_parts, vote_parts, owner_parts = [], [], []
    for index, (path, keep) in enumerate(keeps.items()):
        class_parts.append(coupling.out_classes(path))
        vote_parts.append(keep)
        owner_parts.append(np.full(keep.shape, index))
    if not class_parts:
        return np.zeros(0, np.int64)
    classes, votes, owners = np.concatenate(class_parts), np.concatenate(vote_parts), np.concatenate(owner_parts)
    unique, inverse = np.unique(classes, return_inverse=True)
    any_keep = np.zeros(unique.shape, bool)
    any_drop = np.zeros(unique.shape, bool)
    np.logical_or.at(any_keep, inverse, votes)
    np.logical_or.at(any_drop, inverse, ~votes)
    mixed = any_keep & any_drop
    if mixed.any() and align is None:
        names = list(keeps)
        bad = np.isin(inverse, np.flatnonzero(mixed))
        involved = sorted({names[o] for o in owners[bad]})
        raise ValueError(
            f"masks of coupled leaves disagree on {int(mixed.sum())} channel(s): {', '.join(involved)} "
            f"share channels (a residual add, concat or depthwise conv joins them; coupled positions: "
            f"{', '.join(coupling.members(unique[mixed]))}); give them the same mask, use "
            f"channel_masks(...), or pass align='union' (keep a channel any of them keeps) or "
            f"align='intersection' (keep only channels all of them keep)"
        )
    drop = any_drop & ~any_keep if align in (None, "union") else any_drop
    dropped = unique[drop]
    blocked = [int(c) for c in dropped if int(c) in coupling.reasons]
    if blocked:
        names = list(keeps)
        involved = sorted({names[o] for o in owners[np.isin(classes, blocked) & ~votes]})
        reasons = sorted({r for c in blocked for r in coupling.reasons[c]})
        raise ValueError(
            f"cannot remove channels of {', '.join(involved)}: they are coupled with "
            f"{', '.join(coupling.members(blocked[:1]))}, and that channel group "
            + "; ".join(reasons)
        )
    return dropped


def shrink(
    fn: Callable, variables: Any, masks: Any, *args: Any, align: Alignment | None = None, **kwargs: Any
) -> ShrinkResult:
    """Remove the masked-out channels from ``variables``; returns a `ShrinkResult`.

    ``fn(variables, *args, **kwargs)`` is the inference function the coupling is traced from
    (`analyze_channels`); ``masks`` maps leaf paths (full, e.g. ``"params/Conv_0/kernel"``, or a
    unique suffix such as ``"Conv_0/kernel"``) to keep-masks of the leaf's LAST axis (its filters /
    output features), either 1-D or of the leaf's shape (a filter mask from
    ``structured_mask(..., axis=-1)``); a masks pytree with ``None``/``MaskedNode`` at unpruned
    leaves works too. Coupled leaves (residual adds, concats, depthwise convs) must get equal
    masks unless ``align="union"`` / ``"intersection"`` reconciles them.

    >>> import jax.numpy as jnp
    >>> params = {"a": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}, "b": {"kernel": jnp.ones((4, 2))}}
    >>> fn = lambda p, x: (x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]
    >>> result = shrink(fn, params, {"a/kernel": jnp.array([True, False, True, False])}, jnp.ones((1, 3)))
    >>> result.features, result.params["b"]["kernel"].shape, result.params["a"]["bias"].shape
    ({'a': 2}, (2, 2), (2,))
    """
    coupling = analyze_channels(fn, variables, *args, **kwargs)
    return shrink_with(coupling, variables, masks, align=align)


def shrink_with(coupling: ChannelCoupling, variables: Any, masks: Any, *, align: Alignment | None = None) -> ShrinkResult:
    """`shrink` with a precomputed `analyze_channels` result (no retracing).

    >>> import jax.numpy as jnp
    >>> params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 2))}}
    >>> fn = lambda p, x: x @ p["a"]["kernel"] @ p["b"]["kernel"]
    >>> coupling = analyze_channels(fn, params, jnp.ones((1, 3)))
    >>> shrink_with(coupling, params, {"a/kernel": jnp.arange(4) < 3}).size_after
    15
    """
    keeps = _mask_items(masks, coupling)
    dropped = _decide(keeps, coupling, align)
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    if treedef != coupling.treedef:
        raise ValueError("variables: tree structure differs from the one the coupling was traced with")
    new_leaves, kept, shapes, features = [], {}, {}, {}
    for path, leaf in zip(coupling.paths, leaves):
        axes = {}
        for axis, roots in enumerate(coupling.roots[path]):
            keep = ~np.isin(roots, dropped)
            if not keep.all():
                if not keep.any():
                    raise ValueError(f"{path}: the masks remove every index of axis {axis}; keep at least one channel")
                axes[axis] = np.flatnonzero(keep)
        for axis, index in axes.items():
            leaf = jnp.take(leaf, jnp.asarray(index), axis=axis)
        new_leaves.append(leaf)
        if axes:
            kept[path] = axes
            shapes[path] = (coupling.shapes[path], tuple(np.shape(leaf)))
            last = len(coupling.shapes[path]) - 1
            if path.endswith("kernel") and last in axes:
                module = path.rsplit("/", 1)[0] if "/" in path else path
                features[module] = len(axes[last])
    size_before = sum(int(np.prod(s)) for s in coupling.shapes.values())
    size_after = sum(int(np.size(leaf)) for leaf in new_leaves)
    params = jax.tree_util.tree_unflatten(treedef, new_leaves)
    return ShrinkResult(params, features, kept, shapes, size_before, size_after)


def channel_masks(
    fn: Callable,
    variables: Any,
    *args: Any,
    sparsity: float,
    norm: str = "l1",
    include: str = r".*kernel",
    exclude: str | None = None,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Filter keep-masks removing ``round(sparsity * n)`` channels of every coupled group.

    Candidates are the leaves whose path fully matches ``include`` (and not ``exclude``) and
    whose filters (last axis) can be removed (not tied to the model's output, a LayerNorm, ...).
    Candidates that share channels (a residual add, a depthwise conv following its input) form
    one group; a channel's score is the sum of the ``norm`` (``"l1"``/``"l2"``) of its filters in
    every member (Li et al. 2017). Returns ``{leaf path: bool keep vector}``, ready for `shrink`.

    >>> import jax.numpy as jnp
    >>> params = {"a": {"kernel": jnp.array([[1.0, 0.1, 3.0, 0.2]])}, "b": {"kernel": jnp.ones((4, 2))}}
    >>> fn = lambda p, x: x @ p["a"]["kernel"] @ p["b"]["kernel"]
    >>> {k: v.tolist() for k, v in channel_masks(fn, params, jnp.ones((1, 1)), sparsity=0.5).items()}
    {'a/kernel': [True, False, True, False]}
    """
    coupling = analyze_channels(fn, variables, *args, **kwargs)
    return channel_masks_with(coupling, variables, sparsity=sparsity, norm=norm, include=include, exclude=exclude)


def channel_masks_with(
    coupling: ChannelCoupling,
    variables: Any,
    *,
    sparsity: float,
    norm: str = "l1",
    include: str = r".*kernel",
    exclude: str | None = None,
) -> dict[str, np.ndarray]:
    """`channel_masks` with a precomputed `analyze_channels` result.

    >>> import jax.numpy as jnp
    >>> params = {"a": {"kernel": jnp.array([[1.0, 0.1, 3.0, 0.2]])}, "b": {"kernel": jnp.ones((4, 2))}}
    >>> coupling = analyze_channels(lambda p, x: x @ p["a"]["kernel"] @ p["b"]["kernel"], params, jnp.ones((1, 1)))
    >>> channel_masks_with(coupling, params, sparsity=0.25)["a/kernel"].tolist()
    [True, False, True, True]
    """
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    leaves = dict(zip(coupling.paths, jax.tree_util.tree_leaves(variables)))
    candidates = [
        path
        for path in coupling.paths
        if re.fullmatch(include, path)
        and not (exclude and re.fullmatch(exclude, path))
        and len(coupling.shapes[path]) >= 1
        and coupling.shrinkable(path)
    ]
    # Group candidates that share channel classes (union-find over candidate indices).
    parent = list(range(len(candidates)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for index, path in enumerate(candidates):
        for cls in np.unique(coupling.out_classes(path)).tolist():
            if cls in owner:
                parent[find(index)] = find(owner[cls])
            else:
                owner[cls] = index
    groups: dict[int, list[str]] = {}
    for index, path in enumerate(candidates):
        groups.setdefault(find(index), []).append(path)

    masks = {}
    for members in groups.values():
        classes = np.unique(np.concatenate([coupling.out_classes(p) for p in members]))
        totals = np.zeros(classes.shape, np.float64)
        for path in members:
            norms = np.asarray(scores_lib.unit_norms(jnp.abs(jnp.asarray(leaves[path], jnp.float32)), -1, norm), np.float64)
            np.add.at(totals, np.searchsorted(classes, coupling.out_classes(path)), norms)
        count = int(num_to_prune(sparsity, len(classes)))
        count = min(count, len(classes) - 1)
        order = np.lexsort((np.arange(len(classes)), totals))  # lowest score first, ties by index
        removed = classes[order[:count]]
        for path in members:
            masks[path] = ~np.isin(coupling.out_classes(path), removed)
    return masks
