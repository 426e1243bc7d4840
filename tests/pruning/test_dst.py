import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import jaxcompress.pruning as jp
from jaxcompress.pruning.dst import drop_and_grow_many
from tests.pruning.helpers import data, loss, make_step, mlp_params, param_trees

KERNELS = [("l1", "kernel"), ("l2", "kernel")]
drop_grow = jax.jit(drop_and_grow_many)


@given(seed=st.integers(0, 10_000), fraction=st.floats(0, 1), density=st.floats(0.05, 0.95))
def test_drop_and_grow_invariants(seed, fraction, density):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(48).astype(np.float32)
    mask = rng.random(48) < density
    w = np.where(mask, w, 0.0).astype(np.float32)
    grow = np.abs(rng.standard_normal(48)).astype(np.float32)
    new = np.asarray(drop_grow([mask], [w], [grow], fraction)[0])
    active, k = mask.sum(), int(np.floor(np.float32(fraction) * np.float32(mask.sum())))
    assert new.sum() == active
    # reference: the active - k largest-magnitude active weights survive (ties to lower index) ...
    order = np.lexsort((np.arange(48), -np.where(mask, np.abs(w), -np.inf)))
    survivors = np.zeros(48, bool)
    survivors[order[: active - k]] = True
    assert np.all(new[survivors]), "a survivor was lost"
    dropped = mask & ~survivors
    if dropped.any() and survivors.any():
        assert np.abs(w[dropped]).max() <= np.abs(w[survivors]).min()
    # ... and the k grown positions (just-dropped ones may return) have the largest grow scores
    grown = new & ~survivors
    assert grown.sum() == k
    if k:
        assert grow[grown].min() >= np.sort(grow[~survivors])[::-1][k - 1]


def run_dst(dst, inner, steps=160, every=20):
    rule = jp.PruneRule(pattern=".*kernel", sparsity=0.75, distribution="erk")
    opt = jp.prune(inner, rule, update_every=every, dst=dst, seed=3)
    params, (x, y) = mlp_params(), data()
    state = opt.init(params)
    step, traces = make_step(opt)
    masks_seen = []
    for t in range(steps):
        params, state, _ = step(params, state, x, y)
        if t % every == 0:
            masks_seen.append(jax.tree.map(np.asarray, state.masks))
            for a, b in KERNELS:
                mask = np.asarray(state.masks[a][b])
                assert np.all(np.asarray(params[a][b])[~mask] == 0.0)
                for tree in param_trees(state.inner_state, params):
                    assert np.all(np.asarray(tree[a][b])[~mask] == 0.0)
    return params, state, masks_seen, traces, opt


@pytest.mark.parametrize("dst", [jp.SET(end_step=120, drop_fraction=0.3), jp.RigL(end_step=120, drop_fraction=0.3)], ids=["SET", "RigL"])
def test_dst_keeps_counts_changes_masks_and_stays_exact(dst):
    params, state, masks_seen, traces, _ = run_dst(dst, optax.adam(2e-2))
    assert traces[0] == 1
    for a, b in KERNELS:
        counts = [int(m[a][b].sum()) for m in masks_seen]
        assert len(set(counts)) == 1, f"{a}/{b}: active count changed {counts}"
        changes = [int((m1[a][b] != m2[a][b]).sum()) for m1, m2 in zip(masks_seen, masks_seen[1:])]
        assert sum(changes[:5]) > 0, "no drop/regrow happened"
        assert all(c == 0 for c in changes[6:]), f"masks changed after end_step: {changes}"
    total = sum(masks_seen[0][a][b].size for a, b in KERNELS)
    kept = sum(int(masks_seen[0][a][b].sum()) for a, b in KERNELS)
    assert abs((total - kept) - 0.75 * total) <= 2


def test_regrown_weights_start_at_zero_with_fresh_moments():
    """Give the inner optimizer non-zero moments everywhere, then do one RigL update step:
    dropped positions must end with zero moments and regrown ones with exactly a fresh moment."""
    inner = optax.sgd(0.1, momentum=0.9)
    dst = jp.RigL(end_step=1000, drop_fraction=0.5)
    opt = jp.prune(inner, jp.PruneRule(pattern=".*kernel", sparsity=0.5), update_every=5, dst=dst)
    params, (x, y) = mlp_params(), data()
    state = opt.init(params)
    step, _ = make_step(opt)
    params, state, _ = step(params, state, x, y)  # step 0: initial masks
    for _ in range(4):
        params, state, _ = step(params, state, x, y)
    old_masks = state.masks
    polluted = jax.tree.map(lambda t: t + 7.0, state.inner_state)  # stale momentum everywhere
    state = state._replace(inner_state=polluted)
    grads = jax.grad(loss)(params, x, y)
    updates, new_state = jax.jit(opt.update)(grads, state, params)  # step 5: drop / regrow
    new_params = optax.apply_updates(params, updates)
    trace = new_state.inner_state[0].trace
    for a, b in KERNELS:
        old, new = np.asarray(old_masks[a][b]), np.asarray(new_state.masks[a][b])
        regrown, dropped, kept = new & ~old, old & ~new, old & new
        assert regrown.sum() > 0 and regrown.sum() == dropped.sum()
        g = np.asarray(grads[a][b])
        np.testing.assert_array_equal(np.asarray(trace[a][b])[regrown], g[regrown])
        assert np.all(np.asarray(trace[a][b])[~new] == 0.0)
        np.testing.assert_allclose(np.asarray(trace[a][b])[kept], g[kept] + 0.9 * np.asarray(polluted[0].trace[a][b])[kept], rtol=1e-6)
        assert np.all(np.asarray(new_params[a][b])[~new] == 0.0)
        np.testing.assert_allclose(np.asarray(new_params[a][b])[regrown], -0.1 * g[regrown], rtol=1e-6)
        # RigL regrows where the dense gradient is largest among the inactive positions
        assert np.abs(g[regrown]).min() >= np.median(np.abs(g[~old]))


def custom_inner():
    """A made-up optimizer whose state is a dict with a param-shaped running max and a counter."""

    def init(params):
        return {"running": jax.tree.map(jnp.zeros_like, params), "calls": jnp.zeros((), jnp.int32)}

    def update(grads, state, params=None):
        running = jax.tree.map(lambda r, g: jnp.maximum(0.9 * r, jnp.abs(g)), state["running"], grads)
        updates = jax.tree.map(lambda g, r: -0.05 * g / (r + 1e-3), grads, running)
        return updates, {"running": running, "calls": state["calls"] + 1}

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("make_inner", [custom_inner, lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)], ids=["custom", "multisteps"])
def test_moments_found_in_any_inner_state(make_inner):
    params, state, _, _, _ = run_dst(jp.SET(end_step=100), make_inner(), steps=42)
    trees = param_trees(state.inner_state, params)
    assert trees, "no param-shaped state found"
    for tree in trees:
        for a, b in KERNELS:
            assert np.all(np.asarray(tree[a][b])[~np.asarray(state.masks[a][b])] == 0.0)


def test_dst_argument_errors():
    with pytest.raises(ValueError, match="constant"):
        jp.prune(optax.adam(1e-3), jp.PruneRule(pattern=".*", sparsity=jp.one_shot(0.5, 10)), dst=jp.SET(end_step=10))
    with pytest.raises(ValueError, match="unstructured"):
        jp.prune(optax.adam(1e-3), jp.PruneRule(pattern=".*", structure="n:m", n=2, m=4), dst=jp.RigL(end_step=10))
    with pytest.raises(ValueError, match="drop_fraction"):
        jp.SET(end_step=10, drop_fraction=1.5)
    with pytest.raises(ValueError, match="end_step"):
        jp.RigL(end_step=0)
