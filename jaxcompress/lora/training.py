"""`lora_train_step`: one jitted optax step that differentiates the adapters only."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

__all__ = ["lora_train_step"]


def lora_train_step(loss_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation) -> Callable:
    """``step(adapters, opt_state, base, *batch) -> (adapters, opt_state, loss)``, jitted.

    ``loss_fn(adapters, base, *batch)`` returns a scalar (it calls `lora_apply`'s function). The
    gradient is taken with respect to ``adapters`` alone, so nothing is computed for the base
    (a `QArray` base has no float leaves to differentiate anyway) and ``optimizer`` (any optax
    transformation: ``optax.masked``, ``optax.chain``, ``optax.MultiSteps`` ...) is initialised
    on and updates only the adapters: ``opt_state = optimizer.init(adapters)``.

    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxcompress.lora import LoraRule, lora_init, lora_apply, lora_train_step
    >>> base = {"w": jnp.eye(4)}
    >>> forward = lora_apply(lambda params, x: x @ params["w"])
    >>> loss = lambda adapters, base, x, y: jnp.mean((forward(base, adapters, x) - y) ** 2)
    >>> adapters = lora_init(jax.random.key(0), base, LoraRule(pattern="w"), rank=1)
    >>> optimizer = optax.adam(0.1)
    >>> step = lora_train_step(loss, optimizer)
    >>> state = optimizer.init(adapters)
    >>> x = jnp.ones((8, 4))
    >>> first = None
    >>> for _ in range(20):
    ...     adapters, state, value = step(adapters, state, base, x, 2 * x)
    ...     first = value if first is None else first
    >>> bool(value < first)
    True
    """

    @jax.jit
    def step(adapters: Any, opt_state: Any, base: Any, *batch: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(adapters, base, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    return step
