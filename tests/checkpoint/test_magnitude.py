"""The bounded-memory magnitude mask equals `jaxcompress.pruning.prune_params`' mask exactly."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.checkpoint.magnitude import magnitude_mask, num_to_keep
from jaxcompress.pruning import PruneRule, prune_params


def _reference(w, sparsity):
    _, masks = prune_params({"w": jnp.asarray(w)}, [PruneRule(pattern="w", sparsity=sparsity)])
    return np.asarray(masks["w"])


@settings(max_examples=8, deadline=None)
@given(
    rows=st.sampled_from([1, 7, 32]),  # few shapes: each new shape compiles prune_params
    cols=st.sampled_from([5, 32]),
    sparsity=st.sampled_from([0.0, 0.1, 0.37, 0.5, 0.9, 0.99]),
    kind=st.sampled_from(["normal", "ties", "zeros"]),
    seed=st.integers(0, 2**16),
    chunk=st.sampled_from([3, 64, 1 << 20]),
)
def test_equals_prune_params(rows, cols, sparsity, kind, seed, chunk):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "ties":
        w = np.round(w * 2) / 2
    elif kind == "zeros":
        w[rng.random(w.shape) < 0.6] = 0.0
        w.flat[0] = 1e-41  # a denormal: ties with zero, as in XLA on CPU
        w.flat[-1] = -0.0
    np.testing.assert_array_equal(magnitude_mask(w, sparsity, chunk=chunk), _reference(w, sparsity))


@pytest.mark.parametrize("sparsity", [0.0, 0.9, 0.999999])
def test_counts_match_float32_rounding(sparsity):
    size = 30522 * 384
    assert num_to_keep(sparsity, size) == size - int(np.round(np.float32(sparsity) * np.float32(size)))


def test_nan_ranks_lowest():
    w = np.array([1.0, np.nan, -3.0, 0.5], np.float32)
    np.testing.assert_array_equal(magnitude_mask(w, 0.5), _reference(w, 0.5))


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_row_slices_equal_whole(rows):
    from jaxcompress.checkpoint.magnitude import magnitude_mask_from_rows

    w = np.round(np.random.default_rng(5).standard_normal((37, 11)).astype(np.float32) * 3) / 3
    for sparsity in (0.0, 0.5, 0.93):
        np.testing.assert_array_equal(
            magnitude_mask_from_rows(lambda b, e: w[b:e], w.shape, sparsity, rows=rows), magnitude_mask(w, sparsity)
        )
