"""Integer-arithmetic W8A8 QAT (`fake_quant_activations(..., arithmetic="integer")`): the forward
is what `compressed(convert_qat(...))` deploys, the gradient is the float STE gradient, the
compiled step runs s8 x s8 -> s32 contractions, and sites the integer kernel cannot take keep the
float fake-quantized op."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
from jaxcompress.execute.transform import compressed


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))  # one input channel: contracts 9 values
        x = nn.Conv(8, (3, 3), feature_group_count=8)(x)  # depthwise
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(10)(x)


class SmallMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.relu(nn.DenseGeneral((4, 8))(x).reshape(x.shape[0], 32))  # a kernel reshaped on its way
        return nn.Dense(10, use_bias=False)(x)


MODELS = {"cnn": (SmallCNN(), (2, 8, 8, 1)), "mlp": (SmallMLP(), (5, 24))}


def _rules(activation):
    return [jc.QuantRule(pattern=".*kernel", channel_axes=(-1,), activation=activation)]


@functools.lru_cache(maxsize=None)
def _trained_for(name, activation):
    """`_trained` once per (model, activation mode) for the whole module (compiling the hooked
    train step is most of this file's time)."""
    model, shape = MODELS[name]
    return _trained(model, shape, _rules(activation))


@functools.lru_cache(maxsize=None)
def _jitted_grad(name, activation, arithmetic):
    """One jitted ``value_and_grad`` of `_loss_fn` per (model, mode, arithmetic), shared by the
    tests (the HLO test lowers the same function the value test ran)."""
    return jax.jit(jax.value_and_grad(_loss_fn(MODELS[name][0], _rules(activation), arithmetic), has_aux=True))


def _trained(model, shape, rules, steps=2):
    """Params and a qat state after a few W8A8 QAT steps (tracked ranges, EMA activation ranges)."""
    x = jax.random.normal(jax.random.key(0), shape)
    params = model.init(jax.random.key(1), x)["params"]
    opt = jc.qat(optax.adam(1e-2), rules)
    state = opt.init(params)
    # trained with the float forward (the tests compare both arithmetics from these params)
    apply = jc.fake_quant_activations(lambda p, v: model.apply({"params": p}, v), rules, arithmetic="float")

    @jax.jit
    def step(params, state):
        def loss(p):
            y, observed = apply(jc.fake_quant(p, rules, ranges=jc.qat_ranges(state)), x,
                                ranges=jc.qat_activation_ranges(state))
            return jnp.mean(y**2), observed

        grads, observed = jax.grad(loss, has_aux=True)(params)
        updates, state = opt.update(grads, state, params, activation_stats=observed)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return x, params, state


def _loss_fn(model, rules, arithmetic):
    apply = jc.fake_quant_activations(lambda p, v: model.apply({"params": p}, v), rules, arithmetic=arithmetic)

    def loss(params, state, x):
        ranges = jc.qat_ranges(state)
        extra = {} if arithmetic == "float" else {"weight_ranges": ranges}
        y, observed = apply(jc.fake_quant(params, rules, ranges=ranges), x, ranges=jc.qat_activation_ranges(state), **extra)
        return jnp.sum(jnp.sin(y)), (y, observed)

    return loss


@pytest.mark.parametrize("name, activation", [("cnn", "static"), ("mlp", "dynamic")])
def test_integer_forward_is_the_deployed_forward_and_gradient_is_the_float_ste(name, activation):
    model, _ = MODELS[name]
    rules = _rules(activation)
    x, params, state = _trained_for(name, activation)
    deployed = jax.jit(compressed(model.apply))({"params": jc.convert_qat(params, rules, state)}, x)

    (_, (y_int, observed_int)), g_int = _jitted_grad(name, activation, "integer")(params, state, x)
    # the integer forward runs the deployed kernels: bit for bit
    np.testing.assert_array_equal(np.asarray(y_int), np.asarray(deployed))

    (_, (y_float, observed_float)), g_float = _jitted_grad(name, activation, "float")(params, state, x)
    # the float forward differs from it by float rounding only (a few output steps at most)
    scale = np.abs(np.asarray(deployed)).max()
    assert np.abs(np.asarray(y_float) - np.asarray(deployed)).max() <= 1e-5 * scale
    # the backward is the float fake-quant STE gradient (the cotangent differs by that rounding)
    for a, b in zip(jax.tree.leaves(g_int), jax.tree.leaves(g_float)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    assert sorted(observed_int) == sorted(observed_float)
    for path in observed_int:  # max|x| of activations that differ by that rounding
        np.testing.assert_allclose(float(observed_int[path]), float(observed_float[path]), rtol=1e-5)


def test_lsq_steps_get_the_float_gradient():
    model, shape = MODELS["mlp"]
    rules = [jc.QuantRule(pattern=".*kernel", channel_axes=(-1,), activation="static")]
    x = jax.random.normal(jax.random.key(0), shape)
    params = model.init(jax.random.key(1), x)["params"]
    steps = jc.init_activation_steps(lambda p, v: model.apply({"params": p}, v), rules, params, x)

    def loss(arithmetic):
        apply = jc.fake_quant_activations(lambda p, v: model.apply({"params": p}, v), rules, arithmetic=arithmetic)

        def value(params, steps):
            fq = jc.fake_quant(params, rules)
            extra = {} if arithmetic == "float" else {"weight_ranges": jc.weight_ranges(params, rules)}
            return jnp.sum(jnp.cos(apply(fq, x, steps=steps, **extra)[0]))

        return jax.jit(jax.grad(value, argnums=(0, 1)))(params, steps)

    (gp_int, gs_int), (gp_float, gs_float) = loss("integer"), loss("float")
    assert sorted(gs_int) == sorted(steps)
    for a, b in zip(jax.tree.leaves((gp_int, gs_int)), jax.tree.leaves((gp_float, gs_float))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5 * float(jnp.abs(b).max()))
    deployed = compressed(model.apply)({"params": jc.convert_qat(params, rules, activation_steps=steps)}, x)
    apply = jc.fake_quant_activations(lambda p, v: model.apply({"params": p}, v), rules, arithmetic="integer")
    y, _ = apply(jc.fake_quant(params, rules), x, steps=steps, weight_ranges=jc.weight_ranges(params, rules))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(deployed))


def _contractions(hlo: str):
    """(integer contractions on s8 operands, float convolutions) in a compiled HLO text."""
    integer = float_convs = 0
    for line in hlo.splitlines():
        match = re.search(r"= (\w+)\[[^\]]*\][^ ]* (dot|convolution)\(", line)
        if match is None:
            continue
        if match.group(1) == "s32":
            integer += 1
        elif match.group(2) == "convolution":
            float_convs += 1
    return integer, float_convs


def test_compiled_step_runs_integer_contractions_and_drops_the_float_forward():
    x, params, state = _trained_for("cnn", "static")

    def compiled(arithmetic):
        # the gradient program (value and grad, the forward output kept as aux)
        return _jitted_grad("cnn", "static", arithmetic).lower(params, state, x).compile().as_text()

    integer, integer_convs = _contractions(compiled("integer"))
    none, float_convs = _contractions(compiled("float"))
    assert none == 0
    # conv 1, conv 3 (im2col) and the two dense layers on s8 x s8 -> s32 (the depthwise conv is
    # an integer window sum, no dot)
    assert integer >= 4
    # two ungrouped convs no longer run a float forward convolution
    assert integer_convs <= float_convs - 2


def test_auto_keeps_the_float_op_where_the_cost_model_says_integer_loses():
    model, _ = MODELS["cnn"]
    rules = _rules("dynamic")
    x, params, state = _trained_for("cnn", "dynamic")
    outs, counts = {}, {}
    for arithmetic in ("float", "integer", "auto"):
        forward = jax.jit(lambda p: _loss_fn(model, rules, arithmetic)(p, state, x)[1][0])
        outs[arithmetic] = forward(params)
        counts[arithmetic] = _contractions(forward.lower(params).compile().as_text())[0]
    # "auto" keeps some sites float (conv 1 contracts 9 values) and the others integer
    assert counts["float"] < counts["auto"] < counts["integer"], counts
    scale = float(jnp.abs(outs["integer"]).max())
    assert float(jnp.abs(outs["auto"] - outs["integer"]).max()) <= 1e-5 * scale


def test_stacked_weight_under_scan_keeps_the_float_fake_quantized_op():
    rules = [jc.QuantRule(pattern="w", channel_axes=(-1,), activation="dynamic")]
    params = {"w": jax.random.normal(jax.random.key(0), (3, 6, 6))}

    def fn(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    x = jax.random.normal(jax.random.key(1), (2, 6))
    fq = jc.fake_quant(params, rules)
    y_float, _ = jc.fake_quant_activations(fn, rules, arithmetic="float")(fq, x)
    y_int, _ = jc.fake_quant_activations(fn, rules, arithmetic="integer")(fq, x, weight_ranges=jc.weight_ranges(params, rules))
    np.testing.assert_array_equal(np.asarray(y_int), np.asarray(y_float))


def test_misuse_is_reported():
    rules = [jc.QuantRule(pattern="w", activation="dynamic")]
    with pytest.raises(ValueError, match="arithmetic"):
        jc.fake_quant_activations(lambda p, x: x @ p["w"], rules, arithmetic="int8")
    apply = jc.fake_quant_activations(lambda p, x: x @ p["w"], rules, arithmetic="float")
    with pytest.raises(TypeError, match="weight_ranges"):
        apply({"w": jnp.ones((2, 2))}, jnp.ones((1, 2)), weight_ranges={"w": (jnp.zeros(()), jnp.ones(()))})


def _integer_dot_operand_types(hlo: str) -> list[tuple[str, ...]]:
    """The element types of the operands of every ``s32`` dot in a compiled HLO text."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    dots = re.findall(r"= s32\[[^\]]*\][^ ]* dot\(([^)]*)\)", hlo)
    return [tuple(types[name.strip().lstrip("%")] for name in operands.split(",")) for operands in dots]


def test_dense_kernel_codes_stay_int8_in_the_compiled_step():
    # A Flax (in, out) kernel: quantize_params stores its codes (out, in) for compressed; in the
    # QAT step the codes are computed in the program, and a pending transpose between the int8
    # convert and the dot made XLA:CPU run it as s32 x s32.
    model = nn.Dense(32)
    x = jax.random.normal(jax.random.key(0), (16, 64))
    params = model.init(jax.random.key(1), x)["params"]
    rules = _rules("dynamic")
    state = jc.qat(optax.adam(1e-2), rules).init(params)
    grad = jax.jit(jax.value_and_grad(_loss_fn(model, rules, "integer"), has_aux=True))
    operand_types = _integer_dot_operand_types(grad.lower(params, state, x).compile().as_text())
    assert operand_types, "no integer dot in the compiled step"
    assert all(types == ("s8", "s8") for types in operand_types), operand_types


@pytest.mark.parametrize("activation", ["static", "dynamic"])
def test_backward_keeps_the_int8_codes_not_the_float_activation(activation):
    # The VJP's residuals of the activation are its int8 codes (+ the clip mask for the static
    # clipped STE), not the float activation, and the gradient is the float fake-quant STE
    # gradient bit for bit (a loss linear in the outputs: the cotangent does not depend on the
    # forward's rounding, so the float and the integer forward get the same one).
    model = nn.Dense(8)
    x = 3.0 * jax.random.normal(jax.random.key(0), (6, 16))
    params = model.init(jax.random.key(1), x)["params"]
    rules = _rules(activation)
    fq = jc.fake_quant(params, rules)
    ranges = {"kernel": jnp.float32(2.5)} if activation == "static" else None  # clips some of x
    cotangent = jax.random.normal(jax.random.key(2), (6, 8))

    def loss(arithmetic):
        apply = jc.fake_quant_activations(lambda p, v: model.apply({"params": p}, v), rules, arithmetic=arithmetic)
        return lambda p, v: jnp.sum(cotangent * apply(p, v, ranges=ranges)[0])

    _, f_vjp = jax.vjp(loss("integer"), fq, x)
    kept = sorted(str(r.dtype) for r in jax.tree.leaves(f_vjp) if r.shape == x.shape)
    assert kept == (["bool", "int8"] if activation == "static" else ["int8"]), kept
    _, f_vjp_float = jax.vjp(loss("float"), fq, x)  # the float forward keeps a float activation
    assert "float32" in [str(r.dtype) for r in jax.tree.leaves(f_vjp_float) if r.shape == x.shape]

    g_int = jax.grad(loss("integer"), argnums=(0, 1))(fq, x)
    g_float = jax.grad(loss("float"), argnums=(0, 1))(fq, x)
    if activation == "static":
        assert float(jnp.abs(g_int[1]).min()) == 0.0  # the clip mask is exercised
    for a, b in zip(jax.tree.leaves(g_int), jax.tree.leaves(g_float)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_integer_contraction_rejects_an_ste_its_mode_cannot_use():
    from jaxcompress.execute.weight_view import WeightView
    from jaxcompress.execute.hooks import DotSite
    from jaxcompress.training.integer_qat import integer_contraction

    dims = (((1,), (0,)), ((), ()))
    site = DotSite("w", "dot_general", "rhs", {"dimension_numbers": dims}, (), (1,), (1,))
    view = WeightView.from_qarray(jc.quantize(jnp.ones((4, 2)), channel_axes=(-1,)))
    args = (site, jnp.ones((3, 4)), jnp.ones((4, 2)), lambda a, b: jax.lax.dot_general(a, b, dims), view)
    with pytest.raises(ValueError, match="ste must be one of"):
        integer_contraction(*args, "dynamic", lambda a, p: a, jnp.float32(0), None, ste="codes")
    with pytest.raises(ValueError, match="clipped"):
        integer_contraction(*args, "dynamic", lambda a, p: a, jnp.float32(0), None, ste="clipped")
    with pytest.raises(ValueError, match="identity"):
        integer_contraction(*args, "static", lambda a, p: a, jnp.float32(1), lambda a, p: p, ste="identity")
