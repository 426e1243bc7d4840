"""`qat` optimizer wrapper: tracked / frozen ranges, one compilation, prune+qat zeros, conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
import jaxcompress.pruning as jp

RULES = [jc.QuantRule(pattern=r".*kernel", bits=4, symmetric=True, channel_axes=(-1,))]  # pruned zeros are code 0


def _problem(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {"l1": {"kernel": jax.random.normal(k1, (8, 16)) * 0.5, "bias": jnp.zeros(16)},
              "l2": {"kernel": jax.random.normal(k2, (16, 2)) * 0.5, "bias": jnp.zeros(2)}}
    x = jax.random.normal(k3, (64, 8))
    y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], -1)

    def apply(p, x):
        h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
        return h @ p["l2"]["kernel"] + p["l2"]["bias"]

    return params, x, y, apply


def _train(opt, steps, params, x, y, apply, rules=RULES):
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)

        def loss(p):
            fq = jc.fake_quant(p, rules, ranges=jc.qat_ranges(state))
            return jnp.mean((apply(fq, x) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state = opt.init(params)
    history = []
    for _ in range(steps):
        params, state, value = step(params, state)
        history.append((float(value), jax.tree.map(np.asarray, jc.qat_ranges(state))))
    return params, state, history, len(traces)


def test_ranges_track_then_freeze_with_one_compilation():
    params, x, y, apply = _problem()
    opt = jc.qat(optax.adam(1e-2), RULES, freeze_step=20)
    params, state, history, n_traces = _train(opt, 40, params, x, y, apply)
    assert n_traces == 1
    hi = [h[1]["l1/kernel"][1] for _, h in enumerate(history)]
    assert not np.array_equal(hi[5], hi[15])  # tracking before freeze_step
    for later in hi[20:]:
        np.testing.assert_array_equal(later, hi[19])  # frozen from the update at step 20 on
    assert history[-1][0] < history[0][0]  # QAT trains


def test_ranges_follow_the_new_weights_and_ema():
    params, x, y, apply = _problem(1)
    grads = jax.tree.map(jnp.ones_like, params)
    opt = jc.qat(optax.sgd(0.1), RULES)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    expected = jc.weight_ranges(new, RULES)
    np.testing.assert_array_equal(jc.qat_ranges(state)["l1/kernel"][1], expected["l1/kernel"][1])
    ema = jc.qat(optax.sgd(0.1), RULES, ema_decay=0.75)
    state = ema.init(params)
    old = jc.qat_ranges(state)["l1/kernel"][1]
    _, state = ema.update(grads, state, params)
    np.testing.assert_allclose(jc.qat_ranges(state)["l1/kernel"][1], 0.75 * old + 0.25 * expected["l1/kernel"][1], rtol=1e-6)


@pytest.mark.parametrize("rule", [
    jc.QuantRule(pattern=r".*kernel", bits=4, channel_axes=(-1,)),
    jc.QuantRule(pattern=r".*kernel", bits=8, symmetric=False, channel_axes=(-1,)),
    jc.QuantRule(pattern=r".*kernel", bits=4, channel_axes=(-1,), group_size=4, calibration="mse"),
    jc.QuantRule(pattern=r".*kernel", qtype="float8_e4m3fn"),
], ids=["int4", "int8-asym", "int4-g4-mse", "fp8"])
def test_conversion_dequantizes_to_the_fake_quant_forward_exactly(rule):
    params, x, y, apply = _problem(2)
    _, state, _, _ = _train(jc.qat(optax.adam(1e-2), [rule], freeze_step=5), 10, params, x, y, apply, [rule])
    trained = params  # any params: conversion must agree with the forward for the same ranges
    ranges = jc.qat_ranges(state)
    qparams, report = jc.quantize_params(trained, [rule], ranges=ranges)
    assert set(report.quantized) == {"l1/kernel", "l2/kernel"}
    fq = jc.fake_quant(trained, [rule], ranges=ranges)
    for layer in ("l1", "l2"):
        np.testing.assert_array_equal(jc.dequantize_params(qparams)[layer]["kernel"], fq[layer]["kernel"])


def test_prune_then_qat_keeps_zeros_exact_through_training_and_conversion():
    params, x, y, apply = _problem(3)
    prune_rules = [jp.PruneRule(pattern=r".*kernel", sparsity=0.75)]
    opt = jc.qat(jp.prune(optax.adam(1e-2), prune_rules, update_every=50, end_step=100), RULES)
    params, state, history, n_traces = _train(opt, 300, params, x, y, apply)
    assert n_traces == 1
    masks = state.inner_state.masks
    for layer in ("l1", "l2"):
        kernel, mask = np.asarray(params[layer]["kernel"]), np.asarray(masks[layer]["kernel"])
        assert abs((~mask).mean() - 0.75) < 0.05
        assert np.all(kernel[~mask] == 0.0)
        assert np.all(np.asarray(jc.fake_quant(params, RULES, ranges=jc.qat_ranges(state))[layer]["kernel"])[~mask] == 0.0)
    qparams, _ = jc.quantize_params(params, RULES, ranges=jc.qat_ranges(state))
    for layer in ("l1", "l2"):
        values = np.asarray(qparams[layer]["kernel"].values.astype(jnp.int8))
        assert np.all(values[~np.asarray(masks[layer]["kernel"])] == 0)
    assert history[-1][0] < history[0][0]


def test_composes_with_chain_inject_hyperparams_and_multisteps():
    params, x, y, apply = _problem(4)
    for opt in (
        optax.chain(optax.clip_by_global_norm(1.0), jc.qat(optax.adam(1e-2), RULES, freeze_step=3)),
        jc.qat(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), RULES),
        optax.MultiSteps(jc.qat(optax.adam(1e-2), RULES), every_k_schedule=2),
    ):
        _, state, history, n_traces = _train(opt, 6, params, x, y, apply)
        assert n_traces == 1 and np.isfinite(history[-1][0])
        assert set(jc.qat_ranges(state)) == {"l1/kernel", "l2/kernel"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="ema_decay"):
        jc.qat(optax.sgd(1.0), RULES, ema_decay=1.0)
    with pytest.raises(ValueError, match="freeze_step"):
        jc.qat(optax.sgd(1.0), RULES, freeze_step=-1)
    with pytest.raises(ValueError, match="exactly one QATState"):
        jc.qat_ranges(optax.adam(1.0).init({"w": jnp.ones(2)}))
    params, *_ = _problem()
    ranges = jc.weight_ranges(params, RULES)
    with pytest.raises(ValueError, match="do not quantize"):
        jc.quantize_params(params, RULES, ranges={**ranges, "l1/bias": ranges["l1/kernel"]})
    with pytest.raises(ValueError, match=r"params\['l1'\]\['kernel'\]: clip range does not fit"):
        jc.quantize_params(params, RULES, ranges={**ranges, "l1/kernel": (jnp.zeros((1, 1)), jnp.ones((1, 1)))})
    with pytest.raises(ValueError, match="no clip range"):
        jc.quantize_params(params, RULES, ranges={"l2/kernel": ranges["l2/kernel"]})


def test_state_is_params_structured_and_works_with_tree_map_params_and_eval_shape():
    params, x, y, apply = _problem()
    rules = [jc.QuantRule(pattern=r"l1/kernel", bits=8, channel_axes=(-1,), activation="static")]
    opt = jc.qat(optax.adam(1e-2), rules)
    state = opt.init(params)
    is_node = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    params_def = jax.tree.structure(params)
    for tree in (state.ranges.lo, state.ranges.hi, state.activation_ranges):
        assert jax.tree.structure(jax.tree.map(lambda _: 0, tree, is_leaf=is_node), is_leaf=is_node) == params_def
        assert is_node(tree["l2"]["kernel"]) and is_node(tree["l1"]["bias"])
    # what callers read is unchanged: {path: (lo, hi)} as weight_ranges gives, {path: max|x|}
    expected = jc.weight_ranges(params, rules)
    got = jc.qat_ranges(state)
    assert set(got) == set(expected) == {"l1/kernel"}
    np.testing.assert_array_equal(np.asarray(got["l1/kernel"][1]), np.asarray(expected["l1/kernel"][1]))
    assert set(jc.qat_activation_ranges(state)) == {"l1/kernel"}
    qparams, _ = jc.quantize_params(params, rules, ranges=jc.qat_ranges(state))
    assert qparams["l1"]["kernel"].values.dtype == jnp.int8
    # optax finds the per-leaf parts structurally (e.g. to build sharding specs)
    specs = optax.tree_map_params(opt, lambda _: "spec", state, transform_non_params=lambda _: None, is_leaf=is_node)
    assert specs.ranges.lo["l1"]["kernel"] == "spec" and specs.activation_ranges["l1"]["kernel"] == "spec"
    assert specs.count is None
    abstract = jax.eval_shape(opt.init, params)
    assert abstract.ranges.hi["l1"]["kernel"].shape == state.ranges.hi["l1"]["kernel"].shape


def test_activation_stats_must_be_the_observed_dict():
    params, x, y, apply = _problem()
    rules = [jc.QuantRule(pattern=r"l1/kernel", bits=8, channel_axes=(-1,), activation="static")]
    opt = jc.qat(optax.sgd(0.1), rules)
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, state = opt.update(zeros, state, params, activation_stats={"l1/kernel": jnp.float32(2.0)})
    assert float(jc.qat_activation_ranges(state)["l1/kernel"]) == 2.0
    # A path no rule quantizes the activation of is a mistake (a wrong tree or key), not ignored.
    with pytest.raises(ValueError, match=r"activation_stats has paths .*\['l2/kernel'\]"):
        opt.update(zeros, state, params, activation_stats={"l1/kernel": jnp.float32(2.0), "l2/kernel": 5.0})
    with pytest.raises(TypeError, match="activation_stats must be the"):
        opt.update(zeros, state, params, activation_stats=[2.0])
