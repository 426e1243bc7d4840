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

What a step costs beyond ``inner``: three selects on the bool masks that XLA fuses into the
inner optimizer's own elementwise passes. The switch passes the masks through without a copy
on ordinary steps (only the NEW masks are used afterwards, so the output aliases the donated
input), and the mask computation needs no param-sized temporary (see `topk`): the compiled
step's temporary buffer is the inner optimizer's own. (Reading the masks packed to bits, as
the step did before session 14, cost 4.6% of the 5.3M-param MLP step on a 2-core AMX Xeon, where it had saved
2% on an AMD EPYC; the bool masks are read as they are.)

Make `prune` the outermost transformation that produces updates (wrap the whole optimizer,
e.g. ``prune(optax.chain(clip, adamw))``); a transformation chained after it would rescale the
``-param`` term. This is checked: every ``update_every`` steps the switch also verifies that the
params are zero wherever the previous update pruned them; schedules that return NaN or a
sparsity outside ``[0, 1)`` are checked at every mask update. A failed check never updates the
masks by the rules (that step keeps every weight: the masks are all True until the next mask
update that passes) and, by ``checks``:

* ``checks="state"`` (the default): the failure is recorded in the state (`PruneFaults`:
  which leaves, which kind, the first step), sticky; `prune_masks` raises it as a
  ``ValueError`` naming the leaves, and `prune_errors` lists it. The step holds no host
  callback: XLA:CPU runs a program holding one synchronously on the calling thread, which cost
  ~3-4% of the 5.3M-param MLP step (`benchmarks/prune_step.py`).
* ``checks="raise"``: also raised by the running step (`jaxcompress._checks.checked`: a
  ``JaxRuntimeError`` when the step's results are used, or a ``ValueError`` when they are passed
  to the next jitted step), naming the leaf and the rule; the host is called only when a check
  fails, but the program holds the callback.

`prune` composes with `optax.chain`, `optax.MultiSteps` and `optax.inject_hyperparams` on
either side; `prune_masks` finds the masks in any such nesting.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxcompress._checks import checked
from jaxcompress.pruning.dst import _DynamicSparsity
from jaxcompress.pruning.inner_state import zero_outside
from jaxcompress.pruning.masktree import check_masks, is_masked_node
from jaxcompress.pruning.plan import as_rules, plan_pruning
from jaxcompress.pruning.topk import count_true
from jaxcompress.rules import path_to_keystr

__all__ = ["prune", "PruneState", "PruneFaults", "prune_masks", "prune_errors"]

_KEEP, _FAILED, _BY_RULES, _BY_DST = range(4)
# With masks updated every step, how often the params are checked once the masks are frozen.
_CHECK_PERIOD = 100


class PruneFaults(NamedTuple):
    """Failed checks of a `prune` step, per pruned leaf (in flattening order of the masks), sticky:
    ``not_zero``: non-zero params at positions the previous update pruned (`prune` is not the
    outermost transformation); ``bad_sparsity``: the leaf's sparsity schedule gave NaN or a value
    outside ``[0, 1)`` at a mask update; ``first_step``: the step of the first failure (-1: none)."""

    not_zero: jax.Array
    bad_sparsity: jax.Array
    first_step: jax.Array


class PruneState(NamedTuple):
    """State of `prune`: step ``count``, the ``masks`` tree (params' shapes, `optax.MaskedNode()`
    for unpruned leaves), the PRNG ``key`` for random scores / SET, the ``inner_state``, and the
    ``faults`` its checks recorded (`PruneFaults`; read them with `prune_errors`)."""

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count (kept: the state's public layout)
    masks: Any
    key: jax.Array
    inner_state: Any
    faults: PruneFaults


def _mask_tree_map(fn, masks, *trees):
    return jax.tree.map(
        lambda mask, *leaves: leaves[0] if is_masked_node(mask) else fn(mask, *leaves),
        masks,
        *trees,
        is_leaf=is_masked_node,
    )


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


_NOT_OUTERMOST = (
    "non-zero params at pruned positions, although prune's last update set them to exactly zero. "
    "prune must be the outermost transformation: wrap the whole optimizer "
    "(prune(optax.chain(..., optax.scale(0.5)), rules)) instead of chaining after it "
    "(optax.chain(prune(...), optax.scale(0.5))), and apply its updates unchanged with optax.apply_updates"
)
_BAD_SPARSITY = (
    "its sparsity schedule returned NaN or a value outside [0, 1) at a mask-update step; a schedule must "
    "return the fraction of zeros, in [0, 1)"
)


def _fault_messages(names: list[str], not_zero: Any, bad_sparsity: Any, rules_of: list[str] | None = None) -> list[str]:
    """One message per kind of failure, naming the leaves (and, when known, their rules)."""
    out = []
    dirty = [name for name, bad in zip(names, not_zero) if bad]
    if dirty:
        out.append(f"{', '.join(dirty)}: {_NOT_OUTERMOST}")
    scheduled = [
        name + (f" ({rules_of[i]})" if rules_of and rules_of[i] else "")
        for i, (name, bad) in enumerate(zip(names, bad_sparsity))
        if bad
    ]
    if scheduled:
        out.append(f"{', '.join(scheduled)}: {_BAD_SPARSITY}")
    return out


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
    checks: str = "state",
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
      checks: ``"state"`` (default): failed checks are recorded in the state and raised by
        `prune_masks` (the step holds no host callback); ``"raise"``: also raised by the running
        step, through a host callback (see the module docstring for what it costs).

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
    if checks not in ("state", "raise"):
        raise ValueError(f"checks must be 'state' or 'raise', got {checks!r}")
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
        n_pruned = len(_pruned_names(initial))
        faults = PruneFaults(jnp.zeros((n_pruned,), bool), jnp.zeros((n_pruned,), bool), jnp.int32(-1))
        return PruneState(jnp.zeros((), jnp.int32), initial, jax.random.PRNGKey(seed), inner_state, faults)

    def recompute(plan, params, grads, state, step, key):
        # The schedules were checked before the switch (a failure selects the FAILED branch).
        new = plan.masks(params, grads if plan.needs_grads else None, step=step, key=key, check=False)
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
        due = branch_index(step)
        plan, schedule_ok, rules_of = None, all_clean, None
        if rules is not None:
            plan = plan_pruning(params, rules, on_unused="ignore")
            leaf_index = [i for i, m in enumerate(jax.tree_util.tree_leaves(state.masks, is_leaf=is_masked_node))
                          if not is_masked_node(m)]
            faults_at = plan.schedule_faults(step)
            if faults_at:
                bad = jnp.stack([faults_at.get(i, jnp.bool_(False)) for i in leaf_index])
                schedule_ok = ~(bad & (due == _BY_RULES))
            rule_at = {i: plan.rules[r] for r, group in enumerate(plan.groups) for i in group}
            rules_of = [f"PruneRule(pattern={rule_at[i].pattern!r})" if i in rule_at else "" for i in leaf_index]
        ok = jnp.all(clean) & jnp.all(schedule_ok)
        index = jnp.where(ok, due, _FAILED)
        branches = [
            lambda: state.masks,
            lambda: jax.tree.map(jnp.ones_like, state.masks),  # failed: recorded (and raised) below
        ]
        if rules is not None:
            branches.append(lambda: recompute(plan, params, updates, state, step, key))
        if dst is not None:
            branches.append(lambda: regrow(params, updates, state, step, key))
        # Only the NEW masks are used after the switch, and no branch but DST's regrowth (which
        # must) reads the old ones to write new ones: otherwise XLA copies the donated masks and
        # the switch's output on every step (it does with dst: 2 bytes per pruned weight).
        new_masks = lax.switch(index, branches)

        masked_grads = _mask_tree_map(lambda m, g: jnp.where(m, g, jnp.zeros((), g.dtype)), new_masks, updates)
        # The inner state is zeroed where the new masks prune (moments of a newly pruned weight
        # are dropped). Where a weight was pruned before, its moments are already zero (its
        # gradients were masked); with dynamic sparse training, whose regrowth reads the old
        # masks anyway, regrown weights are also reset explicitly (fresh moments whatever the
        # inner optimizer keeps at pruned positions).
        keep = new_masks
        if dst is not None:
            keep = _mask_tree_map(lambda new, old: new & old, new_masks, state.masks)
        inner_state = zero_outside(state.inner_state, keep, params)
        inner_updates, inner_state = inner.update(masked_grads, inner_state, params, **extra_args)
        final = _mask_tree_map(
            lambda m, u, p: jnp.where(m, u, -jnp.asarray(p).astype(u.dtype)), new_masks, inner_updates, params
        )
        old = state.faults
        faults = PruneFaults(
            old.not_zero | ~clean,
            old.bad_sparsity | ~schedule_ok,
            jnp.where((old.first_step < 0) & ~ok, step, old.first_step),
        )
        count = optax.safe_int32_increment(step)
        if checks == "raise":
            # The error rides on the step count (`checked`: no host call unless it fails).
            n = len(names)
            count = checked(
                count,
                jnp.concatenate([clean, schedule_ok]),
                lambda flags: "; ".join(_fault_messages(names, ~flags[:n], ~flags[n:], rules_of)),
            )
        return final, PruneState(count, new_masks, state.key, inner_state, faults)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _concrete(tree: Any) -> bool:
    """Whether every leaf of ``tree`` can be read on this host (not a tracer, not an abstract
    `jax.ShapeDtypeStruct` from `jax.eval_shape`, not an array spread over other hosts)."""
    return all(
        isinstance(x, (np.ndarray, np.generic, bool, int))
        or (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_fully_addressable)
        for x in jax.tree_util.tree_leaves(tree)
    )


def _find_prune_state(state: Any) -> PruneState:
    found = [
        node
        for node in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, PruneState))
        if isinstance(node, PruneState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected exactly one PruneState in the optimizer state, found {len(found)}")
    return found[0]


def prune_errors(state: Any) -> list[str]:
    """What the checks of the (single) `prune` state inside ``state`` recorded (see `PruneFaults`):
    one message per kind of failure, naming the leaves and the first failing step; ``[]`` when
    every check passed. Reads the state on the host: call it outside ``jit``.

    >>> import jax, jax.numpy as jnp, optax, jaxcompress.pruning as jp
    >>> opt = optax.chain(jp.prune(optax.sgd(0.1), {"w": 0.5}, update_every=2), optax.scale(0.5))
    >>> params = {"w": jnp.arange(1.0, 9.0)}
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...     updates, state = opt.update({"w": jnp.ones(8)}, state, params)
    ...     params = optax.apply_updates(params, updates)
    >>> print(jp.prune_errors(state)[0][:60])
    params['w']: non-zero params at pruned positions, although p
    """
    found = _find_prune_state(state)
    faults = found.faults
    if not _concrete(faults):
        raise TypeError(
            "prune_errors reads the optimizer state on the host: call it outside jit, on a state with values "
            "(not one from jax.eval_shape, not one spread over other hosts)"
        )
    names = _pruned_names(found.masks)
    not_zero, bad_sparsity = np.asarray(faults.not_zero), np.asarray(faults.bad_sparsity)
    if not_zero.shape != (len(names),) or bad_sparsity.shape != (len(names),):
        raise ValueError(
            f"PruneState.faults has flags of shapes {not_zero.shape} / {bad_sparsity.shape}, expected "
            f"({len(names)},): one per pruned leaf of the masks"
        )
    messages = _fault_messages(names, not_zero, bad_sparsity)
    first = int(np.asarray(faults.first_step))
    return [f"{m} (first failed at step {first})" for m in messages]


def prune_masks(state: Any, *, check: bool = True) -> Any:
    """The masks of the (single) `prune` state inside an optimizer state, however nested
    (`optax.chain`, `optax.inject_hyperparams`, `optax.MultiSteps`, `qat`): a tree with the
    params' structure, a bool array per pruned leaf and `optax.MaskedNode()` elsewhere (what
    `apply_masks` and `mask_sparsity` take).

    With ``check`` (the default) and a concrete state, a failure its checks recorded
    (`prune_errors`) raises a ``ValueError`` here, so masks of a run that went wrong are not
    used unknowingly; ``check=False`` returns them anyway. Nothing is checked under ``jit``, on
    an abstract state (`jax.eval_shape`) or on one spread over other hosts.

    >>> import jax.numpy as jnp, optax, jaxcompress.pruning as jp
    >>> opt = optax.MultiSteps(jp.prune(optax.sgd(0.1), {"w": 0.5}), every_k_schedule=2)
    >>> jp.prune_masks(opt.init({"w": jnp.ones(4)}))["w"].tolist()
    [True, True, True, True]
    """
    found = _find_prune_state(state)
    if check and _concrete(found.faults):
        errors = prune_errors(found)
        if errors:
            raise ValueError("; ".join(errors) + " (prune_masks(state, check=False) returns the masks anyway)")
    return found.masks
