"""Activation fake-quant for W8A8 QAT: the math, tracked / learned ranges, and conversion that
matches `compressed` within one LSB of the output scale."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.execute.hooks import call_with_dot_hook
from jaxcompress.training.activations import activation_fake_quant


def _reference_codes(x, scale):
    x64 = np.asarray(x, np.float64)
    return np.clip(np.round(x64 / np.float64(scale)), -127, 127)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 4.0))
def test_static_forward_and_clipped_ste_match_numpy(seed, absmax):
    x = jax.random.normal(jax.random.key(seed), (6, 10)) * 2.0
    scale = np.float32(np.float32(absmax) / np.float32(127))
    y = activation_fake_quant(x, "static", (1,), absmax=jnp.float32(absmax))
    np.testing.assert_allclose(np.asarray(y, np.float64), _reference_codes(x, scale) * scale, rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda v: jnp.sum(activation_fake_quant(v, "static", (1,), absmax=jnp.float32(absmax)) * 3.0))(x)
    inside = np.abs(np.asarray(x, np.float64) / scale) <= 127
    np.testing.assert_array_equal(np.asarray(grad), np.where(inside, 3.0, 0.0))


def test_dynamic_forward_is_per_row_and_gradient_is_identity():
    x = jax.random.normal(jax.random.key(1), (4, 3, 8))
    y = activation_fake_quant(x, "dynamic", (2,))
    scale = np.max(np.abs(np.asarray(x, np.float64)), axis=2, keepdims=True) / 127
    np.testing.assert_allclose(np.asarray(y), _reference_codes(x, scale) * scale, rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda v: jnp.sum(activation_fake_quant(v, "dynamic", (2,))))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.ones(x.shape))


def test_zero_tracked_range_uses_the_batch_absmax():
    x = jnp.array([[0.3, -2.0, 1.0]])
    np.testing.assert_array_equal(
        activation_fake_quant(x, "static", (1,), absmax=jnp.float32(0.0)),
        activation_fake_quant(x, "static", (1,), absmax=jnp.float32(2.0)),
    )


def test_lsq_activation_gradient_matches_numpy():
    x = jax.random.normal(jax.random.key(2), (5, 12)) * 3.0
    step = jnp.float32(0.03)
    gx, gs = jax.grad(lambda v, s: jnp.sum(activation_fake_quant(v, "static", (1,), step=s) ** 2), argnums=(0, 1))(x, step)
    x64, s64 = np.asarray(x, np.float64), np.float64(np.float32(0.03))
    v = x64 / s64
    y = np.clip(np.round(v), -127, 127) * s64
    upstream = 2 * y
    below, above = v < -127, v > 127
    d_step = np.where(below, -127.0, np.where(above, 127.0, np.round(v) - v))
    expected_step = np.sum(upstream * d_step) / np.sqrt(12 * 127)
    np.testing.assert_allclose(float(gs), expected_step, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(gx), np.where(below | above, 0.0, upstream), rtol=1e-5, atol=1e-6)


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(nn.Dense(16)(x))
        return nn.Dense(4)(x)


def _data(seed=0):
    x = jax.random.normal(jax.random.key(seed), (32, 8, 8, 1))
    y = jax.random.randint(jax.random.key(seed + 1), (32,), 0, 4)
    return x, y


def _rules(activation):
    return [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation=activation)]


def _train(rules, steps=30, freeze_step=20):
    model = _CNN()
    x, y = _data()
    params = model.init(jax.random.key(3), x)
    opt = jc.qat(optax.adam(3e-3), rules, freeze_step=freeze_step)
    state = opt.init(params)
    # the float forward (arithmetic="integer", the default, runs compressed's own kernels; the
    # one-LSB bound below is the float forward's)
    apply = jc.fake_quant_activations(model.apply, rules, arithmetic="float")
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)

        def loss_fn(p):
            fq = jc.fake_quant(p, rules, ranges=jc.qat_ranges(state))
            logits, observed = apply(fq, x, ranges=jc.qat_activation_ranges(state))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), observed

        (loss, observed), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = opt.update(grads, state, params, activation_stats=observed)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return model, params, state, apply, x, losses, len(traces)


@pytest.mark.parametrize("activation", ["static", "dynamic"])
def test_converted_model_matches_fake_quant_forward_within_one_lsb(activation):
    rules = _rules(activation)
    model, params, state, apply, x, losses, traces = _train(rules)
    assert traces == 1 and losses[-1] < losses[0]
    fake, _ = apply(jc.fake_quant(params, rules, ranges=jc.qat_ranges(state)), x, ranges=jc.qat_activation_ranges(state))
    qparams = jc.convert_qat(params, rules, state)
    integer = jax.jit(jc.compressed(model.apply))(qparams, x)
    hlo = jax.jit(jc.compressed(model.apply)).lower(qparams, x).compile().as_text()
    assert "s32" in hlo and "s8[" in hlo
    last = qparams["params"]["Dense_1"]["kernel"]
    # One LSB of the output: the last layer's activation scale times its per-channel weight scale.
    if activation == "static":
        activation_scale = last.activation_scale
    else:  # per row: the fake-quantized input of the last layer has max|x_hat| = 127 * its scale
        seen = {}

        def record(site, activation, weight):
            seen["scale"] = jnp.max(jnp.abs(activation), axis=1, keepdims=True) / 127
            return activation

        fq = jc.fake_quant(params, rules, ranges=jc.qat_ranges(state))
        call_with_dot_hook(lambda p, v: apply(p, v)[0], (fq, x), None, record, select=lambda path: path.endswith("Dense_1/kernel"))
        activation_scale = seen["scale"]
    lsb = np.asarray(activation_scale * last.scale.reshape(1, -1))
    difference = np.abs(np.asarray(integer) - np.asarray(fake))
    assert np.all(difference <= lsb), (difference / lsb).max()
    # the default integer-arithmetic forward on the same weights is the deployed forward: the
    # same codes and int32 sums; the float32 rescaling is fused into different programs, exact
    # here for the static scalar scale, within 1e-6 relative (measured: 5e-7) for the per-row
    # dynamic scale
    ranges = jc.qat_ranges(state)
    default = jc.fake_quant_activations(model.apply, rules)
    y, _ = jax.jit(lambda p: default(jc.fake_quant(p, rules, ranges=ranges), x, ranges=jc.qat_activation_ranges(state),
                                     weight_ranges=ranges))(params)
    if activation == "static":
        np.testing.assert_array_equal(np.asarray(y), np.asarray(integer))
    else:
        assert np.abs(np.asarray(y) - np.asarray(integer)).max() <= 1e-6 * np.abs(np.asarray(integer)).max()


def test_qat_tracks_activation_ranges_with_ema_then_freezes():
    rules = _rules("static")
    model, params, state, apply, x, _, _ = _train(rules, steps=4, freeze_step=2)
    ranges = jc.qat_activation_ranges(state)
    assert sorted(ranges) == ["params/Conv_0/kernel", "params/Dense_0/kernel", "params/Dense_1/kernel"]
    # The input of the first conv is the data itself: observed max|x| never changes.
    np.testing.assert_allclose(float(ranges["params/Conv_0/kernel"]), float(jnp.max(jnp.abs(x))), rtol=1e-6)
    opt = jc.qat(optax.sgd(0.0), rules, activation_ema_decay=0.5, freeze_step=2)
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    seen = []
    for value in (4.0, 2.0, 100.0):
        _, state = opt.update(zeros, state, params, activation_stats={"params/Dense_0/kernel": jnp.float32(value)})
        seen.append(float(jc.qat_activation_ranges(state)["params/Dense_0/kernel"]))
    assert seen == [4.0, 3.0, 3.0]  # first taken as is, then EMA, then frozen


def test_learned_steps_convert_and_errors():
    rules = _rules("static")
    model = _CNN()
    x, _ = _data()
    params = model.init(jax.random.key(3), x)
    steps = jc.init_activation_steps(model.apply, rules, params, x)
    assert sorted(steps) == ["params/Conv_0/kernel", "params/Dense_0/kernel", "params/Dense_1/kernel"]
    apply = jc.fake_quant_activations(model.apply, rules)
    fake, _ = apply(jc.fake_quant(params, rules), x, steps=steps)
    grads = jax.grad(lambda s: jnp.sum(apply(jc.fake_quant(params, rules), x, steps=s)[0] ** 2))(steps)
    assert all(np.isfinite(float(g)) and float(g) != 0.0 for g in grads.values())
    qparams = jc.convert_qat(params, rules, activation_steps=steps)
    np.testing.assert_allclose(jc.compressed(model.apply)(qparams, x), fake, atol=0.05)
    with pytest.raises(ValueError, match="without static activation"):
        apply(params, x, ranges={"params/Conv_0/bias": jnp.float32(1.0)})
    with pytest.raises(TypeError, match="not both"):
        apply(params, x, ranges={}, steps={})
    with pytest.raises(ValueError, match="no activation range observed"):
        jc.convert_qat(params, rules, jc.qat(optax.sgd(0.1), rules).init(params))


def test_default_arithmetic_follows_weight_ranges():
    """Without ``weight_ranges`` the default forward is the float fake-quantized one (the integer
    path could only re-grid each weight on its own absmax); with them it is the deployed int8
    forward, also when the clip range is wider than the weights (a tracked / frozen range)."""
    model = nn.Dense(16)
    x = jax.random.normal(jax.random.key(0), (8, 64))
    params = model.init(jax.random.key(1), x)
    rules = [jc.QuantRule(pattern=".*kernel", channel_axes=(-1,), activation="static")]
    state = jc.qat(optax.sgd(0.0), rules).init(params)
    weight_ranges = jc.qat_ranges(state)  # the init weights' ranges, kept while the weights shrink
    params = jax.tree.map(lambda w: 0.8 * w, params)
    act = {"params/kernel": jnp.float32(3.0)}
    fq = jc.fake_quant(params, rules, ranges=weight_ranges)
    default = jc.fake_quant_activations(model.apply, rules)
    y_float, _ = jc.fake_quant_activations(model.apply, rules, arithmetic="float")(fq, x, ranges=act)
    y_default, _ = default(fq, x, ranges=act)
    np.testing.assert_array_equal(np.asarray(y_default), np.asarray(y_float))
    deployed = jc.compressed(model.apply)(jc.convert_qat(params, rules, state, activation_ranges=act), x)
    y_int, _ = default(fq, x, ranges=act, weight_ranges=weight_ranges)
    np.testing.assert_array_equal(np.asarray(y_int), np.asarray(deployed))
    regridded, _ = jc.fake_quant_activations(model.apply, rules, arithmetic="integer")(fq, x, ranges=act)
    assert not np.array_equal(np.asarray(regridded), np.asarray(deployed))  # what the old default did
