"""Pruning on a 2-D mesh of 8 virtual CPU devices (run via tests/test_multidevice.py).

Masks must shard like the params, and the layer-wise magnitude mask update must not gather a
full parameter: the bisection threshold only needs counts (all-reduce of a scalar), no sort.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxcompress.pruning as jp

SPECS = {
    "dense": {"kernel": P("data", "model"), "bias": P("model")},
    "out": {"kernel": P("model", None), "bias": P()},
}


@pytest.fixture(scope="module")
def mesh():
    auto = (jax.sharding.AxisType.Auto,) * 2  # GSPMD propagation (the common setting)
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)


@pytest.fixture(scope="module")
def params(mesh):
    rng = np.random.default_rng(0)
    host = {
        "dense": {"kernel": rng.standard_normal((64, 128)), "bias": rng.standard_normal(128)},
        "out": {"kernel": rng.standard_normal((128, 32)), "bias": np.zeros(32)},
    }
    return jax.tree.map(
        lambda x, spec: jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, spec)), host, SPECS
    )


def loss(params, x):
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.mean((h @ params["out"]["kernel"] + params["out"]["bias"]) ** 2)


def batch(mesh):
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    return jax.device_put(x, NamedSharding(mesh, P("data", None)))


def same_sharding(a, b):
    return a.sharding.is_equivalent_to(b.sharding, a.ndim)


def full_param_gathers(hlo: str, params) -> list[str]:
    """all-gather instructions whose result holds as many elements as a whole kernel (a sort of
    a sharded param gathers it, possibly reshaped, e.g. f32[8192] for a (64, 128) kernel)."""
    smallest = min(x.size for x in jax.tree.leaves(params) if x.ndim >= 2)
    found = []
    for line in hlo.splitlines():
        match = re.search(r"=\s*\(?\s*\w+\[([\d,]*)\][^=]*?\ball-gather(-start)?\(", line)
        if match:
            elements = int(np.prod([int(d) for d in match.group(1).split(",") if d])) if match.group(1) else 1
            if elements >= smallest:
                found.append(line.strip()[:160])
    return found


def test_gather_detector_flags_a_sort_based_top_k(mesh, params):
    """The check below can fail: a sort-based threshold on the same sharded kernel gathers it."""
    w = params["dense"]["kernel"]
    hlo = jax.jit(lambda w: jnp.abs(w) >= jnp.sort(jnp.abs(w).ravel())[4000]).lower(w).compile().as_text()
    assert full_param_gathers(hlo, params)


def test_eight_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("dst", [None, jp.RigL(end_step=1000)], ids=["magnitude", "rigl"])
def test_update_has_no_full_param_all_gather_and_masks_keep_sharding(mesh, params, dst):
    opt = jp.prune(optax.adamw(1e-2), jp.PruneRule(pattern=".*kernel", sparsity=0.8), update_every=1, dst=dst)
    state = opt.init(params)
    for path in (("dense", "kernel"), ("out", "kernel")):
        assert same_sharding(state.masks[path[0]][path[1]], params[path[0]][path[1]])
    x = batch(mesh)

    def train_step(params, state, x):
        grads = jax.grad(loss)(params, x)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, donate_argnums=())
    hlo = step.lower(params, state, x).compile().as_text()
    assert "all-reduce" in hlo, "expected the threshold counts to be all-reduced"
    gathers = full_param_gathers(hlo, params)
    assert not gathers, "the update gathers a full param:\n" + "\n".join(gathers[:5])

    p, s = params, state
    for _ in range(3):
        p, s = step(p, s, x)
    for a in ("dense", "out"):
        mask, param = s.masks[a]["kernel"], p[a]["kernel"]
        assert same_sharding(mask, params[a]["kernel"]) and same_sharding(param, params[a]["kernel"])
        host_mask = np.asarray(mask)
        assert host_mask.size - host_mask.sum() == round(0.8 * host_mask.size)  # exact, even sharded
        assert np.all(np.asarray(param)[~host_mask] == 0.0)
        for tree in (s.inner_state[0].mu, s.inner_state[0].nu):
            assert same_sharding(tree[a]["kernel"], params[a]["kernel"])
            assert np.all(np.asarray(tree[a]["kernel"])[~host_mask] == 0.0)


def test_sharded_masks_equal_single_device_masks(mesh, params):
    rules = [
        jp.PruneRule(pattern="dense/kernel", sparsity=0.7, scope="global", normalize="l2"),
        jp.PruneRule(pattern="out/kernel", sparsity=0.7, scope="global", normalize="l2"),
        jp.PruneRule(pattern="dense/bias", sparsity=0.5),
    ]
    pruned, masks = jp.prune_params(params, rules)
    host = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), params)
    _, host_masks = jax.jit(lambda p: jp.prune_params(p, rules))(jax.device_put(host, jax.devices()[0]))
    for a, b in (("dense", "kernel"), ("out", "kernel"), ("dense", "bias")):
        np.testing.assert_array_equal(np.asarray(masks[a][b]), np.asarray(host_masks[a][b]))
        assert same_sharding(masks[a][b], params[a][b]) and same_sharding(pruned[a][b], params[a][b])
    assert isinstance(masks["out"]["bias"], optax.MaskedNode)


def test_n_m_on_sharded_kernel(mesh, params):
    _, masks = jp.prune_params(params, jp.PruneRule(pattern="dense/kernel", structure="n:m", n=2, m=4))
    mask = masks["dense"]["kernel"]
    assert same_sharding(mask, params["dense"]["kernel"])
    assert np.all(np.asarray(mask).reshape(16, 4, 128).sum(1) == 2)
