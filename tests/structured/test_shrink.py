"""`shrink`: the shrunk model computes what the masked dense model computes, and is smaller."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxcompress.checkpoint.analysis import cost_analysis
from jaxcompress.structured import analyze_channels, channel_masks, shrink
from tests.structured import models

IMAGE = (2, 8, 8, 3)


def _setup(model, shape, seed=0):
    x = jax.random.normal(jax.random.key(seed + 1), shape, jnp.float32)
    # Shapes only (eval_shape): every leaf gets random values anyway, and a real init compiles slowly.
    variables = models.randomize(jax.eval_shape(model.init, jax.random.key(seed), x), seed)
    return variables, x


def _random_keep(n, rng, fraction=0.5):
    keep = np.ones(n, bool)
    keep[rng.choice(n, int(round(fraction * n)), replace=False)] = False
    return keep


def _check(model, small_model, variables, x, keep, **options):
    result = shrink(model.apply, variables, keep, x, **options)
    expected = jax.jit(model.apply)(model.reference(variables, keep), x)
    actual = jax.jit(small_model(result.features).apply)(result.params, x)
    chex.assert_trees_all_close(actual, expected, atol=1e-4, rtol=1e-4)
    return result


CASES = {
    "conv_bn_chain": (
        models.ConvBNChain(),
        lambda f: models.ConvBNChain(features=(f["params/Conv_0"], f["params/Conv_1"])),
        IMAGE,
        ["params/Conv_0/kernel", "params/Conv_1/kernel"],
    ),
    "dense_stack": (
        models.DenseStack(),
        lambda f: models.DenseStack(features=(f["params/Dense_0"], f["params/Dense_1"])),
        (3, 7),
        ["params/Dense_0/kernel", "params/Dense_1/kernel"],
    ),
    "depthwise_separable": (
        models.DepthwiseSeparable(),
        lambda f: models.DepthwiseSeparable(stem=f["params/Conv_0"], pointwise=f["params/Conv_2"]),
        IMAGE,
        ["params/Conv_0/kernel", "params/Conv_2/kernel"],
    ),
    "concat": (
        models.Concat(),
        lambda f: models.Concat(left=f["params/Conv_0"], right=f["params/Conv_1"], mixed=f["params/Conv_2"]),
        IMAGE,
        ["params/Conv_0/kernel", "params/Conv_1/kernel", "params/Conv_2/kernel"],
    ),
    "flatten_cnn": (
        models.FlattenCNN(),
        lambda f: models.FlattenCNN(features=(f["params/Conv_0"], f["params/Conv_1"]), hidden=f["params/Dense_0"]),
        IMAGE,
        ["params/Conv_0/kernel", "params/Conv_1/kernel", "params/Dense_0/kernel"],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_shrunk_equals_masked_dense(name):
    model, small, shape, producers = CASES[name]
    variables, x = _setup(model, shape)
    rng = np.random.default_rng(0)
    flat = dict(_paths(variables))
    keep = {p: _random_keep(flat[p].shape[-1], rng) for p in producers}
    result = _check(model, small, variables, x, keep)
    for p in producers:
        assert result.features[p.rsplit("/", 1)[0]] == keep[p].sum()
    assert result.size_after < result.size_before


def _paths(variables):
    from jaxcompress.rules import path_to_str

    return [(path_to_str(p), v) for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]]


def test_batchnorm_and_batch_stats_follow_their_conv():
    model = models.ConvBNChain()
    variables, x = _setup(model, IMAGE)
    keep = {"params/Conv_0/kernel": np.arange(8) % 2 == 0, "params/Conv_1/kernel": np.arange(12) < 9}
    result = _check(model, CASES["conv_bn_chain"][1], variables, x, keep)
    kept0 = np.flatnonzero(keep["params/Conv_0/kernel"])
    for collection, name in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var")):
        np.testing.assert_array_equal(result.params[collection]["BatchNorm_0"][name], variables[collection]["BatchNorm_0"][name][kept0])
    np.testing.assert_array_equal(result.params["params"]["Conv_0"]["bias"], variables["params"]["Conv_0"]["bias"][kept0])
    np.testing.assert_array_equal(
        result.params["params"]["Conv_1"]["kernel"], variables["params"]["Conv_1"]["kernel"][:, :, kept0][..., :9]
    )
    assert result.shapes["params/Dense_0/kernel"] == ((12, 5), (9, 5))


def _resnet_small(f):
    return models.ResNet(stem=f.get("params/Conv_0", 8), inner=(f.get("params/Conv_1", 8), f.get("params/Conv_3", 8)))


def test_residual_group_pruned_jointly():
    model = models.ResNet()
    variables, x = _setup(model, IMAGE)
    stream = np.array([True, False, True, True, False, True, False, True])
    inner = np.array([False, True, True, True, True, True, True, False])
    keep = {
        "params/Conv_0/kernel": stream, "params/Conv_2/kernel": stream, "params/Conv_4/kernel": stream,
        "params/Conv_1/kernel": inner, "params/Conv_3/kernel": np.ones(8, bool),
    }
    result = _check(model, _resnet_small, variables, x, keep)
    assert result.features == {
        "params/Conv_0": 5, "params/Conv_1": 6, "params/Conv_2": 5, "params/Conv_4": 5,
    }
    # A mask on one member of the residual group is enough: the others follow it.
    only_stem = shrink(model.apply, variables, {"params/Conv_0/kernel": stream}, x)
    assert only_stem.features == {"params/Conv_0": 5, "params/Conv_2": 5, "params/Conv_4": 5}
    assert only_stem.shapes["params/Dense_0/kernel"] == ((8, 5), (5, 5))
    assert only_stem.shapes["batch_stats/BatchNorm_4/mean"] == ((8,), (5,))


def test_misaligned_residual_masks_rejected_or_aligned():
    model = models.ResNet()
    variables, x = _setup(model, IMAGE)
    a = np.array([True, False] * 4)
    b = np.array([True, True, False, False] * 2)
    keep = {"params/Conv_0/kernel": a, "params/Conv_2/kernel": b}
    with pytest.raises(ValueError, match=r"disagree.*params/Conv_0/kernel, params/Conv_2/kernel.*align="):
        shrink(model.apply, variables, keep, x)
    union = shrink(model.apply, variables, keep, x, align="union")
    assert union.features["params/Conv_0"] == int((a | b).sum()) == 6
    np.testing.assert_array_equal(union.kept["params/Conv_4/kernel"][3], np.flatnonzero(a | b))
    intersection = shrink(model.apply, variables, keep, x, align="intersection")
    assert intersection.features["params/Conv_0"] == int((a & b).sum()) == 2
    # The aligned result is exact against the reference with the aligned masks.
    aligned = {p: a & b for p in ("params/Conv_0/kernel", "params/Conv_2/kernel", "params/Conv_4/kernel")}
    aligned.update({p: np.ones(8, bool) for p in ("params/Conv_1/kernel", "params/Conv_3/kernel")})
    expected = model.apply(model.reference(variables, aligned), x)
    chex.assert_trees_all_close(_resnet_small(intersection.features).apply(intersection.params, x), expected, atol=1e-4)
    with pytest.raises(ValueError, match="align must be one of"):
        shrink(model.apply, variables, keep, x, align="max")


def test_output_layer_cannot_shrink():
    model = models.DenseStack()
    variables, x = _setup(model, (3, 7))
    with pytest.raises(ValueError, match=r"params/Dense_2/kernel.*output of the model"):
        shrink(model.apply, variables, {"params/Dense_2/kernel": np.arange(5) < 3}, x)


def test_layernorm_over_channels_is_unshrinkable():
    import flax.linen as nn

    class WithLayerNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm()(nn.Dense(8)(x))
            return nn.Dense(3)(h)

    model = WithLayerNorm()
    variables, x = _setup(model, (2, 4))
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel.*params/LayerNorm_0/scale.*reduces over a channel axis"):
        shrink(model.apply, variables, {"Dense_0/kernel": np.arange(8) < 4}, x)
    assert not analyze_channels(model.apply, variables, x).shrinkable("params/Dense_0/kernel")
    assert "params/Dense_0/kernel" not in channel_masks(model.apply, variables, x, sparsity=0.5)


def test_reshape_mixing_channels_is_unshrinkable():
    def fn(params, x):
        h = x @ params["a"]
        h = h.reshape(h.shape[0], 4, 2).transpose(0, 2, 1).reshape(h.shape[0], 8)  # interleaves channels
        return h @ params["b"]

    params = {"a": jnp.ones((3, 8)), "b": jnp.ones((8, 2))}
    with pytest.raises(ValueError, match=r"cannot remove channels of a.*splits a channel axis"):
        shrink(fn, params, {"a": np.arange(8) < 4}, jnp.ones((1, 3)))


def test_mask_errors_name_the_leaf():
    model = models.DenseStack()
    variables, x = _setup(model, (3, 7))
    with pytest.raises(ValueError, match=r"Dense_0/kernel.*shape \(16,\)"):
        shrink(model.apply, variables, {"params/Dense_0/kernel": np.ones(3, bool)}, x)
    with pytest.raises(ValueError, match=r"masks\['Nope/kernel'\]: no leaf"):
        shrink(model.apply, variables, {"Nope/kernel": np.ones(3, bool)}, x)
    with pytest.raises(ValueError, match=r"remove every index"):
        shrink(model.apply, variables, {"Dense_0/kernel": np.zeros(16, bool)}, x)
    with pytest.raises(ValueError, match=r"not a filter mask"):
        shrink(model.apply, variables, {"Dense_0/kernel": np.eye(7, 16, dtype=bool)}, x)


def test_filter_mask_tree_from_structured_mask():
    from jaxcompress import structured_mask

    model = models.DenseStack()
    variables, x = _setup(model, (3, 7))
    kernel = variables["params"]["Dense_0"]["kernel"]
    masks = {"params": {"Dense_0": {"kernel": structured_mask(jnp.abs(kernel), 0.25, axis=-1), "bias": None}}}
    result = shrink(model.apply, variables, masks, x)
    assert result.features == {"params/Dense_0": 12}


def test_channel_masks_align_groups_and_hit_the_fraction():
    model = models.ResNet()
    variables, x = _setup(model, IMAGE)
    masks = channel_masks(model.apply, variables, x, sparsity=0.5)
    assert set(masks) == {f"params/Conv_{i}/kernel" for i in range(5)}  # the classifier stays
    for p in ("params/Conv_2/kernel", "params/Conv_4/kernel"):
        np.testing.assert_array_equal(masks[p], masks["params/Conv_0/kernel"])
    assert all(m.sum() == 4 for m in masks.values())
    # Group score = sum of the members' filter L1 norms.
    kernels = [variables["params"][f"Conv_{i}"]["kernel"] for i in (0, 2, 4)]
    score = sum(np.abs(np.asarray(k)).sum(axis=(0, 1, 2)) for k in kernels)
    np.testing.assert_array_equal(masks["params/Conv_0/kernel"], score >= np.sort(score)[4])
    result = shrink(model.apply, variables, masks, x)
    expected = model.apply(model.reference(variables, masks), x)
    chex.assert_trees_all_close(_resnet_small(result.features).apply(result.params, x), expected, atol=1e-4)


def _dense_flops(sizes, batch):
    return sum(2 * batch * a * b for a, b in zip(sizes[:-1], sizes[1:]))


def test_flops_drop_in_proportion():
    model = models.DenseStack(features=(64, 64))
    variables, x = _setup(model, (16, 32))
    keep = {"Dense_0/kernel": np.arange(64) < 32, "Dense_1/kernel": np.arange(64) < 16}
    result = shrink(model.apply, variables, keep, x)
    small = models.DenseStack(features=(32, 16))
    before = cost_analysis(model.apply, variables, x).flops
    after = cost_analysis(small.apply, result.params, x).flops
    expected = _dense_flops((32, 32, 16, 5), 16) / _dense_flops((32, 64, 64, 5), 16)
    assert abs(after / before - expected) < 0.1 * expected, (after / before, expected)

    conv = models.ConvBNChain(features=(16, 16))
    variables, x = _setup(conv, (2, 16, 16, 3))
    keep = channel_masks(conv.apply, variables, x, sparsity=0.5)
    result = shrink(conv.apply, variables, keep, x)
    small = models.ConvBNChain(features=(8, 8))
    before = cost_analysis(conv.apply, variables, x).flops
    after = cost_analysis(small.apply, result.params, x).flops
    conv_flops = lambda a, b: 2 * 16 * 16 * 9 * (3 * a + a * b)  # the two convolutions dominate
    expected = conv_flops(8, 8) / conv_flops(16, 16)
    assert abs(after / before - expected) < 0.15 * expected, (after / before, expected)


def test_nnx_split_merge():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, hidden, rngs):
            self.up = nnx.Linear(6, hidden, rngs=rngs)
            self.norm = nnx.BatchNorm(hidden, use_running_average=True, rngs=rngs)
            self.down = nnx.Linear(hidden, 3, rngs=rngs)

        def __call__(self, x):
            return self.down(nnx.relu(self.norm(self.up(x))))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: MLP(10, nnx.Rngs(0))))
    state = models.randomize(state, 1)
    x = jax.random.normal(jax.random.key(2), (4, 6))
    apply = lambda state, x: nnx.merge(graphdef, state)(x)
    keep = np.array([True, False] * 5)
    result = shrink(apply, state, {"up/kernel": keep}, x)
    assert result.features == {"up": 5}
    assert result.shapes["norm/mean"] == ((10,), (5,)) and result.shapes["down/kernel"] == ((10, 3), (5, 3))
    small_graphdef, _ = nnx.split(nnx.eval_shape(lambda: MLP(result.features["up"], nnx.Rngs(0))))
    small = nnx.merge(small_graphdef, result.params)
    reference_state = jax.tree_util.tree_map(lambda v: v, state)
    reference_state["down"]["kernel"][...] = state["down"]["kernel"][...] * keep[:, None]
    chex.assert_trees_all_close(small(x), apply(reference_state, x), atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(st.lists(st.booleans(), min_size=12, max_size=12), st.lists(st.booleans(), min_size=9, max_size=9))
def test_dense_stack_any_masks(first, second):
    """Invariant: for every non-empty pair of masks, shrunk == masked dense."""
    first, second = np.array(first), np.array(second)
    if not first.any() or not second.any():
        return
    model = models.DenseStack(features=(12, 9))
    variables, x = _setup(model, (3, 7))
    keep = {"params/Dense_0/kernel": first, "params/Dense_1/kernel": second}
    _check(model, lambda f: models.DenseStack(features=(f.get("params/Dense_0", 12), f.get("params/Dense_1", 9))),
           variables, x, keep)


def test_nested_calls_are_walked():
    """jit (pjit), custom_jvp (relu), custom_vjp and remat bodies carry the coupling through."""

    @jax.custom_vjp
    def scale(x):
        return 2.0 * x

    scale.defvjp(lambda x: (scale(x), None), lambda _, g: (2.0 * g,))

    @jax.jit
    def block(h, bias):
        return jax.nn.relu(h + bias)

    def fn(params, x):
        h = block(x @ params["a"]["kernel"], params["a"]["bias"])
        h = jax.checkpoint(lambda h: scale(h) * params["s"])(h)
        return h @ params["b"]["kernel"]

    rng = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.asarray(rng.standard_normal((3, 6)), jnp.float32), "bias": jnp.ones(6)},
              "s": jnp.arange(6.0), "b": {"kernel": jnp.asarray(rng.standard_normal((6, 2)), jnp.float32)}}
    x = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    keep = np.array([True, True, False, True, False, True])
    result = shrink(fn, params, {"a/kernel": keep}, x)
    assert {p: s[1] for p, s in result.shapes.items()} == {
        "a/kernel": (3, 4), "a/bias": (4,), "s": (4,), "b/kernel": (4, 2)}
    reference = dict(params, b={"kernel": params["b"]["kernel"] * keep[:, None]})
    chex.assert_trees_all_close(fn(result.params, x), fn(reference, x), atol=1e-5)


def test_coupled_members_listed():
    model = models.ResNet()
    variables, x = _setup(model, IMAGE)
    coupling = analyze_channels(model.apply, variables, x)
    members = coupling.members(coupling.out_classes("params/Conv_0/kernel")[:1])
    for expected in ("params/Conv_0/kernel[axis 3]", "params/Conv_2/kernel[axis 3]", "params/Conv_4/kernel[axis 3]",
                     "params/Conv_1/kernel[axis 2]", "params/Conv_3/kernel[axis 2]", "params/Dense_0/kernel[axis 0]",
                     "batch_stats/BatchNorm_4/var[axis 0]", "params/BatchNorm_2/scale[axis 0]"):
        assert expected in members, (expected, members)
    assert not any(m.startswith("params/Conv_1/kernel[axis 3]") for m in members)
