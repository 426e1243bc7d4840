"""`jaxcompress._checks.checked`: run-time value checks that leave no effect in the program (so
``jit`` keeps its C++ fast path), raise with their message when they fail, and leave the value
they ride on unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
import jaxcompress.pruning as jp
from jaxcompress._checks import checked

RUN_TIME_ERRORS = (jax.errors.JaxRuntimeError, ValueError)


def test_eager_returns_the_value_or_raises():
    x = jnp.arange(3.0)
    assert checked(x, jnp.ones(3, bool), "never") is x
    with pytest.raises(ValueError, match="^w: bad$"):
        checked(x, np.array([True, False, True]), "w: bad")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32, jnp.bool_, jnp.bfloat16])
def test_under_jit_the_value_is_unchanged_and_a_failure_raises(dtype):
    f = jax.jit(lambda x, ok: checked(x, ok, "the flags say no"))
    x = (jnp.arange(6) % 4 - 1).astype(dtype)
    out = f(x, jnp.ones(2, bool))
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    with pytest.raises(RUN_TIME_ERRORS, match="the flags say no"):
        f(x, jnp.array([True, False])).block_until_ready()


def test_a_message_function_receives_the_flags():
    names = ["a", "b", "c"]

    def message(flags):
        return "bad: " + ", ".join(n for n, ok in zip(names, flags) if not ok)

    f = jax.jit(lambda x, ok: checked(x, ok, message))
    assert int(f(jnp.int32(1), jnp.ones(3, bool))) == 1
    with pytest.raises(RUN_TIME_ERRORS, match="bad: a, c$"):
        f(jnp.int32(1), jnp.array([False, True, False])).block_until_ready()


def test_under_vmap_and_grad():
    f = jax.vmap(lambda x: checked(x * 2.0, x > 0, "x must be positive"))
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(jnp.arange(1.0, 4.0))), [2.0, 4.0, 6.0])
    with pytest.raises(RUN_TIME_ERRORS, match="x must be positive"):
        jax.jit(f)(jnp.array([1.0, -1.0])).block_until_ready()
    # a message function sees the flags without the batch axes (all of the batch must hold)
    g = jax.vmap(lambda x: checked(x, x > 0, lambda flags: f"shape {flags.shape}"))
    with pytest.raises(RUN_TIME_ERRORS, match=r"shape \(\)"):
        jax.jit(g)(jnp.array([1.0, -1.0])).block_until_ready()
    grad = jax.grad(lambda x: checked(x**2, x > 0, "x must be positive"))
    assert float(jax.jit(grad)(3.0)) == 6.0


def test_a_check_with_its_value_used_is_not_dead_code():
    # jit's dead-code elimination keeps the check because the returned value depends on it
    f = jax.jit(lambda x: checked(x, x > 0, "kept") + 1.0)
    with pytest.raises(RUN_TIME_ERRORS, match="kept"):
        f(jnp.float32(-1.0)).block_until_ready()


def _effects(fn, *args):
    return jax.make_jaxpr(fn)(*args).effects


def test_the_library_steps_hold_no_effect():
    # An effect (e.g. jax.debug.callback) would make jit leave its C++ fast path on every call.
    params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "b": jnp.zeros(8)}
    rule = jp.PruneRule(pattern="w", sparsity=jp.polynomial(0.5, begin_step=0, end_step=20, frequency=5))
    opt = jp.prune(optax.adamw(1e-2), rule, update_every=5)
    state = opt.init(params)
    assert _effects(lambda g, s, p: opt.update(g, s, p), params, state, params) == set()
    assert _effects(lambda w: jc.quantize(w, bits=8, channel_axes=(-1,)).scale, params["w"]) == set()


def test_prune_step_dispatches_on_the_fast_path_and_still_checks():
    params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}
    # checks="raise": the running step raises (its host callback is called only on failure)
    opt = optax.chain(jp.prune(optax.sgd(0.1), {"w": 0.5}, update_every=2, checks="raise"), optax.scale(0.5))
    state = opt.init(params)
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(p, s, p)))
    with pytest.raises(RUN_TIME_ERRORS, match=r"\['w'\]: non-zero params at pruned positions"):
        for _ in range(4):
            params, state = step(params, state)
        jax.block_until_ready(params)
    # checks="state" (the default): no callback at all; the failure is recorded and raised on the host
    params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}
    opt = optax.chain(jp.prune(optax.sgd(0.1), {"w": 0.5}, update_every=2), optax.scale(0.5))
    state = opt.init(params)
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(p, s, p)))
    for _ in range(4):
        params, state = step(params, state)
    with pytest.raises(ValueError, match=r"\['w'\]: non-zero params at pruned positions"):
        jp.prune_masks(state)
