"""`call_with_dot_hook`: the sites a float weight feeds, the same ones `compressed` quantizes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.execute.hooks import call_with_dot_hook


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        x = jax.nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(5)(x)
        return nn.DenseGeneral((2, 3), axis=-1)(jax.nn.gelu(x))


def _setup():
    model = _Net()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    params = model.init(jax.random.key(1), x)
    return model, params, x


def test_sites_and_identity_hook_match_plain_call():
    model, params, x = _setup()
    seen = []

    def hook(site, activation, weight):
        seen.append((site.path, site.primitive, site.activation_contracting_axes, site.activation_reduce_axes, weight.shape))
        return activation

    out = call_with_dot_hook(model.apply, (params, x), None, hook, select=lambda p: p.endswith("kernel"))
    chex.assert_trees_all_close(out, model.apply(params, x), atol=1e-6)
    assert seen == [
        ("params/Conv_0/kernel", "conv_general_dilated", (3,), (1, 2, 3), (3, 3, 3, 4)),
        ("params/Dense_0/kernel", "dot_general", (1,), (1,), (144, 5)),
        ("params/DenseGeneral_0/kernel", "dot_general", (1,), (1,), (5, 2, 3)),
    ]


def test_hook_replaces_activation_and_is_differentiable_under_jit():
    model, params, x = _setup()
    select = lambda p: p == "params/Dense_0/kernel"

    def loss(params, scale):
        def hook(site, activation, weight):
            return activation * scale
        return jnp.sum(call_with_dot_hook(model.apply, (params, x), None, hook, select=select) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, jnp.float32(0.5))

    def reference(params, scale):  # the same change by hand: Dense_0's input scaled
        h = jax.nn.relu(nn.Conv(4, (3, 3)).apply({"params": params["params"]["Conv_0"]}, x)).reshape(2, -1)
        h = nn.Dense(5).apply({"params": params["params"]["Dense_0"]}, h * scale)
        return jnp.sum(nn.DenseGeneral((2, 3), axis=-1).apply({"params": params["params"]["DenseGeneral_0"]}, jax.nn.gelu(h)) ** 2)

    ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1))(params, jnp.float32(0.5))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-5)


def test_weight_used_elsewhere_is_not_a_site_and_bad_argnum_raises():
    params = {"table": jnp.ones((4, 3))}
    fn = lambda p, ids: p["table"][ids] * 2.0
    seen = []
    out = call_with_dot_hook(fn, (params, jnp.array([1, 2])), None, lambda s, x, w: seen.append(s) or x, select=lambda p: True)
    assert out.shape == (2, 3) and seen == []
    with pytest.raises(ValueError, match="params_argnum 3"):
        call_with_dot_hook(fn, (params,), None, lambda s, x, w: x, select=lambda p: True, params_argnum=3)
