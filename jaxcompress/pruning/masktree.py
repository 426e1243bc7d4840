"""Mask trees: the params' structure with a bool mask per pruned leaf and `optax.MaskedNode()`
for every leaf that is not pruned (never ``None``), so they checkpoint and shard like params."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from optax import MaskedNode

from jaxcompress.rules import path_to_keystr

__all__ = ["apply_masks", "check_masks", "mask_sparsity", "is_masked_node"]


def is_masked_node(x: Any) -> bool:
    return isinstance(x, MaskedNode)


def check_masks(params: Any, masks: Any) -> None:
    """Raise a ValueError naming the first leaf where ``masks`` does not fit ``params``.

    Every leaf of ``params`` needs either `optax.MaskedNode()` or a bool/uint8 array of the
    param's shape at the same place in ``masks``.

    >>> import jax.numpy as jnp, optax
    >>> check_masks({"w": jnp.ones((2, 3))}, {"w": jnp.ones((3, 2), bool)})
    Traceback (most recent call last):
    ...
    ValueError: masks['w']: shape (3, 2) does not match the param's shape (2, 3)
    """
    param_flat, param_def = jax.tree_util.tree_flatten_with_path(params)
    mask_flat, mask_def = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_masked_node)
    if param_def != mask_def:  # type: ignore[operator]  # jax ships PyTreeDef without a typed __ne__
        param_paths = [path_to_keystr(p, "") for p, _ in param_flat]
        mask_paths = [path_to_keystr(p, "") for p, _ in mask_flat]
        missing = [p for p in param_paths if p not in mask_paths]
        extra = [p for p in mask_paths if p not in param_paths]
        detail = []
        if missing:
            detail.append(f"no mask for params{missing[0]}")
        if extra:
            detail.append(f"masks{extra[0]} has no param")
        if not detail:
            detail.append(f"tree structure {mask_def} differs from the params' {param_def}")
        raise ValueError("mask tree does not match the params: " + "; ".join(detail) +
                         " (use optax.MaskedNode() for leaves that are not pruned)")
    for (path, param), (_, mask) in zip(param_flat, mask_flat):
        if is_masked_node(mask):
            continue
        name = path_to_keystr(path, "masks")
        if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
            raise ValueError(f"{name}: expected a bool array or optax.MaskedNode(), got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(jnp.shape(param)):
            raise ValueError(f"{name}: shape {tuple(mask.shape)} does not match the param's shape {tuple(jnp.shape(param))}")
        if jnp.dtype(mask.dtype) not in (jnp.dtype(bool), jnp.dtype(jnp.uint8)):
            raise ValueError(f"{name}: masks must be bool or uint8, got {jnp.dtype(mask.dtype).name}")


def apply_masks(params: Any, masks: Any) -> Any:
    """Zero the pruned entries of ``params`` (leaves with `optax.MaskedNode()` pass through).

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
    >>> apply_masks(params, {"w": jnp.array([True, False]), "b": optax.MaskedNode()})["w"].tolist()
    [1.0, 0.0]
    """
    check_masks(params, masks)
    return jax.tree.map(
        lambda mask, p: p if is_masked_node(mask) else jnp.where(mask.astype(bool), p, jnp.zeros((), p.dtype)),
        masks,
        params,
        is_leaf=is_masked_node,
    )


def mask_sparsity(masks: Any) -> dict[str, float]:
    """Fraction of zeros per masked leaf (keyed by ``/``-joined path) and ``"total"``.

    >>> import jax.numpy as jnp, optax
    >>> mask_sparsity({"w": jnp.array([True, False, False, False]), "b": optax.MaskedNode()})
    {'w': 0.75, 'total': 0.75}
    """
    from jaxcompress.rules import path_to_str

    out: dict[str, float] = {}
    pruned = total = 0
    for path, mask in jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_masked_node)[0]:
        if is_masked_node(mask):
            continue
        zeros = int(mask.size - jnp.sum(mask.astype(bool)))
        out[path_to_str(path)] = zeros / max(1, mask.size)
        pruned += zeros
        total += int(mask.size)
    out["total"] = pruned / max(1, total)
    return out
