"""SparseGPT: the blocked OBS algorithm against a float64 NumPy reference, its error against
magnitude pruning on the calibration data, exact counts, degenerate calibration, the tree level."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
from jaxcompress.oneshot.sparsegpt import damped_hessian, output_error, sparsegpt, sparsegpt_matrix
from jaxcompress.pruning.masks import magnitude_mask, n_m_mask


def _reference(w, h, sparsity=None, n=None, m=None, damp=0.01, block_size=128):
    """Float64 SparseGPT, written from the paper: the OBS update of each column applied to ALL
    later columns at once (no lazy batching), the mask chosen per block / per N:M group when
    reached. Dead inputs get the mean live diagonal, then relative damping."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    d_out, d_in = w.shape
    diag = np.diag(h).copy()
    live = diag > 0
    diag[~live] = diag[live].mean() if live.any() else 1.0
    h[np.diag_indices(d_in)] = diag + damp * diag.mean()
    hinv = np.linalg.inv(h)
    upper = np.linalg.cholesky(hinv).T  # hinv = upper.T @ upper
    keep = np.ones_like(w, bool)
    for start in range(0, d_in, block_size):
        end = min(start + block_size, d_in)
        if n is None:
            count = int(np.round(sparsity * d_out * end)) - int(np.round(sparsity * d_out * start))
            scores = (w[:, start:end] ** 2 / np.diag(upper)[start:end] ** 2).ravel()
            order = np.argsort(scores, kind="stable")
            block = np.ones(scores.size, bool)
            block[order[:count]] = False
            keep[:, start:end] = block.reshape(d_out, end - start)
        for i in range(start, end):
            if n is not None and (i - start) % m == 0:
                scores = w[:, i : i + m] ** 2 / np.diag(upper)[i : i + m] ** 2
                ranks = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1, kind="stable")
                keep[:, i : i + m] = ranks < n
            error = np.where(keep[:, i], 0.0, w[:, i]) / upper[i, i]
            w[:, i:] -= np.outer(error, upper[i, i:])
            w[:, i] = np.where(keep[:, i], w[:, i], 0.0)
    return w, keep


def _layer(seed, d_out=12, d_in=48, rows=200):
    """A weight and correlated, unevenly scaled calibration inputs (like real activations)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
    x = (rng.normal(size=(rows, d_in)) @ mix) * rng.lognormal(0.0, 1.0, size=d_in)
    w = rng.normal(size=(d_out, d_in))
    return w.astype(np.float32), x.astype(np.float32)


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(sparsity=0.3), dict(n=2, m=4)])
def test_matches_float64_reference(pattern):
    w, x = _layer(0)
    h = x.T.astype(np.float64) @ x
    pruned, keep = sparsegpt_matrix(w, h.astype(np.float32), block_size=16, **pattern)
    ref, ref_keep = _reference(w, h, block_size=16, **pattern)
    np.testing.assert_array_equal(np.asarray(keep), ref_keep)
    np.testing.assert_allclose(np.asarray(pruned), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    assert np.all(np.asarray(pruned)[~ref_keep] == 0.0)


def test_exact_counts_and_blocks_that_do_not_divide():
    w, x = _layer(1, d_out=7, d_in=40)
    pruned, keep = sparsegpt_matrix(w, x.T @ x, sparsity=0.37, block_size=16)  # blocks 16, 16, 8
    assert int((~np.asarray(keep)).sum()) == int(np.round(0.37 * w.size))
    _, keep = sparsegpt_matrix(w, x.T @ x, n=1, m=4, block_size=8)
    assert np.all(np.asarray(keep).reshape(7, 10, 4).sum(-1) == 1)


def test_sparsity_zero_changes_nothing():
    w, x = _layer(2)
    pruned, keep = sparsegpt_matrix(w, x.T @ x, sparsity=0.0)
    assert bool(np.all(keep))
    np.testing.assert_array_equal(np.asarray(pruned), w)


@pytest.mark.parametrize("seed", range(4))
def test_error_never_worse_than_magnitude(seed):
    """On the calibration data: ||(W_s - W) X^T||^2 <= the same for magnitude pruning at the same
    constraint (layer-wise unstructured 50%, and 2:4 along the input axis)."""
    w, x = _layer(10 + seed, d_out=16, d_in=64, rows=256)
    h = x.T @ x
    pruned, _ = sparsegpt_matrix(w, h, sparsity=0.5, block_size=32)
    magnitude = np.where(np.asarray(magnitude_mask(w, 0.5)), w, 0.0)
    assert float(output_error(pruned - w, h)) < float(output_error(magnitude - w, h))
    pruned, _ = sparsegpt_matrix(w, h, n=2, m=4, block_size=32)
    magnitude = np.where(np.asarray(n_m_mask(np.abs(w), 2, 4, axis=1)), w, 0.0)
    assert float(output_error(pruned - w, h)) < float(output_error(magnitude - w, h))


def test_degenerate_statistics_never_nan():
    w, _ = _layer(3, d_out=8, d_in=32)
    # all-zero activations: a magnitude decision, weights unchanged where kept
    pruned, keep = sparsegpt_matrix(w, np.zeros((32, 32), np.float32), sparsity=0.5, block_size=16)
    assert np.all(np.isfinite(pruned))
    np.testing.assert_array_equal(np.asarray(keep), np.asarray(_reference(w, np.zeros((32, 32)), 0.5, block_size=16)[1]))
    np.testing.assert_array_equal(np.asarray(pruned), np.where(keep, w, 0.0))
    # fewer rows than inputs (rank 5 of 32), and one dead input
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    x[:, 3] = 0.0
    pruned, keep = sparsegpt_matrix(w, x.T @ x, sparsity=0.5, block_size=16)
    assert np.all(np.isfinite(pruned)) and int((~np.asarray(keep)).sum()) == 128


def test_damped_hessian_float64():
    h = np.array([[4.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    expected = h.copy()
    expected[2, 2] = 3.0  # dead input: the mean live diagonal
    expected[np.diag_indices(3)] += 0.1 * 3.0
    np.testing.assert_allclose(np.asarray(damped_hessian(h, 0.1)), expected, rtol=1e-6)


def test_bad_arguments_name_the_matrix():
    w = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="layer_0: M=4 does not divide"):
        sparsegpt_matrix(w, np.eye(6), n=2, m=4, name="layer_0")
    with pytest.raises(ValueError, match="does not match d_in=6"):
        sparsegpt_matrix(w, np.eye(5), sparsity=0.5)
    with pytest.raises(ValueError, match="either sparsity or both n and m"):
        sparsegpt_matrix(w, np.eye(6))


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(32, name="up")(x))
        return nn.Dense(8, name="down")(x)


def _mlp(seed=0, rows=64):
    model = _MLP()
    x = jax.random.normal(jax.random.key(seed), (rows, 16)) * jnp.linspace(0.1, 3.0, 16)
    params = model.init(jax.random.key(seed + 1), x)
    return model, params, [x[: rows // 2], x[rows // 2 :]]


def test_tree_level_masks_and_structure():
    model, params, batches = _mlp()
    rules = [jc.PruneRule(pattern=".*up/kernel", sparsity=0.5), jc.PruneRule(pattern=".*down/kernel", structure="n:m", n=2, m=4)]
    pruned, masks = sparsegpt(model.apply, params, batches, rules, block_size=8)
    assert isinstance(masks["params"]["up"]["bias"], optax.MaskedNode)
    up = np.asarray(masks["params"]["up"]["kernel"])
    assert up.dtype == bool and up.shape == (16, 32) and int((~up).sum()) == 256
    down = np.asarray(masks["params"]["down"]["kernel"])  # (in=32, out=8): 2 of 4 along inputs
    assert np.all(down.reshape(8, 4, 8).sum(axis=1) == 2)
    for name in ("up", "down"):
        kernel = np.asarray(pruned["params"][name]["kernel"])
        assert np.all(kernel[~np.asarray(masks["params"][name]["kernel"])] == 0.0)
    np.testing.assert_array_equal(pruned["params"]["up"]["bias"], params["params"]["up"]["bias"])
    jc.check_masks(pruned, masks)


def test_tree_level_beats_magnitude_on_outputs():
    model, params, batches = _mlp(seed=3, rows=256)
    rule = [jc.PruneRule(pattern=".*kernel", sparsity=0.5)]
    pruned, _ = sparsegpt(model.apply, params, batches, rule, block_size=16)
    magnitude, _ = jc.prune_params(params, rule)
    x = jnp.concatenate(batches)
    dense = model.apply(params, x)
    err = lambda p: float(jnp.sum((model.apply(p, x) - dense) ** 2))
    assert err(pruned) < err(magnitude)


def test_tree_level_degenerate_calibration_warns():
    model, params, _ = _mlp()
    rule = [jc.PruneRule(pattern=".*up/kernel", sparsity=0.5)]
    with pytest.warns(RuntimeWarning, match=r"params\['params'\]\['up'\]\['kernel'\]: every calibration input"):
        pruned, _ = sparsegpt(model.apply, params, [jnp.zeros((4, 16))], rule)
    assert np.all(np.isfinite(pruned["params"]["up"]["kernel"]))
    with pytest.warns(RuntimeWarning, match="only 3 calibration rows for 16 inputs"):
        pruned, _ = sparsegpt(model.apply, params, [jnp.ones((3, 16)) * jnp.arange(16.0)], rule)
    assert np.all(np.isfinite(pruned["params"]["up"]["kernel"]))


def test_tree_level_errors():
    model, params, batches = _mlp()
    with pytest.raises(ValueError, match=r"params\['params'\]\['up'\]\['kernel'\]: SparseGPT .* structure='filter'"):
        sparsegpt(model.apply, params, batches, [jc.PruneRule(pattern=".*up/kernel", sparsity=0.5, structure="filter")])
    with pytest.raises(ValueError, match="pass step="):
        sparsegpt(model.apply, params, batches, [jc.PruneRule(pattern=".*kernel", sparsity=jc.constant(0.5))])
    params = {"table": jnp.ones((10, 4)), "w": jnp.ones((4, 4))}
    fn = lambda p, ids: p["table"][ids] @ p["w"]
    with pytest.raises(ValueError, match=r"params\['table'\]: selected for SparseGPT but it never meets"):
        sparsegpt(fn, params, [jnp.arange(6)], [jc.PruneRule(pattern=".*", sparsity=0.5)])
