"""Wanda: scores and masks against a float64 NumPy reference, exact row-wise and N:M counts
(hypothesis), the tree level on Dense / conv models, degenerate calibration."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.oneshot.capture import capture_statistics, to_matrix
from jaxcompress.oneshot.wanda import row_keep_mask, wanda, wanda_mask, wanda_matrix, wanda_scores


def _reference_mask(w, x, sparsity=None, n=None, m=None):
    """Float64: score |W_ij| * ||X_j||, per row keep the largest (stable: ties to the lower index)."""
    scores = np.abs(np.asarray(w, np.float64)) * np.linalg.norm(np.asarray(x, np.float64), axis=0)
    d_out, d_in = scores.shape
    keep = np.zeros_like(scores, bool)
    if sparsity is not None:
        kept = d_in - int(np.round(sparsity * d_in))
        for r in range(d_out):
            keep[r, np.argsort(-scores[r], kind="stable")[:kept]] = True
        return keep
    for r in range(d_out):
        for g in range(0, d_in, m):
            keep[r, g + np.argsort(-scores[r, g : g + m], kind="stable")[:n]] = True
    return keep


def _layer(seed, d_out=10, d_in=24, rows=40):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, d_in)) * rng.lognormal(0.0, 1.0, size=d_in)
    return rng.normal(size=(d_out, d_in)).astype(np.float32), x.astype(np.float32)


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(sparsity=0.7), dict(n=2, m=4), dict(n=1, m=8)])
def test_mask_matches_float64_reference(pattern):
    w, x = _layer(0)
    sq_norms = np.sum(x.astype(np.float64) ** 2, axis=0)
    keep = wanda_mask(w, sq_norms.astype(np.float32), **pattern)
    np.testing.assert_array_equal(np.asarray(keep), _reference_mask(w, x, **pattern))
    pruned, keep2 = wanda_matrix(w, sq_norms.astype(np.float32), **pattern)
    np.testing.assert_array_equal(np.asarray(keep2), np.asarray(keep))
    np.testing.assert_array_equal(np.asarray(pruned), np.where(keep, w, 0.0))  # no weight update


def test_scores_float64():
    w, x = _layer(1)
    sq_norms = np.sum(x.astype(np.float64) ** 2, axis=0)
    expected = np.abs(w) * np.sqrt(sq_norms)
    np.testing.assert_allclose(np.asarray(wanda_scores(w, sq_norms)), expected, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    d_out=st.integers(1, 6),
    d_in=st.integers(1, 20),
    sparsity=st.floats(0.0, 0.99),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_row_prunes_exactly_the_same_count(d_out, d_in, sparsity, ties, seed):
    scores = np.random.default_rng(seed).normal(size=(d_out, d_in)).astype(np.float32)
    if ties:
        scores = np.round(scores)  # many equal scores
    keep = np.asarray(row_keep_mask(scores, sparsity))
    assert np.all((~keep).sum(axis=1) == int(np.round(sparsity * d_in)))


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 8), groups=st.integers(1, 4), d_out=st.integers(1, 5), seed=st.integers(0, 2**16), data=st.data())
def test_n_m_exact(m, groups, d_out, seed, data):
    n = data.draw(st.integers(1, m))
    rng = np.random.default_rng(seed)
    w = np.round(rng.normal(size=(d_out, m * groups))).astype(np.float32)  # ties included
    keep = np.asarray(wanda_mask(w, rng.uniform(0, 2, size=m * groups).astype(np.float32), n=n, m=m))
    assert np.all(keep.reshape(d_out, groups, m).sum(-1) == n)


def test_activation_norms_change_the_choice():
    w = np.array([[1.0, 1.0, 1.0, 1.0]], np.float32)
    keep = wanda_mask(w, np.array([0.0, 4.0, 9.0, 1.0], np.float32), sparsity=0.5)
    assert np.asarray(keep).tolist() == [[False, True, True, False]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="w1: input statistics of shape \\(3,\\) do not match d_in=4"):
        wanda_mask(np.ones((2, 4)), np.ones(3), sparsity=0.5, name="w1")
    with pytest.raises(ValueError, match="M=4 does not divide"):
        wanda_mask(np.ones((2, 6)), np.ones(6), n=2, m=4)
    with pytest.raises(ValueError, match="sparsity must be a Python float in \\[0, 1\\)"):
        wanda_mask(np.ones((2, 4)), np.ones(4), sparsity=1.0)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16, name="hidden")(x))
        return nn.Dense(4, name="out")(x)


def _net(batch=6):
    model = _Net()
    x = jax.random.normal(jax.random.key(0), (batch, 5, 5, 4)) * jnp.array([0.1, 1.0, 3.0, 0.5])
    params = model.init(jax.random.key(1), x)
    return model, params, [x[: batch // 2], x[batch // 2 :]]


def test_tree_level_row_counts_match_the_matrix_view():
    model, params, batches = _net()
    rules = [jc.PruneRule(pattern=".*kernel", sparsity=0.5)]
    pruned, masks = wanda(model.apply, params, batches, rules)
    jc.check_masks(pruned, masks)
    assert isinstance(masks["params"]["hidden"]["bias"], optax.MaskedNode)
    hidden = np.asarray(masks["params"]["hidden"]["kernel"])  # (200, 16): each output keeps 100
    assert np.all(hidden.sum(axis=0) == 100)
    conv = np.asarray(masks["params"]["conv"]["kernel"])  # HWIO: each filter keeps 18 of 36
    assert np.all(conv.reshape(36, 8).sum(axis=0) == 18)
    for name in ("conv", "hidden", "out"):
        kernel, mask = np.asarray(pruned["params"][name]["kernel"]), np.asarray(masks["params"][name]["kernel"])
        np.testing.assert_array_equal(kernel, np.where(mask, params["params"][name]["kernel"], 0.0))


def test_tree_level_matches_matrix_function_non_sequential():
    model, params, batches = _net()
    rules = [jc.PruneRule(pattern=".*conv/kernel", sparsity=0.25)]
    _, masks = wanda(model.apply, params, batches, rules, sequential=False)
    stats = capture_statistics(model.apply, params, batches, [".*conv/kernel"])["params/conv/kernel"]
    kernel = params["params"]["conv"]["kernel"]
    keep = wanda_mask(to_matrix(kernel, stats), stats.sq_norms.astype(np.float32), sparsity=0.25)
    np.testing.assert_array_equal(np.asarray(to_matrix(masks["params"]["conv"]["kernel"].astype(np.float32), stats)), np.asarray(keep))


def test_tree_level_n_m_along_input_channels_of_conv_and_dense():
    model, params, batches = _net()
    rules = [jc.PruneRule(pattern=".*(conv|hidden)/kernel", structure="n:m", n=2, m=4)]
    _, masks = wanda(model.apply, params, batches, rules)
    conv = np.asarray(masks["params"]["conv"]["kernel"])  # (3, 3, 4, 8): 2 of the 4 input channels
    assert np.all(conv.sum(axis=2) == 2)
    hidden = np.asarray(masks["params"]["hidden"]["kernel"])
    assert np.all(hidden.reshape(50, 4, 16).sum(axis=1) == 2)


def test_sequential_sees_pruned_predecessors():
    model, params, batches = _net()
    rules = [jc.PruneRule(pattern=".*kernel", sparsity=0.6)]
    sequential, _ = wanda(model.apply, params, batches, rules)
    one_pass, _ = wanda(model.apply, params, batches, rules, sequential=False)
    np.testing.assert_array_equal(sequential["params"]["conv"]["kernel"], one_pass["params"]["conv"]["kernel"])
    assert not np.array_equal(sequential["params"]["hidden"]["kernel"], one_pass["params"]["hidden"]["kernel"])


def test_beats_magnitude_on_calibration_output():
    model, params, batches = _net(batch=16)
    rules = [jc.PruneRule(pattern=".*kernel", sparsity=0.5)]
    pruned, _ = wanda(model.apply, params, batches, rules)
    magnitude, _ = jc.prune_params(params, rules)
    x = jnp.concatenate(batches)
    dense = model.apply(params, x)
    err = lambda p: float(jnp.sum((model.apply(p, x) - dense) ** 2))
    assert err(pruned) < err(magnitude)


def test_zero_activations_fall_back_to_magnitude_with_a_warning():
    params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    fn = lambda p, x: x @ p["w"]
    rules = [jc.PruneRule(pattern="w", sparsity=0.5)]
    with pytest.warns(RuntimeWarning, match=r"params\['w'\]: every calibration input of this weight is zero"):
        pruned, masks = wanda(fn, params, [jnp.zeros((3, 8))], rules)
    expected = np.asarray(row_keep_mask(np.abs(np.asarray(params["w"])).T, 0.5)).T
    np.testing.assert_array_equal(np.asarray(masks["w"]), expected)
    assert np.all(np.isfinite(pruned["w"]))


@pytest.mark.parametrize("sequential", [True, False])
def test_leaf_without_a_dot_is_an_error(sequential):
    params = {"table": jnp.ones((10, 4)), "w": jnp.ones((4, 4))}
    fn = lambda p, ids: p["table"][ids] @ p["w"]
    with pytest.raises(ValueError, match=r"params\['table'\]: selected for Wanda but it never meets"):
        wanda(fn, params, [jnp.arange(6)], [jc.PruneRule(pattern=".*", sparsity=0.5)], sequential=sequential)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_row_mask_leaves_padding_out_of_the_statistics(method):
    from jaxcompress.oneshot.sparsegpt import sparsegpt

    prune = {"wanda": wanda, "sparsegpt": sparsegpt}[method]
    keys = jax.random.split(jax.random.key(3), 4)
    params = {"a": jax.random.normal(keys[0], (6, 8)), "b": jax.random.normal(keys[1], (8, 4))}
    fn = lambda p, x, mask: (jnp.tanh(x @ p["a"]) @ p["b"]) * mask[..., None]
    x = jax.random.normal(keys[2], (4, 5, 6))
    mask = (jnp.arange(5)[None, :] < jnp.array([[5], [2], [3], [1]])).astype(jnp.int32)
    garbage = jnp.where(mask[..., None] > 0, x, 100 * jax.random.normal(keys[3], x.shape))  # padding rows
    rules = [jc.PruneRule(pattern="a|b", sparsity=0.5)]
    rows_only = [(x[i : i + 1, : int(n)], jnp.ones((1, int(n)), jnp.int32)) for i, n in enumerate(mask.sum(1))]
    want, want_masks = prune(fn, params, rows_only, rules)
    got, got_masks = prune(fn, params, [(garbage, mask)], rules, row_mask=lambda batch: batch[1])
    unmasked, _ = prune(fn, params, [(garbage, mask)], rules)
    for name in ("a", "b"):
        np.testing.assert_array_equal(got_masks[name], want_masks[name])
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
    assert not all(np.allclose(unmasked[name], want[name], rtol=1e-4, atol=1e-5) for name in ("a", "b"))
