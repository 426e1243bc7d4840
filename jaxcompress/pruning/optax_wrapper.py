"""`prune(inner, rules)`: pruning as ONE `optax.GradientTransformation`.

Per step, inside the user's jitted ``update``:

1. on mask-update steps (``start_step``, then every ``update_every`` steps up to ``end_step``)
   the masks are recomputed under `lax.cond` (so one compilation serves the whole run): by the
   rules at the first update step, and by the rules again (gradual pruning) or by drop/regrow
   (``dst=SET(...)`` / ``RigL(...)``) afterwards. The inner state's param-shaped leaves (found
   structurally, see `inner_state`) are zeroed wherever a weight is pruned or regrown;
2. the gradients are masked and handed to ``inner``, so its moments stay zero at pruned positions;
3. the returned update is the inner update where the mask is True and ``-param`` where it is
   False: after `optax.apply_updates` the params are EXACTLY zero there (``p + (-p) == 0``).

Make `prune` the outermost transformation that produces updates (wrap the whole optimizer,
e.g. ``prune(optax.chain(clip, adamw))``); a transformation chained after it would rescale the
``-param`` term. It composes with `optax.MultiSteps` and `optax.inject_hyperparams` on either side.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxcompress.pruning.dst import _DynamicSparsity
from jaxcompress.pruning.inner_state import zero_outside
from jaxcompress.pruning.masktree import check_masks, is_masked_node
from jaxcompress.pruning.plan import as_rules, plan_pruning

__all__ = ["prune", "PruneState"]


class PruneState(NamedTuple):
    """State of `prune`: step ``count``, the ``masks`` tree (params' shapes, `optax.MaskedNode()`
    for unpruned leaves), the PRNG ``key`` for random scores / SET, and the ``inner_state``."""

    count: jax.Array
    masks: Any
    key: jax.Array
    inner_state: Any


def _mask_tree_map(fn, masks, *trees):
    return jax.tree.map(
        lambda mask, *leaves: leaves[0] if is_masked_node(mask) else fn(mask, *leaves),
        masks,
        *trees,
        is_leaf=is_masked_node,
    )


def prune(
    inner: optax.GradientTransformation,
    rules: Any = None,
    *,
    masks: Any = None,
    update_every: int = 100,
    start_step: int = 0,
    end_step: int | None = None,
    dst: _DynamicSparsity | None = None,
    seed: int = 0,
    on_unused: str = "warn",
) -> optax.GradientTransformation:
    """Wrap ``inner`` so that training keeps the params pruned as ``rules`` say.

    Args:
      inner: the optimizer (any `optax.GradientTransformation`).
      rules: `PruneRule`s (or a ``{pattern: sparsity}`` mapping) deciding the masks. ``None``
        with ``masks`` given: keep those fixed masks (fine-tuning after `prune_params`).
      masks: initial masks (a mask tree as `prune_params` returns). Default: all kept until the
        first mask update.
      update_every: steps between mask updates (use your schedule's frequency).
      start_step / end_step: the first / last step at which masks may change (``end_step=None``:
        no end). Masks are also frozen after ``dst.end_step`` for dynamic sparse training.
      dst: `SET` or `RigL` for dynamic sparse training; the rules then give the initial masks at
        ``start_step`` and must have a constant sparsity.
      seed: seeds random scores and SET regrowth.
      on_unused: ``"warn"``, ``"error"`` or ``"ignore"`` for rules that match no param.

    >>> import jax, jax.numpy as jnp, optax, jaxcompress.pruning as jp
    >>> params = {"w": jnp.arange(1.0, 9.0), "b": jnp.zeros(2)}
    >>> opt = jp.prune(optax.adam(1e-2), [jp.PruneRule(pattern="w", sparsity=0.5)])
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(opt.update)(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"].tolist()[:4], state.masks["w"].tolist()[4:]
    ([0.0, 0.0, 0.0, 0.0], [True, True, True, True])
    """
    if rules is None and masks is None:
        raise ValueError("prune needs rules, masks, or both")
    if rules is not None:
        rules = as_rules(rules)
    if not isinstance(update_every, int) and not hasattr(update_every, "dtype"):
        raise TypeError(f"update_every must be an int, got {update_every!r}")
    if isinstance(update_every, int) and update_every < 1:
        raise ValueError(f"update_every must be >= 1, got {update_every}")
    if dst is not None:
        if rules is None:
            raise ValueError("dynamic sparse training needs rules for the initial masks")
        for rule in rules:
            if not rule.skip and (callable(rule.sparsity) or rule.structure != "unstructured"):
                raise ValueError(
                    f"PruneRule(pattern={rule.pattern!r}): dynamic sparse training needs an unstructured "
                    "rule with a constant (float) sparsity"
                )

    def plan_for(params):
        return plan_pruning(params, rules, on_unused="ignore")

    def init_fn(params):
        if rules is not None:
            plan = plan_pruning(params, rules, on_unused=on_unused)
            for rule_index, group in enumerate(plan.groups):
                rule = plan.rules[rule_index]
                if group and callable(rule.sparsity):
                    value = float(rule.sparsity_at(start_step))
                    if not 0.0 <= value < 1.0:
                        raise ValueError(
                            f"PruneRule(pattern={rule.pattern!r}): schedule gives sparsity {value} at step "
                            f"{start_step}; it must be in [0, 1)"
                        )
            initial = plan.dense_masks(params)
        else:
            initial = None
        if masks is not None:
            check_masks(params, masks)
            given = jax.tree.map(
                lambda m: m if is_masked_node(m) else jnp.asarray(m).astype(bool), masks, is_leaf=is_masked_node
            )
            if initial is not None:
                # Leaves the rules prune start from the given masks; others keep whatever was given.
                given = jax.tree.map(
                    lambda g, r: r if is_masked_node(g) else g, given, initial, is_leaf=is_masked_node
                )
            initial = given
        inner_state = inner.init(params)
        if masks is not None:
            inner_state = zero_outside(inner_state, initial, params)
        return PruneState(jnp.zeros((), jnp.int32), initial, jax.random.PRNGKey(seed), inner_state)

    def recompute(params, grads, state, step, key):
        plan = plan_for(params)
        new = plan.masks(params, grads if plan.needs_grads else None, step=step, key=key)
        # Keep the given masks' sentinels where the rules prune nothing.
        return jax.tree.map(
            lambda old, fresh: old if is_masked_node(fresh) else fresh, state.masks, new, is_leaf=is_masked_node
        )

    def regrow(params, grads, state, step, key):
        flat_masks, treedef = jax.tree.flatten(state.masks, is_leaf=is_masked_node)
        flat_params, flat_grads = treedef.flatten_up_to(params), treedef.flatten_up_to(grads)
        where = [i for i, m in enumerate(flat_masks) if not is_masked_node(m)]
        new = dst.update_many(
            [flat_masks[i] for i in where],
            [flat_params[i] for i in where],
            [flat_grads[i] for i in where],
            [jax.random.fold_in(key, i) for i in where],
            step,
        )
        for i, mask in zip(where, new):
            flat_masks[i] = mask
        return jax.tree.unflatten(treedef, flat_masks)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("prune needs params: call update(updates, state, params)")
        step = state.count
        key = jax.random.fold_in(state.key, step)
        if rules is not None:
            due = (step >= start_step) & ((step - start_step) % update_every == 0)
            if end_step is not None:
                due &= step <= end_step
            if dst is not None:
                branch = jnp.where(due, jnp.where(step == start_step, 1, 2), 0)
                branch = jnp.where((branch == 2) & (step >= dst.end_step), 0, branch)
            else:
                branch = due.astype(jnp.int32)

            def keep(_):
                return state.masks

            def by_rules(_):
                return recompute(params, updates, state, step, key)

            def by_dst(_):
                return regrow(params, updates, state, step, key)

            branches = [keep, by_rules] + ([by_dst] if dst is not None else [])
            # Only the masks go through the switch: passing the (large) inner state through it
            # too costs copies on every step. The reset below is elementwise and fuses into the
            # inner optimizer's own update of its moments.
            new_masks = lax.switch(branch, branches, None)
            survivors = _mask_tree_map(lambda old, new: old & new, state.masks, new_masks)
            inner_state = zero_outside(state.inner_state, survivors, params)
        else:
            new_masks, inner_state = state.masks, state.inner_state

        masked_grads = _mask_tree_map(lambda m, g: jnp.where(m, g, jnp.zeros((), g.dtype)), new_masks, updates)
        inner_updates, inner_state = inner.update(masked_grads, inner_state, params)
        final = _mask_tree_map(
            lambda m, u, p: jnp.where(m, u, -jnp.asarray(p).astype(u.dtype)), new_masks, inner_updates, params
        )
        return final, PruneState(optax.safe_int32_increment(step), new_masks, state.key, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
