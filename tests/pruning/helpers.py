"""A tiny MLP regression problem and a jitted train step with a trace counter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def mlp_params(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "l1": {"kernel": jnp.asarray(rng.standard_normal((8, 32)) / 3, jnp.float32), "bias": jnp.zeros(32)},
        "l2": {"kernel": jnp.asarray(rng.standard_normal((32, 4)) / 6, jnp.float32), "bias": jnp.zeros(4)},
    }


def data(seed: int = 1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    y = jnp.asarray(np.tanh(rng.standard_normal((8, 4)) @ rng.standard_normal((4, 4)))[None].repeat(8, 0).reshape(64, 4) * 0 + np.asarray(x)[:, :4] * 0.5, jnp.float32)
    return x, y


def loss(params, x, y):
    h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
    return jnp.mean((h @ params["l2"]["kernel"] + params["l2"]["bias"] - y) ** 2)


def make_step(opt: optax.GradientTransformation):
    """Returns (step, traces) where traces[0] counts Python traces of the jitted step."""
    traces = [0]

    @jax.jit
    def step(params, state, x, y):
        traces[0] += 1
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    return step, traces


def param_trees(state, params):
    """All param-shaped subtrees of an optimizer state (moments, traces, accumulators)."""
    from jaxcompress.pruning.inner_state import map_param_trees

    found = []
    map_param_trees(lambda t: found.append(t) or t, state, params)
    return found
