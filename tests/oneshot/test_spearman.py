"""Rank correlations of `jaxcompress.oneshot.mixed` (what benchmarks/mixed_precision.py validates the
sensitivities with) against float64 hand computations, with ties and non-finite entries."""

import numpy as np
import pytest

from jaxcompress.oneshot.mixed import average_ranks, kendall_tau, spearman

# x ranks (ties averaged): 1, 2.5, 2.5, 4, 5; y ranks: 2, 1, 3.5, 3.5, 5 (both mean 3)
X = [1.0, 2.0, 2.0, 3.0, 5.0]
Y = [2.0, 1.0, 4.0, 4.0, 6.0]


def test_average_ranks_ties():
    np.testing.assert_array_equal(average_ranks(X), [1.0, 2.5, 2.5, 4.0, 5.0])
    np.testing.assert_array_equal(average_ranks([3.0, 3.0, 3.0, -1.0]), [3.0, 3.0, 3.0, 1.0])
    with pytest.raises(ValueError, match="1-D"):
        average_ranks(np.zeros((2, 2)))


def test_spearman_hand_computed_with_ties():
    # centred ranks dx = (-2, -.5, -.5, 1, 2), dy = (-1, -2, .5, .5, 2): sum dx dy = 7.25, sum dx^2 = sum dy^2 = 9.5
    assert spearman(X, Y) == pytest.approx(7.25 / 9.5, abs=1e-15)
    assert spearman(Y, X) == pytest.approx(7.25 / 9.5, abs=1e-15)


def test_spearman_without_ties_is_the_textbook_formula():
    rng = np.random.default_rng(0)
    a, b = rng.permutation(12).astype(float), rng.permutation(12).astype(float)
    d = average_ranks(a) - average_ranks(b)
    n = 12
    assert spearman(a, b) == pytest.approx(1 - 6 * np.sum(d * d) / (n * (n * n - 1)), abs=1e-12)
    assert spearman(a, np.exp(a)) == 1.0 and spearman(a, -a ** 3) == -1.0  # only the order counts


def test_kendall_tau_b_hand_computed_with_ties():
    # of the 10 pairs: 7 concordant, 1 discordant ((1,2),(2,1)), 1 tied in x, 1 tied in y -> 6 / sqrt(9 * 9)
    assert kendall_tau(X, Y) == pytest.approx(6.0 / 9.0, abs=1e-15)
    assert kendall_tau([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == -1.0


def test_non_finite_pairs_are_dropped_and_undefined_is_nan():
    a = np.array([[1.0, np.inf], [2.0, 3.0], [5.0, np.nan]])
    b = np.array([[2.0, 7.0], [1.0, 4.0], [6.0, 0.0]])  # finite pairs: (1,2) (2,1) (3,4) (5,6)
    assert spearman(a, b) == pytest.approx(spearman([1, 2, 3, 5], [2, 1, 4, 6]), abs=1e-15)
    assert kendall_tau(a, b) == pytest.approx(kendall_tau([1, 2, 3, 5], [2, 1, 4, 6]), abs=1e-15)
    assert np.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])) and np.isnan(kendall_tau([1.0], [2.0]))
    with pytest.raises(ValueError, match="same shape"):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])


def test_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(5):
        a = rng.integers(0, 6, 40).astype(float)
        b = a + rng.integers(0, 5, 40)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
