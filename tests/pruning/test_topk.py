import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jaxcompress.pruning.topk import global_top_k_masks, sortable_keys, top_k_mask
from tests.pruning import reference

jit_top_k = jax.jit(top_k_mask)  # one compilation per shape; k is traced


def test_sortable_keys_order_matches_float_order():
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-37, 1.0, 2.5, np.inf], np.float32)
    keys = np.asarray(sortable_keys(values)).astype(np.int64)
    assert np.all(np.diff(keys[:3]) > 0) and keys[3] == keys[4]  # -0.0 == 0.0
    assert np.all(np.diff(keys[4:]) > 0)
    assert int(sortable_keys(jnp.array([jnp.nan]))[0]) == int(sortable_keys(jnp.array([-jnp.inf]))[0])


@given(
    shape=st.sampled_from([(7,), (5, 6), (3, 4, 5)]),
    k_frac=st.floats(0, 1),
    ties=st.sampled_from([0, 2, 5]),
    seed=st.integers(0, 1000),
)
def test_top_k_matches_stable_sort_reference(shape, k_frac, ties, seed):
    rng = np.random.default_rng(seed)
    # `ties` > 0 draws from few values so that many scores are equal (e.g. already-pruned zeros)
    scores = rng.integers(0, ties, shape).astype(np.float32) if ties else rng.standard_normal(shape).astype(np.float32)
    k = int(round(k_frac * scores.size))
    mask = np.asarray(jit_top_k(scores, k))
    assert mask.sum() == k
    np.testing.assert_array_equal(mask, reference.keep_top_k(scores, k))


def test_top_k_jits_with_traced_k_and_handles_extremes():
    scores = jnp.array([3.0, -1.0, jnp.inf, -jnp.inf, 0.0])
    f = jax.jit(top_k_mask)
    for k in range(6):
        np.testing.assert_array_equal(np.asarray(f(scores, k)), reference.keep_top_k(np.asarray(scores), k))
    assert int(top_k_mask(scores, 99).sum()) == 5 and int(top_k_mask(scores, -3).sum()) == 0


def test_bf16_and_f64_scores():
    x = np.random.default_rng(0).standard_normal(40)
    for dtype in (jnp.bfloat16, jnp.float16):
        assert int(top_k_mask(jnp.asarray(x, dtype), 13).sum()) == 13


def test_global_top_k_matches_reference():
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(4, 5), (7,), (2, 3, 2)]]
    for k in (0, 1, 17, 39):
        masks = global_top_k_masks(arrays, k)
        flat = np.concatenate([a.ravel() for a in arrays])
        expected = reference.keep_top_k(flat, k)
        np.testing.assert_array_equal(np.concatenate([np.asarray(m).ravel() for m in masks]), expected)


def test_global_ties_go_to_earlier_arrays():
    masks = global_top_k_masks([jnp.zeros(3), jnp.zeros(3)], 4)
    assert [m.tolist() for m in masks] == [[True, True, True], [True, False, False]]


@pytest.mark.parametrize("shape", [(1500,), (40, 37), (3, 3, 17, 24), (2000, 3), (64, 96)])
def test_count_true_two_stage_sum_is_exact(shape):
    # arrays above 1024 elements are summed in chunks along the last axis (padded, trailing
    # small axes merged): the count must stay exact, eagerly and under jit
    from jaxcompress.pruning.topk import count_true

    pred = np.random.default_rng(sum(shape)).random(shape) < 0.3
    assert int(count_true(jnp.asarray(pred))) == int(pred.sum())
    assert int(jax.jit(count_true)(jnp.asarray(pred))) == int(pred.sum())


@pytest.mark.parametrize("shape", [(40, 37), (3, 3, 17, 24)])
def test_top_k_exact_on_arrays_counted_in_chunks(shape):
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 7, shape).astype(np.float32)  # many ties: the index bisection runs too
    for k in (0, 1, scores.size // 3, scores.size - 1, scores.size):
        mask = np.asarray(jit_top_k(jnp.asarray(scores), k))
        np.testing.assert_array_equal(mask, reference.keep_top_k(scores, k))
