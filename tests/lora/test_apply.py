"""`lora_apply`: the adapted dot / conv against float64 NumPy references, on quantized and float bases."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.lora import LoraAdapter, LoraRule, LoraTargetError, lora_apply, lora_init, merge_lora


def _random_b(adapters, key):
    """Adapters with a nonzero B (a fresh adapter is the identity update)."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters, is_leaf=lambda x: isinstance(x, LoraAdapter))
    out = []
    for i, adapter in enumerate(leaves):
        b = 0.3 * jax.random.normal(jax.random.fold_in(key, i), adapter.b.shape)
        out.append(LoraAdapter(adapter.a, b, adapter.alpha, adapter.output_axes, adapter.stacked_axes))
    return jax.tree_util.tree_unflatten(treedef, out)


def _reference_kernel(leaf, adapter):
    """float64 NumPy ``W + (alpha / r) A @ B``."""
    w = np.asarray(leaf.dequantize(jnp.float32) if isinstance(leaf, jc.QArray) else leaf, np.float64)
    delta = np.asarray(adapter.a, np.float64) @ np.asarray(adapter.b, np.float64) * adapter.alpha / adapter.rank
    return w + delta.reshape(w.shape)


@pytest.mark.parametrize(
    "spec",
    [
        dict(bits=8, channel_axes=(-1,)),
        dict(bits=4, channel_axes=(-1,), group_size=4),
        dict(bits=4, channel_axes=(-1,), symmetric=False),
        dict(qtype="nf4", channel_axes=(-1,), group_size=4),
    ],
    ids=["int8", "int4-g4", "int4-asym", "nf4-g4"],
)
def test_dense_matches_float64_reference_on_quantized_base(spec):
    model = nn.Sequential([nn.Dense(12), nn.relu, nn.Dense(5)])
    x = jax.random.normal(jax.random.key(0), (3, 16))
    params = model.init(jax.random.key(1), x)
    qbase, _ = jc.quantize_params(params, [jc.QuantRule(pattern=".*kernel", **spec)])
    adapters = _random_b(lora_init(jax.random.key(2), qbase, LoraRule(pattern=".*kernel"), rank=3, alpha=6.0), jax.random.key(3))
    got = jax.jit(lora_apply(model.apply))(qbase, adapters, x)

    layers = qbase["params"]
    h = np.asarray(x, np.float64)
    for i, name in enumerate(("layers_0", "layers_2")):
        kernel = _reference_kernel(layers[name]["kernel"], adapters["params"][name]["kernel"])
        h = h @ kernel + np.asarray(layers[name]["bias"], np.float64)
        if i == 0:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(np.asarray(got), h, rtol=1e-4, atol=1e-4)


def test_einsum_kernels_with_two_output_axes_and_transposed_use():
    # (in, heads, head_dim) query kernel contracted over `in`; an (heads, head_dim, out) output
    # kernel contracted over two axes, written with the kernel operand on the LEFT of the einsum.
    params = {
        "query": jax.random.normal(jax.random.key(0), (8, 2, 3)),
        "out": jax.random.normal(jax.random.key(1), (2, 3, 8)),
    }

    def fn(p, x):
        q = jnp.einsum("bi,ihd->bhd", x, p["query"])
        return jnp.einsum("hdo,bhd->ob", p["out"], q)

    qbase, _ = jc.quantize_params(params, [jc.QuantRule(pattern=".*", bits=8, channel_axes=(0,))])
    rules = [LoraRule(pattern="query", output_axes=2), LoraRule(pattern="out", output_axes=1)]
    adapters = _random_b(lora_init(jax.random.key(2), qbase, rules, rank=2), jax.random.key(3))
    got = jax.jit(lora_apply(fn))(qbase, adapters, x := jax.random.normal(jax.random.key(4), (4, 8)))
    query = _reference_kernel(qbase["query"], adapters["query"])
    out = _reference_kernel(qbase["out"], adapters["out"])
    q = np.einsum("bi,ihd->bhd", np.asarray(x, np.float64), query)
    np.testing.assert_allclose(np.asarray(got), np.einsum("hdo,bhd->ob", out, q), rtol=1e-4, atol=1e-4)
    # The factorised term is used: no dense update (A @ B: f32[8,6] / f32[6,8]) is built.
    text = str(jax.make_jaxpr(lora_apply(fn))(qbase, adapters, x))
    assert "f32[8,6]" not in text and "f32[6,8]" not in text and "f32[4,2]" in text
    # A kernel used along axes that are not its input axes (W.T) takes the dense-update path, still exact.
    flipped = lambda p, x: jnp.einsum("bo,ihd->bihd", x[:, :2], p["query"]).sum((2, 3))
    got = jax.jit(lora_apply(flipped))(qbase, adapters, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(flipped(merge_lora(qbase, adapters), x)), rtol=1e-4, atol=1e-4)


def test_conv_matches_merged_reference():
    model = nn.Conv(6, (3, 3), padding="SAME")
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
    params = model.init(jax.random.key(1), x)
    qbase, _ = jc.quantize_params(params, [jc.QuantRule(pattern=".*kernel", bits=8, channel_axes=(-1,))])
    adapters = _random_b(lora_init(jax.random.key(2), qbase, LoraRule(pattern=".*kernel"), rank=2), jax.random.key(3))
    assert adapters["params"]["kernel"].a.shape == (36, 2)
    got = jax.jit(lora_apply(model.apply))(qbase, adapters, x)
    kernel = _reference_kernel(qbase["params"]["kernel"], adapters["params"]["kernel"])
    want = jax.jit(model.apply)({"params": {"kernel": jnp.asarray(kernel, jnp.float32), "bias": qbase["params"]["bias"]}}, x)
    # factorised: a rank-2 conv then a (2, 6) projection, no dense (3, 3, 4, 6) update
    text = str(jax.make_jaxpr(lora_apply(model.apply))(qbase, adapters, x))
    assert "f32[2,7,7,2]" in text and "f32[36,6]" not in text
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_untrained_adapters_leave_the_function_unchanged_and_base_stays_quantized():
    model = nn.Dense(4)
    x = jnp.ones((2, 8))
    params = model.init(jax.random.key(0), x)
    qbase, _ = jc.quantize_params(params, [jc.QuantRule(pattern=".*kernel", bits=4, channel_axes=(-1,))])
    adapters = lora_init(jax.random.key(1), qbase, LoraRule(pattern=".*kernel"), rank=2)
    np.testing.assert_array_equal(
        np.asarray(lora_apply(model.apply)(qbase, adapters, x)), np.asarray(jc.compressed(model.apply, policy="weight_only")(qbase, x))
    )
    # The compiled program takes the base as int4 codes (no float copy of the kernel is an input).
    hlo = jax.jit(lora_apply(model.apply)).lower(qbase, adapters, x).compile().as_text()
    assert "s4[8,4]" in hlo


def test_float_base_and_nnx_module():
    module = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    forward = lambda state, x: nnx.merge(graphdef, state)(x)
    adapters = _random_b(lora_init(jax.random.key(1), state, LoraRule(pattern="kernel"), rank=2), jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (5, 6))
    got = jax.jit(lora_apply(forward))(state, adapters, x)
    kernel = _reference_kernel(np.asarray(state["kernel"][...]), adapters["kernel"])
    want = np.asarray(x, np.float64) @ kernel + np.asarray(state["bias"][...], np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=5, deadline=None)
@given(
    batch=st.integers(1, 3),
    fan_in=st.integers(1, 6),
    fan_out=st.integers(1, 5),
    rank=st.integers(1, 4),
    kernel_left=st.booleans(),
)
def test_factorised_term_equals_the_dense_update(batch, fan_in, fan_out, rank, kernel_left):
    """Invariant: (x @ A) @ B laid out as the dot's output equals x against the dense update."""
    w = jax.random.normal(jax.random.key(fan_in * 7 + fan_out), (fan_in, fan_out))
    a = jax.random.normal(jax.random.key(1), (fan_in, rank))
    b = jax.random.normal(jax.random.key(2), (rank, fan_out))
    adapters = {"w": LoraAdapter(a, b, alpha=2.0)}
    x = jax.random.normal(jax.random.key(3), (batch, fan_in))
    fn = (lambda p, x: jnp.einsum("io,bi->ob", p["w"], x)) if kernel_left else (lambda p, x: x @ p["w"])
    got = lora_apply(fn)({"w": w}, adapters, x)
    dense = np.asarray(w, np.float64) + np.asarray(a, np.float64) @ np.asarray(b, np.float64) * 2.0 / rank
    want = np.asarray(x, np.float64) @ dense
    np.testing.assert_allclose(np.asarray(got), want.T if kernel_left else want, rtol=1e-4, atol=1e-4)


def test_rule_on_a_non_kernel_and_an_adapted_gather_name_the_leaf():
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "embed": jnp.ones((10, 4))}
    with pytest.raises(LoraTargetError, match="dense/bias"):
        lora_init(jax.random.key(0), params, LoraRule(pattern=".*"))
    with pytest.raises(LoraTargetError, match="params/ids.*not a float kernel"):
        lora_init(jax.random.key(0), {"ids": jnp.arange(6).reshape(2, 3)}, LoraRule(pattern="ids"))
    adapters = lora_init(jax.random.key(0), params, LoraRule(pattern="embed"))
    fn = lambda p, ids: p["embed"][ids] @ p["dense"]["kernel"]
    with pytest.raises(LoraTargetError, match=r"\['embed'\].*gather"):
        lora_apply(fn)(params, adapters, jnp.array([1, 2]))
    wrong = {"dense": {"kernel": LoraAdapter(jnp.ones((5, 2)), jnp.zeros((2, 3)))}}
    with pytest.raises(LoraTargetError, match=r"\['dense'\]\['kernel'\].*expected a \(4, 2\)"):
        lora_apply(fn)(params, wrong, jnp.array([1, 2]))
    with pytest.raises(LoraTargetError, match="missing"):
        lora_apply(fn)(params, {"missing": LoraAdapter(jnp.ones((4, 1)), jnp.zeros((1, 3)))}, jnp.array([1]))
