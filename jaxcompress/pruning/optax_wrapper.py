"""`prune(inner, rules)`: pruning as ONE `optax.GradientTransformationExtraArgs`.

Per step, inside the user's jitted ``update``:

1. on mask-update steps (``start_step``, then every ``update_every`` steps up to ``end_step``)
   the masks are recomputed under `lax.switch` (so one compilation serves the whole run): by the
   rules at the first update step, and by the rules again (gradual pruning) or by drop/regrow
   (``dst=SET(...)`` / ``RigL(...)``) afterwards;
2. the param-shaped leaves of the inner state (found structurally, see `inner_state`) are
   zeroed where the new mask is False (and, with ``dst``, where a weight regrows), then the
   masked gradients are handed to ``inner`` (extra keyword arguments of ``update``, e.g.
   ``value=`` for `optax.contrib.reduce_on_plateau`, are passed on), so its moments stay zero
   at pruned positions and never carry over to a pruned or regrown weight;
3. the returned update is the inner update where the mask is True and ``-param`` where it is
   False: after `optax.apply_updates` the params are EXACTLY zero there (``p + (-p) == 0``).

What a step costs beyond ``inner``: three selects that XLA fuses into the inner optimizer's own
elementwise passes, reading the masks as bits (`bitmask.bit_view`: one read of the bool masks
per step, packed to 1/8 of their bytes for the three uses; with ``dst`` the regrowth step's
``new & old`` is packed once more). The switch passes the masks through
without a copy on ordinary steps (only the NEW masks are used afterwards, so the output aliases
the donated input), and the mask computation needs no param-sized temporary (see `topk`): the
compiled step's temporary buffer is the inner optimizer's own.

Make `prune` the outermost transformation that produces updates (wrap the whole optimizer,
e.g. ``prune(optax.chain(clip, adamw))``); a transformation chained after it would rescale the
``-param`` term. This is checked: every ``update_every`` steps the switch also verifies that the
params are zero wherever the previous update pruned them, and raises naming the leaf
(``ValueError`` eagerly; under ``jit`` the same message when the step's results are used: a
``JaxRuntimeError``, or a ``ValueError`` when they are passed to the next jitted step). The checks
call the host only when they fail (`jaxcompress._checks.checked`): the step holds no effect, so
``jit`` dispatches it on its C++ fast path (XLA:CPU still runs a program holding a host callback
synchronously: about 3% of the 5.3M-param MLP step on a 2-core Xeon). Schedules that
return NaN or a sparsity outside ``[0, 1)`` raise the same way, naming the rule. `prune`
composes with `optax.chain`, `optax.MultiSteps` and `optax.inject_hyperparams` on either side;
`prune_masks` finds the masks in any such nesting.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxcompress._checks import checked
from jaxcompress.pruning.bitmask import bit_view
from jaxcompress.pruning.dst import _DynamicSparsity
from jaxcompress.pruning.inner_state import zero_outside
from jaxcompress.pruning.masktree import check_masks, is_masked_node
from jaxcompress.pruning.plan import as_rules, plan_pruning
from jaxcompress.pruning.topk import count_true
from jaxcompress.rules import path_to_keystr

__all__ = ["prune", "PruneState", "prune_masks"]

_KEEP, _FAILED, _BY_RULES, _BY_DST = range(4)
# With masks updated every step, how often the params are checked once the masks are frozen.
_CHECK_PERIOD = 100


class PruneState(NamedTuple):
    """State of `prune`: step ``count``, the ``masks`` tree (params' shapes, `optax.MaskedNode()`
    for unpruned leaves), the PRNG ``key`` for random scores / SET, and the ``inner_state``."""

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count (kept: the state's public layout)
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


def _bit_views(masks: Any) -> Any:
    return jax.tree.map(lambda m: m if is_masked_node(m) else bit_view(m), masks, is_leaf=is_masked_node)


def _pruned_names(masks: Any) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_masked_node)[0]
    return [path_to_keystr(path) for path, mask in flat if not is_masked_node(mask)]


def _zero_where_pruned(params: Any, masks: Any) -> jax.Array:
    """Per pruned leaf (in flattening order), whether its params are zero wherever ``masks``
    prune them (a bool vector; scalars reduced over the leaf)."""
    flat_masks = jax.tree_util.tree_leaves(masks, is_leaf=is_masked_node)
    structure: Any = jax.tree_util.tree_structure(masks, is_leaf=is_masked_node)
    flat_params = structure.flatten_up_to(params)
    flags = [
        count_true(~mask & (jnp.asarray(param) != 0)) == 0
        for mask, param in zip(flat_masks, flat_params)
        if not is_masked_node(mask)
    ]
    return jnp.stack(flags) if flags else jnp.ones((0,), bool)


def _not_outermost_message(names: list[str]) -> Any:
    def message(flags: Any) -> str:
        dirty = [name for name, ok in zip(names, flags) if not ok]
        return (
            f"{', '.join(dirty)}: non-zero params at pruned positions, although prune's last update set them "
            "to exactly zero. prune must be the outermost transformation: wrap the whole optimizer "
            "(prune(optax.chain(..., optax.scale(0.5)), rules)) instead of chaining after it "
            "(optax.chain(prune(...), optax.scale(0.5))), and apply its updates unchanged with "
            "optax.apply_updates"
        )

    return message


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
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` so that training keeps the params pruned as ``rules`` say.

    Args:
      inner: the optimizer (any `optax.GradientTransformation`; extra ``update`` arguments
        are forwarded to it).
      rules: `PruneRule`s (or a ``{pattern: sparsity}`` mapping) deciding the masks. ``None``
        with ``masks`` given: keep those fixed masks (fine-tuning after `prune_params`).
      masks: initial masks (a mask tree as `prune_params` returns). Default: all kept until the
        first mask update.
      update_every: steps between mask updates (use your schedule's frequency); also how often
        the params are checked to be zero where pruned.
      start_step / end_step: the first / last step at which masks may change (``end_step=None``:
        no end). Masks are also frozen after ``dst.end_step`` for dynamic sparse training.
      dst: `SET` or `RigL` for dynamic sparse training; the rules then give the initial masks at
        ``start_step`` and must have a constant sparsity.
      seed: seeds random scores and SET regrowth.
      on_unused: ``"warn"``, ``"error"`` or ``"ignore"`` for rules that match no param.

    ``init`` works under `jax.eval_shape` (an abstract target for checkpoint restore).

    >>> import jax, jax.numpy as jnp, optax, jaxcompress.pruning as jp
    >>> params = {"w": jnp.arange(1.0, 9.0), "b": jnp.zeros(2)}
    >>> opt = jp.prune(optax.adam(1e-2), [jp.PruneRule(pattern="w", sparsity=0.5)])
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(opt.update)(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"].tolist()[:4], jp.prune_masks(state)["w"].tolist()[4:]
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
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        if rules is not None:
            # A params tree without leaves is `optax.tree_map_params`' placeholder: no warning.
            has_leaves = bool(jax.tree_util.tree_leaves(params, is_leaf=is_masked_node))
            plan = plan_pruning(params, rules, on_unused=on_unused if has_leaves else "ignore")
            plan.target_sparsities(start_step)  # a schedule out of [0, 1) at start_step raises now
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
        plan = plan_pruning(params, rules, on_unused="ignore")
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

    def is_check_step(step):
        # Every `update_every` steps, one step after a mask update (when the masks have not just
        # changed), the params are checked to be zero where they are pruned.
        period = jnp.where(jnp.asarray(update_every) >= 2, update_every, _CHECK_PERIOD)
        return step % period == 1

    def branch_index(step):
        if rules is None:
            return jnp.int32(_KEEP)
        due = (step >= start_step) & ((step - start_step) % update_every == 0)
        if end_step is not None:
            due &= step <= end_step
        by = _BY_RULES
        if dst is not None:
            by = jnp.where(step == start_step, _BY_RULES, jnp.where(step < dst.end_step, _BY_DST, _KEEP))
        return jnp.where(due, by, _KEEP)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("prune needs params: call update(updates, state, params)")
        step = state.count
        key = jax.random.fold_in(state.key, step)
        names = _pruned_names(state.masks)
        all_clean = jnp.ones((len(names),), bool)

        # Reads the params and the old masks, so it must come before anything that overwrites
        # them in place: the switch below depends on its result (a failed check selects a branch
        # of its own), so XLA orders it first instead of copying the donated buffers every step.
        clean = lax.cond(is_check_step(step), lambda: _zero_where_pruned(params, state.masks), lambda: all_clean)
        index = jnp.where(jnp.all(clean), branch_index(step), _FAILED)
        branches = [
            lambda: state.masks,
            lambda: jax.tree.map(jnp.ones_like, state.masks),  # failed: the error is raised below
        ]
        if rules is not None:
            branches.append(lambda: recompute(params, updates, state, step, key))
        if dst is not None:
            branches.append(lambda: regrow(params, updates, state, step, key))
        # Only the NEW masks are used after the switch, and no branch but DST's regrowth (which
        # must) reads the old ones to write new ones: otherwise XLA copies the donated masks and
        # the switch's output on every step (it does with dst: 2 bytes per pruned weight).
        new_masks = lax.switch(index, branches)

        # Each mask is used three times below, in three elementwise passes that XLA fuses with
        # the inner optimizer's own: read as bits there (`bit_view`), one byte per weight is
        # read once per step instead of three times.
        bits = _bit_views(new_masks)
        masked_grads = _mask_tree_map(lambda m, g: jnp.where(m, g, jnp.zeros((), g.dtype)), bits, updates)
        # The inner state is zeroed where the new masks prune (moments of a newly pruned weight
        # are dropped). Where a weight was pruned before, its moments are already zero (its
        # gradients were masked); with dynamic sparse training, whose regrowth reads the old
        # masks anyway, regrown weights are also reset explicitly (fresh moments whatever the
        # inner optimizer keeps at pruned positions).
        keep = bits
        if dst is not None:
            keep = _bit_views(_mask_tree_map(lambda new, old: new & old, new_masks, state.masks))
        inner_state = zero_outside(state.inner_state, keep, params)
        inner_updates, inner_state = inner.update(masked_grads, inner_state, params, **extra_args)
        final = _mask_tree_map(
            lambda m, u, p: jnp.where(m, u, -jnp.asarray(p).astype(u.dtype)), bits, inner_updates, params
        )
        # The check's error rides on the step count (`checked`: no host callback unless it fails).
        count = checked(optax.safe_int32_increment(step), clean, _not_outermost_message(names))
        return final, PruneState(count, new_masks, state.key, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def prune_masks(state: Any) -> Any:
    """The masks of the (single) `prune` state inside an optimizer state, however nested
    (`optax.chain`, `optax.inject_hyperparams`, `optax.MultiSteps`, `qat`): a tree with the
    params' structure, a bool array per pruned leaf and `optax.MaskedNode()` elsewhere (what
    `apply_masks` and `mask_sparsity` take).

    >>> import jax.numpy as jnp, optax, jaxcompress.pruning as jp
    >>> opt = optax.MultiSteps(jp.prune(optax.sgd(0.1), {"w": 0.5}), every_k_schedule=2)
    >>> jp.prune_masks(opt.init({"w": jnp.ones(4)}))["w"].tolist()
    [True, True, True, True]
    """
    found = [
        node
        for node in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, PruneState))
        if isinstance(node, PruneState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected exactly one PruneState in the optimizer state, found {len(found)}")
    return found[0].masks
