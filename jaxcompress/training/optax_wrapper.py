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
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxcompress.training.fake_quantize import _quant_rules, weight_ranges
from jaxcompress.rules import QuantRule

__all__ = ["qat", "QATState", "qat_ranges"]


class QATState(NamedTuple):
    """State of `qat`: step ``count``, the tracked clip ``ranges`` ({path: (lo, hi)}) and the
    ``inner_state``."""

    count: jax.Array
    ranges: dict[str, tuple[jax.Array, jax.Array]]
    inner_state: Any


def qat(
    inner: optax.GradientTransformation,
    rules: Sequence[QuantRule] | QuantRule,
    *,
    freeze_step: int | None = None,
    ema_decay: float = 0.0,
    on_unused: str = "warn",
) -> optax.GradientTransformation:
    """Wrap ``inner`` so its state tracks (then freezes) the weights' quantization ranges.

    Args:
      inner: the optimizer (any `optax.GradientTransformation`, e.g. ``prune(adamw, ...)``).
      rules: the `QuantRule`s the forward pass uses with `fake_quant`.
      freeze_step: from this update step on, the ranges no longer change (``None``: never).
      ema_decay: ``ranges = decay * old + (1 - decay) * new`` (0: follow the weights exactly).
      on_unused: ``"warn"``, ``"error"`` or ``"ignore"`` for rules that match no param.

    >>> import jax, jax.numpy as jnp, optax, jaxcompress as jc
    >>> rules = [jc.QuantRule(pattern="w", bits=4, channel_axes=(-1,))]
    >>> params = {"w": jnp.array([[0.5, -1.0], [1.5, 0.25]])}
    >>> opt = jc.qat(optax.sgd(0.1), rules, freeze_step=1)
    >>> state = opt.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(jc.fake_quant(p, rules, ranges=jc.qat_ranges(state))["w"] ** 2))(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> [round(float(v), 4) for v in jc.qat_ranges(state)["w"][1][0]]  # the new weights' absmax
    [1.2, 0.8]
    """
    rules = _quant_rules(rules)
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if freeze_step is not None and (not isinstance(freeze_step, int) or freeze_step < 0):
        raise ValueError(f"freeze_step must be a non-negative int or None, got {freeze_step!r}")

    def init_fn(params):
        ranges = weight_ranges(params, rules, on_unused=on_unused)
        return QATState(jnp.zeros((), jnp.int32), ranges, inner.init(params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("qat needs params: call update(updates, state, params)")
        new_updates, inner_state = inner.update(updates, state.inner_state, params)

        def track(_):
            fresh = weight_ranges(optax.apply_updates(params, new_updates), rules, on_unused="ignore")
            if ema_decay == 0.0:
                return fresh
            return jax.tree.map(lambda old, new: ema_decay * old + (1.0 - ema_decay) * new, state.ranges, fresh)

        def keep(_):
            return state.ranges

        if freeze_step is None:
            ranges = track(None)
        else:
            ranges = lax.cond(state.count < freeze_step, track, keep, None)
        count = optax.safe_increment(state.count)
        return new_updates, QATState(count, ranges, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def qat_ranges(state: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The clip ranges of the (single) `QATState` inside an optimizer state, however nested
    (``optax.chain``, ``inject_hyperparams``, ``MultiSteps`` ...)."""
    found = [
        node
        for node in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, QATState))
        if isinstance(node, QATState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected exactly one QATState in the optimizer state, found {len(found)}")
    return found[0].ranges
