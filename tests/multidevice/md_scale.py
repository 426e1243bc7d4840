"""Scale: every transform on NamedSharding'd params of a 2-D ('data', 'model') mesh of 8 virtual
CPU devices (run through tests/test_multidevice.py, which sets XLA_FLAGS before jax is imported).

The params are a transformer block with Megatron-style tensor parallelism (query/key/value and
MLP-up kernels split along their output axis over 'model', attention-out and MLP-down along their
input axis) followed by an MLP head sharded FSDP + TP (kernels split over BOTH mesh axes). For
`quantize_params`, `fake_quant`, `prune` (every method), `qat` and `compressed` we check that

* the outputs keep the shardings: masks like their param, `QArray` values like their param and
  scales like the param along the per-channel / per-group axes;
* the compiled train / inference step holds NO all-gather whose result is as large as a full
  kernel (`full_param_gathers`). FSDP itself all-gathers one 'data' slice of the head's kernels
  for each matmul (a (64, 32) piece of a (64, 128) kernel): that is the FSDP algorithm, not the
  library, and those gathers are smaller than any full kernel, so they are not flagged.

No method needs a full-parameter gather: top-k thresholds are found by bisection on counts (scalar
all-reduces), N:M works inside groups of M consecutive weights (local unless a group straddles a
shard boundary, which M | shard size rules out), filter / channel / block scores are partial sums
plus an all-reduce of the (small) per-unit vector, random scores are generated shard-locally
(jax's partitionable threefry), SET / RigL are two more bisections, and `qat`'s ranges are
per-channel / per-group reductions. See docs/scaling.md.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxcompress as jc
import jaxcompress.pruning as jp

D, F, H, HEAD_F = 64, 256, 4, 128  # model width, block MLP width, heads, head MLP width
B, T = 4, 8

SPECS = {
    "block": {
        "ln1": {"scale": P()},
        "query": {"kernel": P(None, "model")},
        "key": {"kernel": P(None, "model")},
        "value": {"kernel": P(None, "model")},
        "out": {"kernel": P("model", None)},
        "ln2": {"scale": P()},
        "up": {"kernel": P(None, "model"), "bias": P("model")},
        "down": {"kernel": P("model", None), "bias": P()},
    },
    "head": {  # FSDP ('data') x TP ('model')
        "up": {"kernel": P("data", "model"), "bias": P("model")},
        "down": {"kernel": P("model", "data"), "bias": P()},
    },
}
KERNEL_SPECS = {
    f"{a}/{b}/kernel": spec["kernel"] for a, layer in SPECS.items() for b, spec in layer.items() if "kernel" in spec
}


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def host_params(seed=0):
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    return {
        "block": {
            "ln1": {"scale": np.ones(D, np.float32)},
            "query": {"kernel": w(D, D)},
            "key": {"kernel": w(D, D)},
            "value": {"kernel": w(D, D)},
            "out": {"kernel": w(D, D)},
            "ln2": {"scale": np.ones(D, np.float32)},
            "up": {"kernel": w(D, F), "bias": np.zeros(F, np.float32)},
            "down": {"kernel": w(F, D), "bias": np.zeros(D, np.float32)},
        },
        "head": {
            "up": {"kernel": w(D, HEAD_F), "bias": np.zeros(HEAD_F, np.float32)},
            "down": {"kernel": w(HEAD_F, D), "bias": np.zeros(D, np.float32)},
        },
    }


def shard(tree, mesh):
    return jax.tree.map(lambda x, spec: jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec)), tree, SPECS)


@pytest.fixture(scope="module")
def params(mesh):
    return shard(host_params(), mesh)


@pytest.fixture(scope="module")
def batch(mesh):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    y = rng.standard_normal((B, T, D)).astype(np.float32)
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", None, None)))  # noqa: E731
    return put(x), put(y)


def _norm(x, scale):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * scale


def model(params, x):
    """A pre-norm causal transformer block, then an MLP head (plain jax, flax-style names)."""
    p = params["block"]
    h = _norm(x, p["ln1"]["scale"])
    q, k, v = (
        (h @ p[name]["kernel"]).reshape(B, T, H, D // H) for name in ("query", "key", "value")
    )
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H)
    logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -1e9)
    attention = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(B, T, D)
    x = x + attention @ p["out"]["kernel"]
    h = jax.nn.gelu(_norm(x, p["ln2"]["scale"]) @ p["up"]["kernel"] + p["up"]["bias"])
    x = x + h @ p["down"]["kernel"] + p["down"]["bias"]
    head = params["head"]
    h = jax.nn.relu(x @ head["up"]["kernel"] + head["up"]["bias"])
    return h @ head["down"]["kernel"] + head["down"]["bias"]


def loss(params, x, y):
    return jnp.mean((model(params, x) - y) ** 2)


# ---- the HLO check ----------------------------------------------------------------------------

_GATHER = re.compile(r"=\s*\(?\s*\w+\[([\d,]*)\][^=]*?\ball-gather(-start)?\(")


def _elements(dims: str) -> int:
    return int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1


def full_param_gathers(hlo: str, params) -> list[str]:
    """all-gather instructions whose result holds at least as many elements as the smallest full
    kernel (a gathered kernel may come out reshaped or flattened, so shapes are not compared).
    The shapes here are chosen so that every legitimate gather (FSDP's per-matmul 'data' slice,
    activations) is smaller than that."""
    smallest = min(int(np.prod(x.shape)) for x in jax.tree.leaves(params) if x.ndim >= 2)
    return [line.strip()[:200] for line in hlo.splitlines() if (m := _GATHER.search(line)) and _elements(m.group(1)) >= smallest]


def all_reduce_sizes(hlo: str) -> list[int]:
    """Element counts of the results of every all-reduce (tuple results: each element)."""
    sizes = []
    for line in hlo.splitlines():
        match = re.search(r"=\s*(\(.*?\)|\w+\[[\d,]*\])\S*\s+all-reduce(-start)?\(", line)
        if match:
            sizes += [_elements(dims) for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1))]
    return sizes


def same_sharding(a, b):
    return a.sharding.is_equivalent_to(b.sharding, a.ndim)


def kernel_sharding(mesh, path):
    return NamedSharding(mesh, KERNEL_SPECS[path])


def scale_sharding(mesh, path, scale_shape):
    """A scale follows its kernel's sharding on every axis it keeps at full or grouped size."""
    spec = KERNEL_SPECS[path]
    return NamedSharding(mesh, P(*[name if size > 1 else None for name, size in zip(spec, scale_shape)]))


def test_detector_flags_a_full_kernel_gather(mesh, params):
    """The check can fail: a sort-based threshold on a sharded kernel gathers it."""
    w = params["head"]["up"]["kernel"]
    hlo = jax.jit(lambda w: jnp.abs(w) >= jnp.sort(jnp.abs(w).ravel())[4000]).lower(w).compile().as_text()
    assert full_param_gathers(hlo, params)
    # ... and the model's own forward + backward (FSDP slices only) passes it.
    hlo = jax.jit(jax.grad(loss)).lower(params, *_batch_placeholder(mesh)).compile().as_text()
    assert not full_param_gathers(hlo, params)


def _batch_placeholder(mesh):
    spec = jax.ShapeDtypeStruct((B, T, D), jnp.float32, sharding=NamedSharding(mesh, P("data", None, None)))
    return spec, spec


# ---- prune: every method ----------------------------------------------------------------------

KERNELS = r".*kernel"
# Kernels by layout: column-parallel (output axis on 'model'), row-parallel (input axis on
# 'model'), FSDP x TP (both axes sharded). Each config prunes each layout by another method, so
# one compilation checks three methods (compiling a sharded train step is what costs time here).
COLUMN, ROW, FSDP = r"block/(query|key|value|up)/kernel", r"block/(out|down)/kernel", r"head/.*/kernel"
CONFIGS = {
    "magnitude|random|saliency": dict(rules=[
        jp.PruneRule(pattern=COLUMN, sparsity=0.75),
        jp.PruneRule(pattern=ROW, sparsity=0.75, score="random"),
        jp.PruneRule(pattern=FSDP, sparsity=0.75, score="saliency"),
    ]),
    "n:m|filter|channel": dict(rules=[
        jp.PruneRule(pattern=COLUMN, structure="n:m", n=2, m=4),
        jp.PruneRule(pattern=ROW, structure="filter", sparsity=0.5),
        jp.PruneRule(pattern=FSDP, structure="channel", sparsity=0.5, norm="l2"),
    ]),
    "block|global|erk": dict(rules=[
        jp.PruneRule(pattern=COLUMN, structure="block", block_size=8, sparsity=0.5),
        jp.PruneRule(pattern=ROW, sparsity=0.75, scope="global", normalize="l2"),
        jp.PruneRule(pattern=FSDP, sparsity=0.75, distribution="erk"),
    ]),
    "filter|block|n:m": dict(rules=[  # structured methods on other layouts (n:m on FSDP x TP)
        jp.PruneRule(pattern=COLUMN, structure="filter", sparsity=0.5),
        jp.PruneRule(pattern=ROW, structure="block", block_size=8, sparsity=0.5),
        jp.PruneRule(pattern=FSDP, structure="n:m", n=2, m=4),
    ]),
    "set": dict(rules=jp.PruneRule(pattern=KERNELS, sparsity=0.75), dst=jp.SET(end_step=100, drop_fraction=0.3)),
    # RigL differs from SET only in its grow scores (|grad| instead of uniform noise, both
    # elementwise); md_pruning.py runs it through a sharded train step with the same HLO check.
}


def _kernel_paths(tree):
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jc.QArray))[0]
        if path[-1].key == "kernel"
    }


def _sparsity_of(rule):
    return 0.5 if rule.structure == "n:m" else rule.sparsity


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_prune_keeps_shardings_and_gathers_no_full_param(mesh, params, batch, config):
    config = CONFIGS[config]
    opt = jp.prune(optax.adamw(1e-2), config["rules"], update_every=1, dst=config.get("dst"))
    state = opt.init(params)

    def train_step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step).lower(params, state, *batch).compile()
    gathers = full_param_gathers(step.as_text(), params)
    assert not gathers, "the train step gathers a full param:\n" + "\n".join(gathers[:5])

    p, s = params, state
    for _ in range(2):  # step 0: masks by the rules; step 1: rules again or SET / RigL regrowth
        p, s = step(p, s, *batch)
    masks, new_params = _kernel_paths(s.masks), _kernel_paths(p)
    rules = config["rules"] if isinstance(config["rules"], list) else [config["rules"]]
    for rule in rules:
        matched = {path: old for path, old in _kernel_paths(params).items() if re.fullmatch(rule.pattern, path)}
        assert matched
        for path, old in matched.items():
            mask = masks[path]
            assert mask.dtype == jnp.bool_ and same_sharding(mask, old), (rule, path, mask.sharding)
            assert same_sharding(new_params[path], old), (rule, path)
            host_mask = np.asarray(mask)
            assert np.all(np.asarray(new_params[path])[~host_mask] == 0.0)
            if rule.scope == "layer" and rule.distribution == "uniform":  # exact per leaf
                assert host_mask.size - host_mask.sum() == round(_sparsity_of(rule) * host_mask.size)
            for moment in (s.inner_state[0].mu, s.inner_state[0].nu):
                assert same_sharding(_kernel_paths(moment)[path], old)
        total = sum(masks[path].size for path in matched)
        pruned = total - sum(int(np.asarray(masks[path]).sum()) for path in matched)
        if rule.scope == "global":
            assert pruned == round(rule.sparsity * total)
        elif rule.distribution == "erk":
            assert pruned / total == pytest.approx(rule.sparsity, abs=0.01)


def test_prune_params_one_shot_keeps_shardings_and_matches_one_device(mesh, params):
    rules = [
        jp.PruneRule(pattern="block/.*kernel", sparsity=0.6, scope="global", normalize="l2"),
        jp.PruneRule(pattern="head/.*kernel", structure="n:m", n=2, m=4),
    ]
    pruned, masks = jax.jit(lambda p: jp.prune_params(p, rules))(params)
    one_device = jax.device_put(jax.tree.map(np.asarray, params), jax.devices()[0])
    _, reference = jax.jit(lambda p: jp.prune_params(p, rules))(one_device)
    for path, mask in _kernel_paths(masks).items():
        assert same_sharding(mask, _kernel_paths(params)[path])
        assert same_sharding(_kernel_paths(pruned)[path], _kernel_paths(params)[path])
        np.testing.assert_array_equal(np.asarray(mask), np.asarray(_kernel_paths(reference)[path]))


# ---- global magnitude pruning: exact, counts only ---------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.987])
def test_global_threshold_is_exact_with_only_count_sized_all_reduces(mesh, params, sparsity):
    kernels = list(_kernel_paths(params).values())
    total = sum(k.size for k in kernels)
    keep = total - round(sparsity * total)
    f = jax.jit(lambda ws: jp.global_masks([jnp.abs(w) for w in ws], sparsity)).lower(kernels).compile()
    masks = f(kernels)
    kept = sum(int(np.asarray(m).sum()) for m in masks)
    assert kept == keep  # exactly k (so certainly within +-0.1% of the target sparsity)
    assert abs((total - kept) / total - sparsity) <= 1e-3
    for mask, kernel in zip(masks, kernels):
        assert same_sharding(mask, kernel)
    # The same set as a float64 NumPy sort of all scores (no ties among random float weights).
    scores = np.concatenate([np.abs(np.asarray(k, np.float64)).ravel() for k in kernels])
    threshold = np.sort(scores)[::-1][keep - 1]
    np.testing.assert_array_equal(np.concatenate([np.asarray(m).ravel() for m in masks]), scores >= threshold)
    hlo = f.as_text()
    assert "all-gather" not in hlo and "sort" not in hlo.lower().replace("sortable", "")
    sizes = all_reduce_sizes(hlo)
    # Counts only: the two-stage count (`pruning.topk.count_true`, which keeps XLA:CPU from
    # materialising an int32 copy of each kernel) all-reduces its per-chunk partial counts, a few
    # dozen int32s per pass whatever the parameter's size; never a gather of a parameter.
    smallest_shard = min(k.size // len(k.sharding.device_set) for k in kernels)
    assert sizes and max(sizes) <= 64 < smallest_shard, f"expected count-sized all-reduces, got element counts {sizes}"


def test_global_threshold_exact_with_ties_on_sharded_params(mesh, params):
    """Many exact zeros (already-pruned weights) tie at the threshold: still exactly k kept."""
    kernels = [jnp.where(jnp.abs(k) < 0.5, 0.0, k) for k in _kernel_paths(params).values()]
    kernels = [jax.device_put(k, w.sharding) for k, w in zip(kernels, _kernel_paths(params).values())]
    total = sum(k.size for k in kernels)
    zeros = sum(int((np.asarray(k) == 0).sum()) for k in kernels)
    sparsity = (zeros - 1000) / total  # the cut falls inside the zeros: ties must be split
    masks = jax.jit(lambda ws: jp.global_masks([jnp.abs(w) for w in ws], sparsity))(kernels)
    assert sum(int(np.asarray(m).sum()) for m in masks) == total - round(sparsity * total)


# ---- quantization: quantize_params, fake_quant, qat, compressed -------------------------------

QUANT_RULES = {
    "int8-channel": [jc.QuantRule(pattern=KERNELS, bits=8, channel_axes=(-1,), activation="dynamic")],
    "int4-g16": [jc.QuantRule(pattern=KERNELS, bits=4, channel_axes=(-1,), group_size=16, group_axis=0)],
}


def _check_qarray_shardings(mesh, qparams, params):
    for path, q in _kernel_paths(qparams).items():
        kernel = _kernel_paths(params)[path]
        assert isinstance(q, jc.QArray)
        assert same_sharding(q.logical_values, kernel), (path, q.values.sharding)  # codes may be stored (out, in)
        expected = scale_sharding(mesh, path, q.scale.shape)
        assert q.scale.sharding.is_equivalent_to(expected, 2), (path, q.scale.sharding, expected)


@pytest.mark.parametrize("which", list(QUANT_RULES))
def test_quantize_params_keeps_shardings(mesh, params, which):
    rules = QUANT_RULES[which]
    f = jax.jit(lambda p: jc.quantize_params(p, rules)[0]).lower(params).compile()
    qparams = f(params)
    _check_qarray_shardings(mesh, qparams, params)
    eager, _ = jc.quantize_params(params, rules)
    _check_qarray_shardings(mesh, eager, params)
    hlo = f.as_text()
    assert "all-gather" not in hlo
    dense = jc.dequantize_params(qparams)
    for path, x in _kernel_paths(dense).items():
        assert same_sharding(x, _kernel_paths(params)[path])


def test_fake_quant_forward_backward_keeps_shardings(mesh, params, batch):
    rules = QUANT_RULES["int4-g16"]
    f = jax.jit(jax.value_and_grad(lambda p, x, y: loss(jc.fake_quant(p, rules), x, y))).lower(params, *batch).compile()
    _, grads = f(params, *batch)
    for path, g in _kernel_paths(grads).items():
        assert same_sharding(g, _kernel_paths(params)[path])
    fq = jax.jit(lambda p: jc.fake_quant(p, rules))(params)
    for path, x in _kernel_paths(fq).items():
        assert same_sharding(x, _kernel_paths(params)[path])
    hlo = f.as_text()
    gathers = full_param_gathers(hlo, params)
    assert not gathers, "\n".join(gathers[:5])


def test_qat_of_prune_train_step_then_compressed_inference(mesh, params, batch):
    quant_rules = QUANT_RULES["int8-channel"]
    prune_rules = jp.PruneRule(pattern=KERNELS, sparsity=0.5)
    opt = jc.qat(jp.prune(optax.adamw(1e-2), prune_rules, update_every=1, end_step=2), quant_rules, freeze_step=3)
    state = opt.init(params)

    def train_step(params, state, x, y):
        grads = jax.grad(lambda p: loss(jc.fake_quant(p, quant_rules, ranges=jc.qat_ranges(state)), x, y))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step).lower(params, state, *batch).compile()
    gathers = full_param_gathers(step.as_text(), params)
    assert not gathers, "\n".join(gathers[:5])
    p, s = params, state
    for _ in range(4):
        p, s = step(p, s, *batch)
    for path, kernel in _kernel_paths(params).items():
        assert same_sharding(_kernel_paths(p)[path], kernel)
        lo, hi = jc.qat_ranges(s)[path]
        assert hi.sharding.is_equivalent_to(scale_sharding(mesh, path, hi.shape), 2), (path, hi.sharding)

    # Exact conversion, sharded like the params; integer inference on the mesh.
    qparams, _ = jc.quantize_params(p, quant_rules, ranges=jc.qat_ranges(s))
    _check_qarray_shardings(mesh, qparams, params)
    for path, q in _kernel_paths(qparams).items():
        assert np.all(np.asarray(q.logical_values)[np.asarray(_kernel_paths(p)[path]) == 0] == 0)  # pruned zeros stay 0
    infer = jax.jit(jc.compressed(model)).lower(qparams, batch[0]).compile()
    out = infer(qparams, batch[0])
    expected = jax.jit(model)(jc.fake_quant(p, quant_rules, ranges=jc.qat_ranges(s)), batch[0])
    assert out.sharding.is_equivalent_to(expected.sharding, 3)  # as the float model's output
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=0.05 * float(jnp.abs(expected).max()))
    hlo = infer.as_text()
    assert re.search(r"s32\[[\d,]*\][^\n]*(dot|convolution)\(", hlo) or "s8[" in hlo
    gathers = full_param_gathers(hlo, params)
    assert not gathers, "\n".join(gathers[:5])
    # the integer kernels enter the dots as their local shards: query's (64, 64) split 4-way on 'model'
    assert re.search(r"s8\[64,16\]", hlo), "column-parallel int8 kernel shard not in the program"


# ---- explicit mesh axes (jax.make_mesh's default) ---------------------------------------------


def test_explicit_axes_prune_and_quantize_keep_shardings():
    """With AxisType.Explicit jax refuses ops whose output sharding it cannot infer; every method
    must still give masks / QArrays sharded like the params (filter / channel masks used to come
    out replicated, and block pruning's reshape into tiles was refused)."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    params = shard(host_params(), mesh)
    rules = [
        jp.PruneRule(pattern=r"block/(query|up)/kernel", structure="filter", sparsity=0.5),
        jp.PruneRule(pattern=r"block/(key|out)/kernel", structure="block", block_size=8, sparsity=0.5),
        jp.PruneRule(pattern=r"block/(value|down)/kernel", structure="channel", sparsity=0.5),
        jp.PruneRule(pattern=r"head/up/kernel", structure="n:m", n=2, m=4),
        jp.PruneRule(pattern=r"head/down/kernel", sparsity=0.75, score="random"),
    ]
    opt = jp.prune(optax.sgd(0.1), rules, update_every=1)
    state = opt.init(params)
    _, state = jax.jit(opt.update)(params, state, params)  # the params stand in for gradients
    for path, mask in _kernel_paths(state.masks).items():
        assert mask.sharding.is_equivalent_to(_kernel_paths(params)[path].sharding, 2), (path, mask.sharding)
    qparams = jax.jit(lambda p: jc.quantize_params(p, QUANT_RULES["int4-g16"])[0])(params)
    _check_qarray_shardings(mesh, qparams, params)
