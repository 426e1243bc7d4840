"""`prune_params`: one-shot post-training pruning of a whole params tree."""

from __future__ import annotations

from typing import Any

import jax

from jaxcompress.pruning.masktree import apply_masks
from jaxcompress.pruning.plan import plan_pruning

__all__ = ["prune_params"]


def prune_params(
    params: Any,
    rules: Any,
    grads: Any = None,
    *,
    key: jax.Array | None = None,
    step: int = 0,
    on_unused: str = "warn",
) -> tuple[Any, Any]:
    """Prune ``params`` once with ``rules``; returns ``(pruned_params, masks)``.

    Args:
      params: any pytree of arrays.
      rules: a `PruneRule`, a sequence of them (first full match wins), or a
        ``{pattern: sparsity}`` mapping (layer-wise magnitude).
      grads: gradients with the params' structure, needed by ``score="saliency"`` (SNIP).
      key: PRNG key for ``score="random"``.
      step: the step at which scheduled sparsities are evaluated.
      on_unused: ``"warn"``, ``"error"`` or ``"ignore"`` for rules that matched nothing.

    ``masks`` has the params' structure: a bool array per pruned leaf, `optax.MaskedNode()`
    elsewhere. Per-leaf decisions (what was pruned, skipped and why) come from `plan_pruning`.
    Fine-tune afterwards with ``prune(optimizer, masks=masks)`` to keep the zeros.

    >>> import jax.numpy as jnp, jaxcompress.pruning as jp
    >>> params = {"dense": {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2), "bias": jnp.ones(2)}}
    >>> pruned, masks = jp.prune_params(params, {r".*kernel": 0.75})
    >>> pruned["dense"]["kernel"].tolist()
    [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [7.0, 8.0]]
    >>> type(masks["dense"]["bias"]).__name__
    'MaskedNode'
    """
    plan = plan_pruning(params, rules, on_unused=on_unused)
    compute = jax.jit(lambda p, g, s, k: plan.masks(p, g, step=s, key=k))
    masks = compute(params, grads, step, key)
    return apply_masks(params, masks), masks
