import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jaxcompress.pruning import masks
from tests.pruning import reference

unstructured = jax.jit(masks.unstructured_mask)
n_m = jax.jit(masks.n_m_mask, static_argnums=(1, 2))


@given(
    shape=st.sampled_from([(16,), (8, 6), (3, 3, 4, 5)]),
    sparsity=st.floats(0, 0.99),
    seed=st.integers(0, 10_000),
)
def test_unstructured_exact_count_and_reference(shape, sparsity, seed):
    scores = np.abs(np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)
    mask = np.asarray(unstructured(scores, sparsity))
    expected_pruned = reference.n_pruned(sparsity, scores.size)
    assert mask.size - mask.sum() == expected_pruned
    assert abs((mask.size - mask.sum()) - sparsity * mask.size) <= 0.5 + 1e-6 * mask.size
    np.testing.assert_array_equal(mask, reference.unstructured(scores, sparsity))


def test_magnitude_mask_keeps_largest_abs_and_ignores_sign():
    w = jnp.array([-4.0, 0.5, 3.0, -0.1, 2.0, -1.0])
    assert masks.magnitude_mask(w, 0.5).tolist() == [True, False, True, False, True, False]


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("axis,shape", [(-1, (3, 3, 4, 10)), (-2, (3, 3, 8, 5)), (-1, (12, 7))])
def test_structured_prunes_whole_slices_by_norm(norm, axis, shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    mask = np.asarray(masks.structured_mask(np.abs(w) if norm == "l1" else w, 0.4, axis=axis, norm=norm))
    units = shape[axis]
    keep_units = reference.structured(np.abs(w) if norm == "l1" else w, 0.4, axis % len(shape), norm)
    assert units - keep_units.sum() == reference.n_pruned(0.4, units)
    moved = np.moveaxis(mask, axis, 0).reshape(units, -1)
    assert np.all(moved.all(1) | ~moved.any(1)), "a slice is partly pruned"
    np.testing.assert_array_equal(moved[:, 0], keep_units)


@pytest.mark.parametrize("block,shape", [(2, (8, 6)), ((2, 3), (3, 4, 6)), (4, (4, 8))])
def test_block_mask_prunes_whole_tiles(block, shape):
    br, bc = (block, block) if isinstance(block, int) else block
    scores = np.abs(np.random.default_rng(1).standard_normal(shape)).astype(np.float32)
    mask = np.asarray(masks.block_mask(scores, 0.5, block_size=block))
    tiles = mask.reshape(shape[:-2] + (shape[-2] // br, br, shape[-1] // bc, bc))
    tile_any, tile_all = tiles.any(axis=(-3, -1)), tiles.all(axis=(-3, -1))
    np.testing.assert_array_equal(tile_any, tile_all)
    tile_scores = scores.reshape(tiles.shape).sum(axis=(-3, -1))
    np.testing.assert_array_equal(tile_all, reference.unstructured(tile_scores, 0.5))


def test_block_size_must_divide():
    with pytest.raises(ValueError, match=r"w: block size \(3, 3\) does not divide the last two dims \(8, 6\)"):
        masks.block_mask(jnp.ones((8, 6)), 0.5, block_size=3, name="w")


@given(
    nm=st.sampled_from([(1, 2), (2, 4), (3, 4), (4, 8)]),
    kind=st.sampled_from(["dense", "conv"]),
    seed=st.integers(0, 1000),
    ties=st.booleans(),
)
def test_n_m_keeps_n_per_group_along_contracting_axis(nm, kind, seed, ties):
    n, m = nm
    shape = (16, 5) if kind == "dense" else (3, 2, 8, 4)
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, 2, shape) if ties else rng.standard_normal(shape)).astype(np.float32)
    mask = np.asarray(n_m(scores, n, m))
    axis = 0 if kind == "dense" else 2
    groups = np.moveaxis(mask, axis, -1).reshape(-1, m)
    assert np.all(groups.sum(-1) == n), "every group of m keeps exactly n"
    np.testing.assert_array_equal(mask, reference.n_m(scores, n, m, axis))


def test_n_m_errors_name_the_array():
    with pytest.raises(ValueError, match=r"k: N:M keeps N of every M weights, so N must be <= M; got N=5 > M=4"):
        masks.n_m_mask(jnp.ones((8, 2)), 5, 4, name="k")
    with pytest.raises(ValueError, match=r"k: M=4 does not divide the contracting dim 6"):
        masks.n_m_mask(jnp.ones((6, 2)), 2, 4, name="k")
    with pytest.raises(ValueError, match="no contracting axis"):
        masks.n_m_mask(jnp.ones(8), 2, 4, name="k")


@pytest.mark.parametrize("normalize", [None, "max", "l2", "l1", "mean"])
def test_global_masks_match_numpy_reference(normalize):
    rng = np.random.default_rng(3)
    arrays = [np.abs(rng.standard_normal(s) * scale).astype(np.float32) for s, scale in [((6, 5), 1.0), ((10,), 5.0), ((2, 2, 3), 0.1)]]
    for sparsity in (0.0, 0.3, 0.75, 0.95):
        got = jax.jit(masks.global_masks, static_argnames="normalize")(arrays, sparsity, normalize=normalize)
        expected = reference.global_keep(arrays, sparsity, normalize)
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(np.asarray(g), e)
        total = sum(a.size for a in arrays)
        assert total - sum(int(np.asarray(g).sum()) for g in got) == reference.n_pruned(sparsity, total)


def test_global_without_normalisation_prunes_small_scale_layer_first():
    big, small = jnp.full((10,), 5.0), jnp.full((10,), 0.1)
    m_big, m_small = masks.global_masks([big, small], 0.5)
    assert bool(m_big.all()) and not bool(m_small.any())
    m_big, m_small = masks.global_masks([big * jnp.arange(1, 11), small * jnp.arange(1, 11)], 0.5, normalize="max")
    assert int(m_big.sum()) == 5 and int(m_small.sum()) == 5


def test_masks_are_vmappable_and_jittable():
    scores = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (2, 8, 6)))
    batched = jax.vmap(lambda s: masks.n_m_mask(s, 2, 4))(scores)
    assert batched.shape == scores.shape and bool(jnp.all(batched.reshape(2, 2, 4, 6).sum(2) == 2))
    vm = jax.vmap(masks.unstructured_mask, in_axes=(0, None))(scores, 0.25)
    assert [int(x) for x in vm.sum((1, 2))] == [36] * 2
