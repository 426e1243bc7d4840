"""compressed(fn) on unmodified linen / nnx / plain JAX functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import jaxcompress as jc
from jaxcompress.execute.transform import compressed
from jaxcompress.execute import UnsupportedQuantizedOp
from tests.execute.reference import activation_codes, conv_w8a8, count_s8_contractions, dense_w8a8, weight_parts


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _rule(pattern=r".*kernel", **spec):
    spec.setdefault("channel_axes", (-1,))
    return [jc.QuantRule(pattern=pattern, **spec)]


def _quantized(model, x, **spec):
    params = model.init(jax.random.key(0), x)
    qparams, _ = jc.quantize_params(params, _rule(**spec))
    return params, qparams


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


class Attention(nn.Module):
    """An einsum attention block with a fused qkv kernel sliced per head group."""

    heads: int = 2
    head_dim: int = 4

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        qkv = self.param("qkv", nn.initializers.normal(0.3), (features, 3, self.heads, self.head_dim))
        out = self.param("out", nn.initializers.normal(0.3), (self.heads, self.head_dim, features))
        q, k, v = (jnp.einsum("btd,dhk->bthk", x, qkv[:, i]) for i in range(3))
        weights = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(self.head_dim), axis=-1)
        mixed = jnp.einsum("bhts,bshk->bthk", weights, v)
        return jax.nn.gelu(jnp.einsum("bthk,hkd->btd", mixed, out))


# ---- weight-only equals apply(dequantize_params(q)) -------------------------------------
@pytest.mark.parametrize(
    "model, shape, spec",
    [
        (nn.Dense(6), (3, 8), dict()),
        (nn.DenseGeneral((2, 3), axis=(-2, -1)), (2, 4, 8), dict(bits=4, symmetric=False)),
        (nn.Conv(5, (3, 3), strides=2), (2, 7, 7, 3), dict(bits=4, group_size=3, group_axis=2)),
        (Attention(), (2, 5, 8), dict(pattern=".*")),
    ],
    ids=["Dense", "DenseGeneral", "Conv", "Attention"],
)
def test_linen_weight_only_equals_dequantized_apply(model, shape, spec):
    x = _normal(1, shape)
    _, qparams = _quantized(model, x, **spec)
    out = jax.jit(compressed(model.apply))(qparams, x)
    ref = jax.jit(model.apply)(jc.dequantize_params(qparams), x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


# ---- W8A8 equals the float64 NumPy reference of the integer arithmetic -------------------
def test_linen_dense_w8a8_matches_reference_and_hlo():
    model, x = nn.Dense(6), _normal(1, (3, 8))
    _, qparams = _quantized(model, x, activation="dynamic")
    apply = compressed(model.apply)
    out = jax.jit(apply)(qparams, x)
    kernel, bias = qparams["params"]["kernel"], qparams["params"]["bias"]
    np.testing.assert_allclose(np.asarray(out), dense_w8a8(x, kernel, bias), rtol=2e-5, atol=2e-5)
    assert count_s8_contractions(_hlo(apply, qparams, x), "dot") == 1


def test_linen_dense_general_w8a8_matches_reference():
    model, x = nn.DenseGeneral((2, 3), axis=(-2, -1)), _normal(1, (2, 4, 8))
    _, qparams = _quantized(model, x, activation="dynamic", symmetric=False)
    out = jax.jit(compressed(model.apply))(qparams, x)
    kernel = qparams["params"]["kernel"]                      # (4, 8, 2, 3), scale (1, 1, 1, 3)
    codes, x_scale = activation_codes(x, (1, 2))
    w_codes, w_scale, zero = weight_parts(kernel)
    acc = np.einsum("bij,ijkl->bkl", codes, w_codes - zero)
    expected = acc * x_scale.reshape(2, 1, 1) * w_scale.reshape(1, 1, 3) + np.asarray(qparams["params"]["bias"])
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)


def test_linen_conv_w8a8_matches_reference_and_hlo():
    model, x = nn.Conv(5, (3, 3), strides=2, padding=((1, 0), (0, 1))), _normal(1, (2, 7, 7, 3))
    _, qparams = _quantized(model, x, activation="dynamic")
    apply = compressed(model.apply)
    out = jax.jit(apply)(qparams, x)
    p = qparams["params"]
    expected = conv_w8a8(x, p["kernel"], (2, 2), ((1, 0), (0, 1)), bias=p["bias"])
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)
    assert count_s8_contractions(_hlo(apply, qparams, x)) == 1


def test_attention_w8a8_matches_reference():
    model, x = Attention(), _normal(1, (2, 5, 8))
    _, qparams = _quantized(model, x, pattern=".*", activation="dynamic")
    apply = compressed(model.apply)
    out = jax.jit(apply)(qparams, x)
    qkv, wout = qparams["params"]["qkv"], qparams["params"]["out"]
    qkv_codes, qkv_scale, _ = weight_parts(qkv)               # scale (1, 1, 1, head_dim)
    codes, x_scale = activation_codes(x, (2,))
    proj = [np.einsum("btd,dhk->bthk", codes, qkv_codes[:, i]) * x_scale[..., None] * qkv_scale[:, 0] for i in range(3)]
    logits = np.einsum("bthk,bshk->bhts", proj[0], proj[1]) / np.sqrt(4)
    logits = np.exp(logits - logits.max(-1, keepdims=True))
    mixed = np.einsum("bhts,bshk->bthk", logits / logits.sum(-1, keepdims=True), proj[2])
    mixed_codes, mixed_scale = activation_codes(mixed, (2, 3))
    out_codes, out_scale, _ = weight_parts(wout)
    y = np.einsum("bthk,hkd->btd", mixed_codes, out_codes) * mixed_scale[..., 0] * out_scale[0]
    y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
    # mixed is float32 on the device and its codes may round differently at a .5 tie: a loose
    # tolerance on the second projection only, the first three are exact up to float32.
    np.testing.assert_allclose(np.asarray(out), y, rtol=1e-3, atol=1e-3)
    assert count_s8_contractions(_hlo(apply, qparams, x), "dot") == 4


def _nnx_call(module):
    graphdef, state = nnx.split(module)

    def call(state, x):
        return nnx.merge(graphdef, state)(x)

    return state, call


def test_nnx_linear_and_conv():
    linear = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(1))
    for module, x, check in (
        (linear, _normal(1, (3, 8)), lambda q, x: dense_w8a8(x, q["kernel"], q["bias"])),
        (conv, _normal(2, (2, 6, 6, 3)), lambda q, x: conv_w8a8(x, q["kernel"], (1, 1), ((1, 1), (1, 1)), bias=q["bias"])),
    ):
        state, call = _nnx_call(module)
        for activation in ("weight_only", "dynamic"):
            qstate, report = jc.quantize_params(state, _rule(activation=activation))
            assert report.quantized == ("kernel",)
            out = jax.jit(compressed(call))(qstate, x)
            if activation == "weight_only":
                ref = call(jc.dequantize_params(qstate), x)
                np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
            else:
                leaves = {k: v.get_value() if hasattr(v, "get_value") else v for k, v in qstate.items()}
                np.testing.assert_allclose(np.asarray(out), check(leaves, x), rtol=2e-5, atol=2e-5)


# ---- composition --------------------------------------------------------------------------
def test_jit_and_vmap_composition():
    model, x = nn.Dense(6), _normal(1, (4, 3, 8))
    _, qparams = _quantized(model, x, activation="dynamic")
    apply = compressed(model.apply)
    batched = jax.jit(jax.vmap(apply, in_axes=(None, 0)))(qparams, x)
    rows = np.stack([np.asarray(jax.jit(apply)(qparams, x[i])) for i in range(4)])
    np.testing.assert_allclose(np.asarray(batched), rows, rtol=1e-6, atol=1e-6)
    eager = apply(qparams, x[0])
    np.testing.assert_allclose(np.asarray(eager), rows[0], rtol=1e-6, atol=1e-6)


def test_sees_through_nested_jit_remat_and_custom_derivatives():
    w1, w2 = _normal(1, (8, 8)), _normal(2, (8, 4))

    @jax.jit
    def inner(x, w):
        return jax.nn.relu(x @ w)

    @jax.custom_vjp
    def scaled(x, w):
        return 2.0 * jnp.dot(x, w)

    scaled.defvjp(lambda x, w: (scaled(x, w), None), lambda _, g: (g, g))

    def fn(params, x):
        h = jax.checkpoint(lambda x, w: jax.nn.gelu(inner(x, w.T.T)))(x, params["w1"])
        return scaled(h, params["w2"])

    params = {"w1": w1, "w2": w2}
    qparams, _ = jc.quantize_params(params, _rule(pattern="w.", activation="dynamic"))
    x = _normal(3, (5, 8))
    apply = compressed(fn)
    out = jax.jit(apply)(qparams, x)
    assert count_s8_contractions(_hlo(apply, qparams, x), "dot") == 2
    h = dense_w8a8(x, qparams["w1"])
    h = jax.nn.gelu(jnp.maximum(h, 0.0))
    expected = 2.0 * dense_w8a8(np.asarray(h, np.float32), qparams["w2"])
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def _looped(params, x):
    def layer(h, w):
        return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(layer, x, params["layers"])
    h = jax.lax.cond(h.sum() > 0, lambda h: h @ params["head"], lambda h: -(h @ params["head"]), h)
    return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ params["sq"]), (0, h))[1]


def _unrolled(params, x):
    h = x
    for i in range(params["layers"].shape[0]):
        h = jnp.tanh(h @ params["layers"][i])
    h = jnp.where(h.sum() > 0, h @ params["head"], -(h @ params["head"]))
    for _ in range(2):
        h = h @ params["sq"]
    return h


@pytest.mark.parametrize("layer_axes", [(-1,), (0, 2), ()], ids=["shared-over-layers", "per-layer", "per-tensor"])
def test_scan_cond_while_keep_integer_dots(layer_axes):
    params = {"layers": _normal(1, (3, 8, 8), 0.3), "head": _normal(2, (8, 8)), "sq": _normal(3, (8, 8), 0.3)}
    rules = [
        jc.QuantRule(pattern="layers", channel_axes=layer_axes, activation="dynamic"),
        jc.QuantRule(pattern=".*", channel_axes=(-1,), activation="dynamic"),
    ]
    qparams, _ = jc.quantize_params(params, rules)
    x = _normal(4, (2, 8))
    looped = compressed(_looped)
    out = jax.jit(looped)(qparams, x)
    # the same integer arithmetic with the loops unrolled by hand (scan slices, where for cond)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(compressed(_unrolled))(qparams, x)), rtol=1e-6, atol=1e-6)
    # one s8 dot in the scan body, one per cond branch, one in the while body
    assert count_s8_contractions(_hlo(looped, qparams, x), "dot") == 4


def test_weight_in_a_loop_carry_is_dequantized_correctly():
    def fn(params, x):
        # the weight changes every iteration (a true carry; an unchanged one jax hoists to a const)
        body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ c[2]), c[2] * 1.01)
        return jax.lax.while_loop(lambda c: c[0] < 2, body, (0, x, params["w"]))[1]

    qparams, _ = jc.quantize_params({"w": _normal(1, (8, 8))}, _rule(pattern="w", activation="dynamic"))
    x = _normal(2, (2, 8))
    out = jax.jit(compressed(fn))(qparams, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(fn(jc.dequantize_params(qparams), x)), rtol=1e-5, atol=1e-5)


def test_unsupported_raises_naming_primitive_and_leaf_or_dequantizes():
    model, x = nn.Conv(4, (3, 3)), _normal(1, (1, 5, 5, 2))
    params = model.init(jax.random.key(0), x)
    rules = [jc.QuantRule(pattern=".*kernel", channel_axes=(0, 3), activation="dynamic")]
    qparams, _ = jc.quantize_params(params, rules)
    with pytest.raises(UnsupportedQuantizedOp, match=r"args\[0\]\['params'\]\['kernel'\].*conv_general_dilated"):
        compressed(model.apply)(qparams, x)
    out = jax.jit(compressed(model.apply, on_unsupported="dequantize"))(qparams, x)
    ref = model.apply(jc.dequantize_params(qparams), x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_static_without_scale_is_an_error_naming_the_leaf():
    model, x = nn.Dense(3), _normal(1, (2, 4))
    _, qparams = _quantized(model, x, activation="static")
    with pytest.raises(ValueError, match=r"\['kernel'\].*calibrate_activations"):
        compressed(model.apply)(qparams, x)


def test_activation_spec_validation_and_passthrough():
    with pytest.raises(ValueError, match="activation"):
        jc.QuantSpec(activation="int4")
    with pytest.raises(ValueError, match="qtype='int'"):
        jc.QuantSpec(qtype="float8_e4m3fn", activation="dynamic")
    q = jc.quantize(np.ones((4, 2), np.float32), channel_axes=(-1,), activation="dynamic")
    assert q.activation == "dynamic" and q.activation_scale is None
    assert jc.QuantSpec(activation="static").describe().endswith("a8-static")
    assert jc.QuantSpec().describe() == "int8 per-tensor sym absmax"
