import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress.pruning as jp
from tests.pruning import reference
from tests.pruning.helpers import data, make_step, mlp_params, param_trees

KERNELS = [("l1", "kernel"), ("l2", "kernel")]


def assert_masked(params, state, masks=None):
    masks = state.masks if masks is None else masks
    for a, b in KERNELS:
        mask = np.asarray(masks[a][b])
        assert np.all(np.asarray(params[a][b])[~mask] == 0.0), f"{a}/{b} drifted from zero"
        for tree in param_trees(state.inner_state, params):
            assert np.all(np.asarray(tree[a][b])[~mask] == 0.0), f"inner state of {a}/{b} not zero at pruned positions"


@pytest.mark.parametrize(
    "inner",
    [optax.adam(3e-2), optax.adamw(3e-2, weight_decay=0.1), optax.sgd(0.1, momentum=0.9)],
    ids=["adam", "adamw", "sgd_momentum"],
)
def test_gradual_pruning_exact_zeros_no_drift_one_compilation(inner):
    rule = jp.PruneRule(pattern=".*kernel", sparsity=jp.polynomial(0.8, begin_step=0, end_step=200, frequency=40))
    opt = jp.prune(inner, rule, update_every=40)
    params, (x, y) = mlp_params(), data()
    state = opt.init(params)
    step, traces = make_step(opt)
    history = []
    for t in range(300):
        old_masks = state.masks
        params, state, _ = step(params, state, x, y)
        if t % 40 == 0 or t == 299:
            assert_masked(params, state)
        changed = any(bool(jnp.any(old_masks[a][b] != state.masks[a][b])) for a, b in KERNELS)
        history.append(changed)
    assert traces[0] == 1 and step._cache_size() == 1, "the loop recompiled"
    assert [t for t, c in enumerate(history) if c] == [40, 80, 120, 160, 200], "masks changed off the update steps"
    for a, b in KERNELS:
        mask = np.asarray(state.masks[a][b])
        assert mask.size - mask.sum() == reference.n_pruned(0.8, mask.size)
    assert isinstance(state.masks["l1"]["bias"], optax.MaskedNode)
    assert float(jnp.abs(params["l1"]["bias"]).sum()) > 0


def test_first_update_prunes_and_inner_updates_are_zero_at_pruned_positions():
    opt = jp.prune(optax.adamw(1e-2, weight_decay=0.5), jp.PruneRule(pattern=".*kernel", sparsity=0.5))
    params, (x, y) = mlp_params(), data()
    state = opt.init(params)
    assert bool(state.masks["l1"]["kernel"].all())  # dense until the first update
    step, _ = make_step(opt)
    params, state, _ = step(params, state, x, y)
    assert_masked(params, state)
    assert int(state.masks["l1"]["kernel"].sum()) == 128
    params, state, grads = step(params, state, x, y)
    # the update of step 1 (the params of step 2 minus those of step 1) is zero where pruned
    new_params, _, _ = step(params, state, x, y)
    for a, b in KERNELS:
        mask = np.asarray(state.masks[a][b])
        u = np.asarray(new_params[a][b]) - np.asarray(params[a][b])
        assert np.all(u[~mask] == 0.0) and np.any(u[mask] != 0.0)


def composed(kind):
    rule = jp.PruneRule(pattern=".*kernel", sparsity=jp.one_shot(0.7, step=10))
    if kind == "inner_chain_inject":
        inner = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2))
        return jp.prune(inner, rule, update_every=10)
    if kind == "outer_chain":
        return optax.chain(optax.clip_by_global_norm(1.0), jp.prune(optax.adam(1e-2), rule, update_every=10))
    if kind == "multisteps_outside":
        return optax.MultiSteps(jp.prune(optax.adam(1e-2), rule, update_every=5), every_k_schedule=2)
    if kind == "multisteps_inside":
        return jp.prune(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2), rule, update_every=10)
    if kind == "inject_outside":
        return optax.inject_hyperparams(jp.prune, static_args=("update_every", "seed"))(
            inner=optax.adam(1e-2), rules=[rule], update_every=10
        )
    raise AssertionError(kind)


def find_prune_state(state):
    found = []
    jax.tree.map(lambda s: found.append(s) if isinstance(s, jp.PruneState) else None, state, is_leaf=lambda s: isinstance(s, jp.PruneState))
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("kind", ["inner_chain_inject", "outer_chain", "multisteps_outside", "multisteps_inside", "inject_outside"])
def test_composes_with_chain_inject_hyperparams_multisteps(kind):
    opt = composed(kind)
    params, (x, y) = mlp_params(), data()
    state = opt.init(params)
    step, traces = make_step(opt)
    for _ in range(40):
        params, state, _ = step(params, state, x, y)
    prune_state = find_prune_state(state)
    assert_masked(params, prune_state)
    for a, b in KERNELS:
        mask = np.asarray(prune_state.masks[a][b])
        assert mask.size - mask.sum() == reference.n_pruned(0.7, mask.size)
    assert traces[0] == 1


def test_inject_hyperparams_learning_rate_can_change():
    opt = jp.prune(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), {".*kernel": 0.5})
    params, (x, y) = mlp_params(), data()
    state = opt.init(params)
    step, _ = make_step(opt)
    params, state, _ = step(params, state, x, y)
    state.inner_state.hyperparams["learning_rate"] = jnp.zeros_like(state.inner_state.hyperparams["learning_rate"])
    new_params, state, _ = step(params, state, x, y)
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new_params, params)
    assert all(jax.tree.leaves(chex_equal))


def test_fixed_masks_from_prune_params_fine_tune():
    params, (x, y) = mlp_params(), data()
    params, masks = jp.prune_params(params, jp.PruneRule(pattern=".*kernel", structure="n:m", n=2, m=4))
    opt = jp.prune(optax.adam(1e-2), masks=masks)
    state = opt.init(params)
    step, _ = make_step(opt)
    for _ in range(50):
        params, state, _ = step(params, state, x, y)
    assert_masked(params, state, masks)
    assert all(bool(jnp.all(state.masks[a][b] == masks[a][b])) for a, b in KERNELS)


def test_saliency_scores_use_the_gradients():
    rule = jp.PruneRule(pattern=".*kernel", sparsity=0.5, score="saliency")
    opt = jp.prune(optax.sgd(0.0), rule)
    params, (x, y) = mlp_params(), data()
    state = opt.init(params)
    grads = jax.grad(__import__("tests.pruning.helpers", fromlist=["loss"]).loss)(params, x, y)
    _, state = jax.jit(opt.update)(grads, state, params)
    _, expected = jp.prune_params(params, rule, grads=grads)
    for a, b in KERNELS:
        np.testing.assert_array_equal(np.asarray(state.masks[a][b]), np.asarray(expected[a][b]))


def test_errors():
    params = mlp_params()
    with pytest.raises(ValueError, match="needs rules, masks, or both"):
        jp.prune(optax.adam(1e-3))
    opt = jp.prune(optax.adam(1e-3), {".*kernel": 0.5})
    state = opt.init(params)
    with pytest.raises(ValueError, match="needs params"):
        opt.update(params, state)
    wrong = {"l1": {"kernel": jnp.ones((8, 32), bool), "bias": optax.MaskedNode()},
             "l2": {"kernel": jnp.ones((3, 4), bool), "bias": optax.MaskedNode()}}
    with pytest.raises(ValueError, match=r"masks\['l2'\]\['kernel'\]: shape \(3, 4\) does not match"):
        jp.prune(optax.adam(1e-3), masks=wrong).init(params)
    bad_schedule = jp.PruneRule(pattern=".*kernel", sparsity=lambda step: 1.5 + 0 * step)
    with pytest.raises(ValueError, match=r"schedule gives sparsity 1.5 at step 0; it must be in \[0, 1\)"):
        jp.prune(optax.adam(1e-3), bad_schedule).init(params)
    with pytest.raises(ValueError, match="update_every must be >= 1"):
        jp.prune(optax.adam(1e-3), {".*": 0.5}, update_every=0)
