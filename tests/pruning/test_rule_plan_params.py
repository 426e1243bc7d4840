import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress.pruning as jp
from tests.pruning import reference


def make_params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 8, 16)), jnp.float32), "bias": jnp.zeros(16)},
        "dense": {"kernel": jnp.asarray(rng.standard_normal((32, 10)), jnp.float32), "bias": jnp.zeros(10)},
        "step": jnp.array(3),
    }


def test_rule_validation_errors():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        jp.PruneRule(pattern=".*", sparsity=1.0)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got -0.2"):
        jp.PruneRule(pattern=".*", sparsity=-0.2)
    with pytest.raises(ValueError, match="sparsity is required"):
        jp.PruneRule(pattern=".*")
    with pytest.raises(ValueError, match="N must be <= M; got N=3 > M=2"):
        jp.PruneRule(pattern=".*", structure="n:m", n=3, m=2)
    with pytest.raises(ValueError, match="needs block_size"):
        jp.PruneRule(pattern=".*", sparsity=0.5, structure="block")
    with pytest.raises(ValueError, match="scope='global' supports structure='unstructured' only"):
        jp.PruneRule(pattern=".*", sparsity=0.5, structure="filter", scope="global")
    with pytest.raises(ValueError, match="score must be one of"):
        jp.PruneRule(pattern=".*", sparsity=0.5, score="hessian")
    with pytest.raises(ValueError, match="not a valid regex"):
        jp.PruneRule(pattern="(", sparsity=0.5)


def test_decisions_are_reported_as_data():
    params = make_params()
    rules = [jp.PruneRule(pattern="dense/.*", skip=True), jp.PruneRule(pattern=".*", sparsity=0.5), jp.PruneRule(pattern="nothing", sparsity=0.1)]
    with pytest.warns(UserWarning, match=r"rules\[2\] \(pattern 'nothing'\)"):
        plan = jp.plan_pruning(params, rules)
    by_path = {d.path: d for d in plan.leaves}
    assert by_path["dense/kernel"].action == "skipped" and by_path["dense/kernel"].reason == "rule says skip"
    assert by_path["step"].action == "skipped" and "non-float" in by_path["step"].reason
    assert by_path["conv/kernel"].action == "pruned" and by_path["conv/kernel"].rule_index == 1
    assert plan.pruned == ("conv/bias", "conv/kernel") and plan.unused_rules == (2,)
    assert plan.to_dict()["unused_rules"] == [{"index": 2, "pattern": "nothing"}]
    with pytest.raises(ValueError, match="matched no leaf"):
        jp.plan_pruning(params, rules, on_unused="error")


def test_leaf_errors_name_the_path():
    params = make_params()
    with pytest.raises(ValueError, match=r"params\['dense'\]\['kernel'\]: M=3 does not divide the contracting dim 32"):
        jp.prune_params(params, jp.PruneRule(pattern="dense/kernel", structure="n:m", n=1, m=3))
    with pytest.raises(ValueError, match=r"params\['dense'\]\['bias'\]: a 1-d array has no contracting axis"):
        jp.prune_params(params, jp.PruneRule(pattern="dense/.*", structure="n:m", n=2, m=4))
    with pytest.raises(ValueError, match=r"params\['conv'\]\['kernel'\]: block size \(3, 3\) does not divide"):
        jp.prune_params(params, jp.PruneRule(pattern="conv/kernel", structure="block", block_size=3, sparsity=0.5))
    with pytest.raises(ValueError, match=r"params\['conv'\]\['kernel'\]: score='saliency' needs gradients"):
        jp.prune_params(params, jp.PruneRule(pattern="conv/kernel", score="saliency", sparsity=0.5))
    with pytest.raises(ValueError, match=r"params\['conv'\]\['kernel'\]: score='random' needs a PRNG key"):
        jp.prune_params(params, jp.PruneRule(pattern="conv/kernel", score="random", sparsity=0.5))


@pytest.mark.parametrize(
    "rule",
    [
        jp.PruneRule(pattern=".*kernel", sparsity=0.7),
        jp.PruneRule(pattern=".*kernel", sparsity=0.7, score="random"),
        jp.PruneRule(pattern=".*kernel", sparsity=0.7, score="saliency"),
        jp.PruneRule(pattern=".*kernel", sparsity=0.7, distribution="erk"),
        jp.PruneRule(pattern=".*kernel", sparsity=0.7, scope="global", normalize="l2"),
        jp.PruneRule(pattern=".*kernel", sparsity=0.5, structure="filter", norm="l2"),
        jp.PruneRule(pattern=".*kernel", sparsity=0.5, structure="channel"),
        jp.PruneRule(pattern=".*kernel", sparsity=0.5, structure="block", block_size=2),
        jp.PruneRule(pattern=".*kernel", structure="n:m", n=2, m=4),
    ],
    ids=lambda r: r.describe(),
)
def test_prune_params_exact_sparsity_every_method(rule):
    params = make_params()
    grads = jax.tree.map(lambda x: jnp.cos(x * 3.0) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    pruned, masks = jp.prune_params(params, rule, grads=grads, key=jax.random.PRNGKey(1))
    assert isinstance(masks["conv"]["bias"], optax.MaskedNode) and isinstance(masks["step"], optax.MaskedNode)
    assert None not in jax.tree.leaves(masks, is_leaf=lambda x: x is None)
    plan = jp.plan_pruning(params, rule)
    targets = {i: float(s) for i, s in plan.target_sparsities().items()}
    total_pruned = total = 0
    for index, (path, leaf) in zip(plan.pruned_indices, [("conv", "kernel"), ("dense", "kernel")]):
        mask = np.asarray(masks[path][leaf])
        p, q = np.asarray(pruned[path][leaf]), np.asarray(params[path][leaf])
        assert mask.dtype == bool and mask.shape == q.shape
        np.testing.assert_array_equal(p, np.where(mask, q, 0.0))
        zeros = mask.size - mask.sum()
        total_pruned, total = total_pruned + zeros, total + mask.size
        if rule.scope == "global":
            continue
        units = {"filter": q.shape[-1], "channel": q.shape[-2], "block": mask.size // 4}.get(rule.structure, mask.size)
        expected = reference.n_pruned(targets[index], units) * (mask.size // units)
        assert zeros == expected, (path, zeros, expected)
    if rule.scope == "global":
        assert total_pruned == reference.n_pruned(0.7, total)
    if rule.distribution == "erk":
        assert abs(total_pruned - 0.7 * total) <= 2


def test_global_prune_params_matches_numpy():
    params = make_params()
    rule = jp.PruneRule(pattern=".*kernel", sparsity=0.8, scope="global", normalize="max")
    _, masks = jp.prune_params(params, rule)
    expected = reference.global_keep([np.abs(params["conv"]["kernel"]), np.abs(params["dense"]["kernel"])], 0.8, "max")
    np.testing.assert_array_equal(np.asarray(masks["conv"]["kernel"]), expected[0])
    np.testing.assert_array_equal(np.asarray(masks["dense"]["kernel"]), expected[1])


def test_custom_per_path_map_and_mapping_spec():
    params = make_params()
    _, masks = jp.prune_params(params, {r"conv/kernel": 0.25, r"dense/kernel": 0.9})
    s = jp.mask_sparsity(masks)
    assert s["conv/kernel"] == pytest.approx(0.25, abs=1 / 1152) and s["dense/kernel"] == pytest.approx(0.9, abs=1 / 320)


def test_check_masks_errors_name_the_path():
    params = make_params()
    _, masks = jp.prune_params(params, {r".*kernel": 0.5})
    bad = dict(masks, dense={"kernel": masks["dense"]["kernel"]})
    with pytest.raises(ValueError, match=r"mask tree does not match the params: no mask for params\['dense'\]\['bias'\]"):
        jp.apply_masks(params, bad)
    bad = dict(masks, dense={"kernel": masks["dense"]["kernel"].T, "bias": optax.MaskedNode()})
    with pytest.raises(ValueError, match=r"masks\['dense'\]\['kernel'\]: shape \(10, 32\) does not match the param's shape \(32, 10\)"):
        jp.apply_masks(params, bad)
    bad = dict(masks, dense={"kernel": None, "bias": optax.MaskedNode()})
    with pytest.raises(ValueError, match="mask tree does not match"):
        jp.check_masks(params, bad)
    bad = dict(masks, dense={"kernel": jnp.ones((32, 10)), "bias": optax.MaskedNode()})
    with pytest.raises(ValueError, match=r"masks\['dense'\]\['kernel'\]: masks must be bool or uint8, got float32"):
        jp.check_masks(params, bad)
    uint8 = jax.tree.map(lambda m: m.astype(jnp.uint8), masks)
    jp.check_masks(params, uint8)
    np.testing.assert_array_equal(jp.apply_masks(params, uint8)["dense"]["kernel"], jp.apply_masks(params, masks)["dense"]["kernel"])
