"""`qat(inner, rules)`: quantization-aware training state as an `optax.GradientTransformation`.

The forward pass fake-quantizes the weights with the clip ranges this wrapper keeps:

    opt = jc.qat(optax.adamw(1e-3), rules, freeze_step=2_000)
    state = opt.init(params)

    def loss_fn(params, ranges, batch):
        logits = model.apply(jc.fake_quant(params, rules, ranges=ranges), batch["x"])
        ...

    grads = jax.grad(loss_fn)(params, jc.qat_ranges(state), batch)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)

What the wrapper keeps and does per step (inside the user's jitted update, one compilation):

* ``ranges``: each quantized leaf's clip range ``(lo, hi)`` in the QArray scale layout, computed
  from the params the update produces (so the next forward pass sees the ranges of its own
  weights), optionally smoothed by an exponential moving average (``ema_decay``), and FROZEN from
  ``freeze_step`` on (range freezing lets the weights settle onto a fixed grid before
  conversion). The recomputation is skipped under `lax.cond` once frozen.
* the updates of ``inner`` pass through unchanged, so `qat` composes with `prune`: with
  ``qat(prune(adamw, prune_rules, end_step=qat_start), quant_rules)`` pruned weights stay exactly
  zero (fake quantization maps 0 to 0 exactly, symmetric or asymmetric), masks are frozen when
  QAT starts, and conversion keeps those zeros in the integer values.

Conversion: ``jc.quantize_params(params, rules, ranges=jc.qat_ranges(state))`` quantizes with the
same ranges, so the integer model computes what the fake-quantized forward pass computed
(``dequantize_params(qparams) == fake_quant(params, rules, ranges=...)`` exactly).

LSQ's learned steps are trainable parameters, not optimizer statistics: train them alongside the
params (e.g. ``{"params": params, "steps": jc.init_lsq_steps(params, rules)}``) and pass them to
`fake_quant` as ``steps``.

W8A8 QAT: rules with ``activation="static"`` (or ``"dynamic"``) also fake-quantize the activations
their weights meet (`fake_quant_activations`). The wrapper keeps each static leaf's activation
range (``max|x|``, tracked by an exponential moving average with ``activation_ema_decay`` and
frozen with the weight ranges at ``freeze_step``) from the ``observed`` statistics the wrapped
forward returns, passed to the update as an extra argument:

    apply = jc.fake_quant_activations(model.apply, rules)

    def loss_fn(params, ranges, activation_ranges, batch):
        logits, observed = apply(jc.fake_quant(params, rules, ranges=ranges), batch["x"],
                                 ranges=activation_ranges)
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return xent, observed

    (value, observed), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, jc.qat_ranges(state), jc.qat_activation_ranges(state), batch)
    updates, state = opt.update(grads, state, params, activation_stats=observed)

`convert_qat(params, rules, state)` then gives the integer params (weights quantized with the
tracked ranges, static activation scales attached) whose `compressed` forward computes what the
fake-quantized forward computed.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxcompress.training.activations import activation_modes, static_scale
from jaxcompress.training.fake_quantize import _quant_rules, weight_ranges
from jaxcompress.rules import QuantRule, path_to_str

__all__ = ["qat", "QATState", "ClipRanges", "qat_ranges", "qat_activation_ranges", "convert_qat"]


class ClipRanges(NamedTuple):
    """The tracked weight clip ranges: two trees with the params' structure, ``lo`` and ``hi``
    (each leaf in the QArray scale layout), `optax.MaskedNode()` for leaves not quantized."""

    lo: Any
    hi: Any


class QATState(NamedTuple):
    """State of `qat`: step ``count``, the tracked weight clip ``ranges`` (`ClipRanges`), the
    ``inner_state`` and the tracked ``activation_ranges`` (a tree with the params' structure: a
    scalar ``max|x|``, 0 until first observed, per leaf with static activation quantization,
    `optax.MaskedNode()` elsewhere). Per-leaf state is params-structured, as optax's own (so
    `optax.tree_map_params`, sharding rules and checkpoints see it leaf by leaf); read it with
    `qat_ranges` / `qat_activation_ranges`, which return what `fake_quant`, `quantize_params`
    and `fake_quant_activations` take."""

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count (kept: the state's public layout)
    ranges: ClipRanges
    inner_state: Any
    activation_ranges: Any


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _tree_from_paths(params: Any, by_path: dict[str, Any]) -> Any:
    """A tree with the params' structure: ``by_path[path]`` at each leaf listed, MaskedNode elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: by_path.get(path_to_str(path), optax.MaskedNode()), params, is_leaf=_is_masked
    )


def _paths_from_tree(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)[0]
    return {path_to_str(path): leaf for path, leaf in flat if not _is_masked(leaf)}


def _range_trees(params: Any, ranges: dict[str, tuple[jax.Array, jax.Array]]) -> ClipRanges:
    return ClipRanges(
        _tree_from_paths(params, {path: lo for path, (lo, _) in ranges.items()}),
        _tree_from_paths(params, {path: hi for path, (_, hi) in ranges.items()}),
    )


def qat(
    inner: optax.GradientTransformation,
    rules: Sequence[QuantRule] | QuantRule,
    *,
    freeze_step: int | None = None,
    ema_decay: float = 0.0,
    activation_ema_decay: float = 0.9,
    on_unused: str = "warn",
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` so its state tracks (then freezes) the weights' quantization ranges.

    Args:
      inner: the optimizer (any `optax.GradientTransformation`, e.g. ``prune(adamw, ...)``).
      rules: the `QuantRule`s the forward pass uses with `fake_quant`.
      freeze_step: from this update step on, the ranges no longer change (``None``: never).
      ema_decay: ``ranges = decay * old + (1 - decay) * new`` (0: follow the weights exactly).
      activation_ema_decay: the same for the activation ranges of static-activation leaves,
        updated from the ``activation_stats={path: max|x|}`` extra argument of ``update`` (the
        ``observed`` output of `fake_quant_activations`); the first observation is taken as is.
      on_unused: ``"warn"``, ``"error"`` or ``"ignore"`` for rules that match no param.

    >>> import jax, jax.numpy as jnp, optax, jaxcompress as jc
    >>> rules = [jc.QuantRule(pattern="w", bits=4, channel_axes=(-1,))]
    >>> params = {"w": jnp.array([[0.5, -1.0], [1.5, 0.25]])}
    >>> opt = jc.qat(optax.sgd(0.1), rules, freeze_step=1)
    >>> state = opt.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(jc.fake_quant(p, rules, ranges=jc.qat_ranges(state))["w"] ** 2))(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> lo, hi = jc.qat_ranges(state)["w"]  # int4 defaults to asymmetric: each channel's min and max
    >>> [round(float(v), 4) for v in lo[0]], [round(float(v), 4) for v in hi[0]]
    ([0.4, -0.8], [1.2, 0.2])
    """
    rules = _quant_rules(rules)
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if not 0.0 <= activation_ema_decay < 1.0:
        raise ValueError(f"activation_ema_decay must be in [0, 1), got {activation_ema_decay}")
    if freeze_step is not None and (not isinstance(freeze_step, int) or freeze_step < 0):
        raise ValueError(f"freeze_step must be a non-negative int or None, got {freeze_step!r}")

    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        # A params tree without leaves is `optax.tree_map_params`' placeholder: no warning.
        has_leaves = bool(jax.tree_util.tree_leaves(params, is_leaf=_is_masked))
        ranges = weight_ranges(params, rules, on_unused=on_unused if has_leaves else "ignore")
        static = [path for path, mode in activation_modes(params, rules, on_unused="ignore").items() if mode == "static"]
        activation_ranges = _tree_from_paths(params, {path: jnp.zeros((), jnp.float32) for path in static})
        return QATState(jnp.zeros((), jnp.int32), _range_trees(params, ranges), inner.init(params), activation_ranges)

    def track_activations(state, activation_stats, params):
        if activation_stats is None:
            return state.activation_ranges
        if not isinstance(activation_stats, dict):
            raise TypeError(
                f"activation_stats must be the {{path: max|x|}} dict that fake_quant_activations observes, "
                f"got {type(activation_stats).__name__}"
            )
        known = activation_modes(params, rules, on_unused="ignore")
        unknown = sorted(set(activation_stats) - set(known))
        if unknown:
            raise ValueError(
                f"activation_stats has paths no rule quantizes the activation of: {unknown} (expected keys "
                f"among {sorted(known)}, the paths of the tree given to opt.init, as fake_quant_activations returns them)"
            )
        for path, value in activation_stats.items():
            if jnp.size(value) != 1:
                raise ValueError(
                    f"activation_stats[{path!r}]: expected the scalar max|x| fake_quant_activations observes, "
                    f"got shape {tuple(jnp.shape(value))}"
                )

        # Statistics of dynamic-activation leaves (observed for monitoring) are not tracked.
        def one(path, old):
            value = None if _is_masked(old) else activation_stats.get(path_to_str(path))
            if value is None:
                return old
            value = jnp.asarray(value, jnp.float32).reshape(())
            averaged = activation_ema_decay * old + (1.0 - activation_ema_decay) * value
            return jnp.where(old > 0, averaged, value)

        return jax.tree_util.tree_map_with_path(one, state.activation_ranges, is_leaf=_is_masked)

    def update_fn(updates, state, params=None, *, activation_stats=None, **extra_args):
        if params is None:
            raise ValueError("qat needs params: call update(updates, state, params)")
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)

        def track(_):
            new_params = optax.apply_updates(params, new_updates)
            fresh = _range_trees(new_params, weight_ranges(new_params, rules, on_unused="ignore"))
            if ema_decay != 0.0:
                fresh = jax.tree.map(lambda old, new: ema_decay * old + (1.0 - ema_decay) * new, state.ranges, fresh)
            return fresh, track_activations(state, activation_stats, params)

        def keep(_):
            return state.ranges, state.activation_ranges

        if freeze_step is None:
            ranges, activation_ranges = track(None)
        else:
            ranges, activation_ranges = lax.cond(state.count < freeze_step, track, keep, None)
        count = optax.safe_increment(state.count)
        return new_updates, QATState(count, ranges, inner_state, activation_ranges)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _qat_state(state: Any) -> QATState:
    found = [
        node
        for node in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, QATState))
        if isinstance(node, QATState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected exactly one QATState in the optimizer state, found {len(found)}")
    return found[0]


def qat_ranges(state: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The clip ranges ``{path: (lo, hi)}`` of the (single) `QATState` inside an optimizer state,
    however nested (``optax.chain``, ``inject_hyperparams``, ``MultiSteps``, `prune` ...): what
    `fake_quant` and `quantize_params` take as ``ranges``. Works inside ``jit``.

    >>> import jax.numpy as jnp, optax, jaxcompress as jc
    >>> opt = optax.MultiSteps(jc.qat(optax.sgd(0.1), [jc.QuantRule(pattern="w")]), every_k_schedule=2)
    >>> lo, hi = jc.qat_ranges(opt.init({"w": jnp.array([1.0, -3.0]), "b": jnp.ones(1)}))["w"]
    >>> hi.tolist()
    [3.0]
    """
    ranges = _qat_state(state).ranges
    lows, highs = _paths_from_tree(ranges.lo), _paths_from_tree(ranges.hi)
    return {path: (lows[path], highs[path]) for path in lows}


def qat_activation_ranges(state: Any) -> dict[str, jax.Array]:
    """The tracked activation ranges ``{path: max|x|}`` of the (single) `QATState` inside an
    optimizer state (pass them to the `fake_quant_activations` forward as ``ranges``)."""
    return _paths_from_tree(_qat_state(state).activation_ranges)


def convert_qat(
    params: Any,
    rules: Sequence[QuantRule] | QuantRule,
    state: Any = None,
    *,
    activation_ranges: dict[str, jax.Array] | None = None,
    activation_steps: dict[str, jax.Array] | None = None,
) -> Any:
    """The integer params of a QAT-trained model: what `compressed` runs.

    Weights are quantized with the `qat` state's tracked ranges (calibrated on the weights if
    ``state`` is None); each static-activation leaf gets the activation scale its fake-quantized
    forward used: ``range / 127`` of the tracked ``activation_ranges`` (default: the state's), or
    the learned LSQ ``activation_steps``.

    >>> import jax, jax.numpy as jnp, optax, jaxcompress as jc
    >>> rules = [jc.QuantRule(pattern="w", channel_axes=(-1,), activation="static")]
    >>> params = {"w": jnp.array([[0.5, -1.0], [1.5, 0.25]])}
    >>> opt = jc.qat(optax.sgd(0.1), rules)
    >>> state = opt.init(params)
    >>> _, state = opt.update(jax.tree.map(jnp.zeros_like, params), state, params,
    ...                       activation_stats={"w": jnp.float32(2.54)})
    >>> qparams = jc.convert_qat(params, rules, state)
    >>> qparams["w"].activation, round(float(qparams["w"].activation_scale), 4)
    ('static', 0.02)
    """
    from jaxcompress.execute.calibration import attach_activation_scales
    from jaxcompress.params import quantize_params
    from jaxcompress.qarray import QArray

    if activation_ranges is not None and activation_steps is not None:
        raise TypeError("pass activation ranges or LSQ activation steps, not both")
    qat_state = _qat_state(state) if state is not None else None
    if activation_ranges is None and activation_steps is None and qat_state is not None:
        activation_ranges = qat_activation_ranges(state)
    ranges = qat_ranges(state) if qat_state is not None else None
    qparams, _ = quantize_params(params, rules, ranges=ranges, on_unused="ignore")
    if activation_ranges is None and activation_steps is None:
        return qparams
    for what, given in (("activation_ranges", activation_ranges), ("activation_steps", activation_steps)):
        for path, value in (given or {}).items():
            if jnp.size(value) != 1:
                raise ValueError(f"convert_qat: {what}[{path!r}]: expected a scalar per weight, got shape {tuple(jnp.shape(value))}")
    if activation_steps is not None:
        scales_by_path = {path: jnp.asarray(step, jnp.float32) for path, step in activation_steps.items()}
    else:
        scales_by_path = {path: static_scale(value) for path, value in (activation_ranges or {}).items()}

    if activation_ranges is not None:
        missing = sorted(path for path, value in activation_ranges.items() if not float(value) > 0)
        if missing:
            raise ValueError(f"no activation range observed yet for {missing}: pass activation_stats to the qat update")
    scales = jax.tree_util.tree_map_with_path(
        lambda path, leaf: scales_by_path.get(path_to_str(path)), qparams, is_leaf=lambda x: isinstance(x, QArray)
    )
    return attach_activation_scales(qparams, scales)
