"""Training adapters: gradients only on adapters (equal to the merged-weight reference), optax.masked,
jit / vmap / scan, merge equals apply, merge then re-quantize."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress.lora import LoraAdapter, LoraRule, lora_apply, lora_init, lora_train_step, merge_lora


def _mlp(params, x):
    h = jax.nn.gelu(x @ params["w1"])
    return h @ params["w2"]


def _setup(bits=4):
    key = jax.random.key(0)
    params = {"w1": jax.random.normal(key, (8, 16)) / 3, "w2": jax.random.normal(jax.random.fold_in(key, 1), (16, 4)) / 4}
    qbase, _ = jc.quantize_params(params, [jc.QuantRule(pattern="w.", bits=bits, channel_axes=(-1,))])
    adapters = lora_init(jax.random.key(1), qbase, LoraRule(pattern="w."), rank=2, alpha=4.0)
    adapters["w2"] = LoraAdapter(adapters["w2"].a, 0.1 * jnp.ones_like(adapters["w2"].b), 4.0)
    x = jax.random.normal(jax.random.key(2), (6, 8))
    return params, qbase, adapters, x


def _reference_forward(adapters, dequantized, x):
    """The same function on float kernels W + scale * A @ B, differentiable in the adapters."""
    merged = {name: w + (adapters[name].a @ adapters[name].b * adapters[name].scale).reshape(w.shape) for name, w in dequantized.items()}
    return _mlp(merged, x)


def test_gradients_flow_to_adapters_only_and_match_the_reference():
    _, qbase, adapters, x = _setup()
    forward = lora_apply(_mlp)
    loss = lambda adapters: jnp.sum(forward(qbase, adapters, x) ** 2)
    grads = jax.jit(jax.grad(loss))(adapters)
    dequantized = jc.dequantize_params(qbase)
    want = jax.jit(jax.grad(lambda a: jnp.sum(_reference_forward(a, dequantized, x) ** 2)))(adapters)
    for name in ("w1", "w2"):
        for field in ("a", "b"):
            got, ref = getattr(grads[name], field), getattr(want[name], field)
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(grads["w1"].b).max()) > 0  # B of the first layer learns from zero
    # The base is not an input of the gradient computation: the jaxpr has no cotangent of its codes.
    jaxpr = jax.make_jaxpr(jax.grad(loss))(adapters)
    assert all(v.aval.dtype != jnp.int4 for v in jaxpr.jaxpr.outvars)


def test_train_step_reduces_the_loss_and_optax_masked_freezes_what_it_masks():
    params, qbase, adapters, x = _setup()
    target = _mlp(params, x)
    forward = lora_apply(_mlp)
    loss = lambda adapters, base, x, y: jnp.mean((forward(base, adapters, x) - y) ** 2)
    # optax.masked composes: weight decay on the A factors only, Adam on everything
    decay_a = jax.tree_util.tree_map(lambda a: LoraAdapter(True, False, a.alpha), adapters, is_leaf=lambda x: isinstance(x, LoraAdapter))
    optimizer = optax.chain(optax.masked(optax.add_decayed_weights(1e-3), decay_a), optax.adam(3e-2))
    step = lora_train_step(loss, optimizer)
    state = optimizer.init(adapters)
    start = adapters
    losses = []
    for _ in range(30):
        adapters, state, value = step(adapters, state, qbase, x, target)
        losses.append(float(value))
    assert losses[-1] < 0.7 * losses[0]
    # freezing part of the adapters: multi_transform with a zero transform on the frozen labels
    frozen = optax.multi_transform({"train": optax.adam(3e-2), "freeze": optax.set_to_zero()},
                                   {"w1": LoraAdapter("train", "train", 4.0), "w2": LoraAdapter("freeze", "freeze", 4.0)})
    step = lora_train_step(loss, frozen)
    state = frozen.init(start)
    adapters = start
    for _ in range(3):
        adapters, state, _ = step(adapters, state, qbase, x, target)
    np.testing.assert_array_equal(np.asarray(adapters["w2"].b), np.asarray(start["w2"].b))
    assert not np.array_equal(np.asarray(adapters["w1"].b), np.asarray(start["w1"].b))


def test_vmap_over_inputs_and_over_adapters():
    _, qbase, adapters, x = _setup(bits=8)
    forward = lora_apply(_mlp)
    rows = jax.jit(jax.vmap(lambda row: forward(qbase, adapters, row[None])[0]))(x)
    np.testing.assert_allclose(np.asarray(rows), np.asarray(jax.jit(forward)(qbase, adapters, x)), rtol=1e-5, atol=1e-5)
    # two adapter sets at once (the weight-side batch takes the dense-update path)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), adapters)
    both = jax.jit(jax.vmap(lambda a: forward(qbase, a, x)))(stacked)
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, adapters)
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(jax.jit(forward)(qbase, doubled, x)), rtol=1e-4, atol=1e-5)


def test_scan_over_stacked_layers_and_a_closed_over_kernel():
    layers, width = 3, 6
    key = jax.random.key(0)
    params = {"stack": jax.random.normal(key, (layers, width, width)) / 3, "head": jax.random.normal(jax.random.fold_in(key, 1), (width, 2))}

    def fn(p, x):
        def body(h, w):
            return jnp.tanh(h @ w + h @ p["head"] @ p["head"].T), None

        h, _ = jax.lax.scan(body, x, p["stack"])
        return h

    qbase, _ = jc.quantize_params(params, [jc.QuantRule(pattern=".*", bits=8, channel_axes=(-1,))])
    rules = [LoraRule(pattern="stack", stacked_axes=1), LoraRule(pattern="head")]
    adapters = lora_init(jax.random.key(1), qbase, rules, rank=2)
    adapters = jax.tree_util.tree_map(lambda a: a + 0.05, adapters)
    assert adapters["stack"].a.shape == (layers, width, 2)
    x = jax.random.normal(jax.random.key(2), (4, width))
    got = jax.jit(lora_apply(fn))(qbase, adapters, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(fn)(merge_lora(qbase, adapters), x)), rtol=1e-4, atol=1e-5)
    # the scan slices codes and adapters per layer: no dense (layers, 6, 6) float update is built
    text = str(jax.make_jaxpr(lora_apply(fn))(qbase, adapters, x))
    assert "f32[3,6,6]" not in text


def test_merge_equals_apply_and_requantizes_for_deployment():
    _, qbase, adapters, x = _setup(bits=8)
    merged = merge_lora(qbase, adapters)
    assert all(isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(merged))
    np.testing.assert_allclose(np.asarray(_mlp(merged, x)), np.asarray(lora_apply(_mlp)(qbase, adapters, x)), rtol=1e-4, atol=1e-5)
    deployed, _ = jc.quantize_params(merged, [jc.QuantRule(pattern="w.", bits=8, channel_axes=(-1,))])
    assert isinstance(deployed["w1"], jc.QArray)
    np.testing.assert_allclose(np.asarray(jc.compressed(_mlp, policy="weight_only")(deployed, x)), np.asarray(_mlp(merged, x)), atol=0.05)
