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
    step: int | None = None,
    on_unused: str = "warn",
) -> tuple[Any, Any]:
    """Prune ``params`` once with ``rules``; returns ``(pruned_params, masks)``.

    Args:
      params: any pytree of arrays.
      rules: a `PruneRule`, a sequence of them (first full match wins), or a
        ``{pattern: sparsity}`` mapping (layer-wise magnitude).
      grads: gradients with the params' structure, needed by ``score="saliency"`` (SNIP).
      key: PRNG key for ``score="random"``.
      step: the training step at which scheduled sparsities (``sparsity=`` a schedule) are
        evaluated. Required when a rule that prunes a leaf has a schedule: `prune_params` prunes
        ONCE, and evaluating a gradual schedule at an implicit step 0 would silently prune
        nothing. Pass e.g. the schedule's end step for its final sparsity.
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
    >>> gradual = jp.PruneRule(pattern=r".*kernel", sparsity=jp.polynomial(0.75, begin_step=0, end_step=100))
    >>> int((jp.prune_params(params, gradual, step=100)[0]["dense"]["kernel"] == 0).sum())
    6
    """
    plan = plan_pruning(params, rules, on_unused=on_unused)
    scheduled = [plan.rules[r] for r, group in enumerate(plan.groups) if group and callable(plan.rules[r].sparsity)]
    if scheduled and step is None:
        raise ValueError(
            f"PruneRule(pattern={scheduled[0].pattern!r}): its sparsity is a schedule and prune_params prunes "
            "once; pass step= (the training step at which to evaluate it, e.g. the schedule's end step), "
            "or give a float sparsity"
        )
    step = 0 if step is None else step
    if scheduled:
        plan.target_sparsities(step)  # NaN / out of [0, 1) raises here, naming the rule
    compute = jax.jit(lambda p, g, s, k: plan.masks(p, g, step=s, key=k))
    masks = compute(params, grads, step, key)
    return apply_masks(params, masks), masks
