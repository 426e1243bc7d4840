"""OWL allocation: exact total counts, bounds and ordering (hypothesis), the outlier ratio against
NumPy, and wanda / sparsegpt with allocation="owl" on a small model (N:M stays exact)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.oneshot.allocation import OWL, largest_remainder, outlier_ratio, owl_counts, resolve_allocation
from jaxcompress.oneshot.sparsegpt import sparsegpt
from jaxcompress.oneshot.wanda import row_keep_mask_count, wanda


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), layers=st.integers(1, 6), target=st.floats(0.05, 0.9),
       spread=st.floats(0.0, 0.2))
def test_owl_counts_are_exact_bounded_and_ordered(seed, layers, target, spread):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(8, 200, size=layers)
    scores = [[np.abs(rng.standard_cauchy(size)) * rng.uniform(0.1, 10)] for size in sizes]
    counts, ratios = owl_counts(scores, sizes, target, OWL(spread=spread))
    assert counts.sum() == int(np.round(target * sizes.sum()))  # exact in pruned weights
    assert np.all(counts >= 0) and np.all(counts < sizes)
    effective = min(spread, target, 1 - target)
    sparsity = counts / sizes
    assert np.all(np.abs(sparsity - target) <= effective + 1.0 / sizes + 1e-9)
    for i in range(layers):  # more outliers -> no more sparsity (up to one weight of rounding)
        for j in range(layers):
            if ratios[i] > ratios[j]:
                assert sparsity[i] <= sparsity[j] + 1.0 / sizes[i] + 1.0 / sizes[j] + 1e-9


def test_outlier_ratio_float64_reference_and_settings():
    rng = np.random.default_rng(0)
    a, b = rng.exponential(size=(4, 8)), rng.exponential(size=50) ** 3
    both = np.concatenate([a.ravel(), b])
    assert outlier_ratio([a, b], 3.0) == pytest.approx(np.mean(both > 3.0 * both.mean()))
    assert resolve_allocation("uniform") is None and resolve_allocation("owl") == OWL()
    with pytest.raises(ValueError, match="allocation must be"):
        resolve_allocation("erk")
    with pytest.raises(ValueError, match="threshold"):
        OWL(threshold=0.0)
    with pytest.raises(ValueError, match="spread"):
        OWL(spread=1.5)
    with pytest.raises(ValueError, match="not a valid regex"):
        OWL(group="(")
    assert largest_remainder(np.array([0.4, 0.4, 0.2]), 1, np.array([1, 1, 1])).tolist() == [1, 0, 0]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), d_out=st.sampled_from([1, 3, 5]), d_in=st.sampled_from([1, 4, 7]), frac=st.floats(0, 1))
def test_row_keep_mask_count_prunes_exactly_and_evenly(seed, d_out, d_in, frac):
    scores = np.random.default_rng(seed).normal(size=(d_out, d_in)).astype(np.float32)
    count = int(frac * d_out * d_in)
    keep = np.asarray(row_keep_mask_count(jnp.asarray(scores), count))
    pruned_per_row = (~keep).sum(axis=1)
    assert pruned_per_row.sum() == count and pruned_per_row.max() - pruned_per_row.min() <= 1
    for r in range(d_out):  # each row prunes its lowest scores
        if 0 < pruned_per_row[r] < d_in:
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


def _model():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"a": jax.random.normal(keys[0], (16, 32)), "b": jax.random.normal(keys[1], (32, 8))}
    params["a"] = params["a"].at[:2, :].mul(30.0)  # a few huge input channels: outlier scores in "a"
    fn = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
    return fn, params, [jax.random.normal(keys[2], (64, 16))]


@pytest.mark.parametrize("method", [wanda, sparsegpt])
def test_owl_on_a_model_keeps_the_total_and_spares_the_outlier_layer(method):
    fn, params, batches = _model()
    rule = [jc.PruneRule(pattern=".*", sparsity=0.5)]
    _, uniform = method(fn, params, batches, rule)
    pruned, masks = method(fn, params, batches, rule, allocation=OWL(spread=0.1))
    zeros = {k: int((~np.asarray(v)).sum()) for k, v in masks.items()}
    assert sum(zeros.values()) == 0.5 * (16 * 32 + 32 * 8)  # the rule's exact total
    assert zeros["a"] < 0.5 * 16 * 32 and abs(zeros["a"] / (16 * 32) - 0.5) <= 0.1 + 1e-9
    assert all(bool(jnp.all(jnp.where(masks[k], True, pruned[k] == 0))) for k in masks)
    assert any(not np.array_equal(masks[k], uniform[k]) for k in masks)


def test_owl_leaves_n_m_exact_and_rejects_erk():
    fn, params, batches = _model()
    rules = [jc.PruneRule(pattern="a", structure="n:m", n=2, m=4), jc.PruneRule(pattern="b", sparsity=0.5)]
    _, masks = wanda(fn, params, batches, rules, allocation="owl")
    assert np.all(np.asarray(masks["a"]).reshape(4, 4, 32).sum(axis=1) == 2)
    assert int((~np.asarray(masks["b"])).sum()) == 128  # the only unstructured leaf: its own target
    erk = [jc.PruneRule(pattern=".*", sparsity=0.5, distribution="erk")]
    with pytest.raises(ValueError, match=r"distribution='erk'"):
        sparsegpt(fn, params, batches, erk, allocation="owl")
