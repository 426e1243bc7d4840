"""Rank statistics for validating a cheap sensitivity against the end-to-end measure
(`benchmarks/mixed_precision.py --validate`): average ranks, Spearman's rho and Kendall's tau-b,
NumPy only, float64, non-finite pairs dropped."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["average_ranks", "spearman", "kendall_tau"]


def average_ranks(values: Any) -> np.ndarray:
    """1-based ranks of a 1-D array, ties sharing the mean of the ranks they span (float64).

    >>> average_ranks([10.0, 30.0, 20.0, 30.0])
    array([1. , 3.5, 2. , 3.5])
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 1:
        raise ValueError(f"average_ranks: expected a 1-D array, got shape {v.shape}")
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # the largest rank of each distinct value
    return (upper - (counts - 1) / 2.0)[inverse.ravel()]


def _finite_pairs(a: Any, b: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"{name}: a and b must have the same shape, got {x.shape} and {y.shape}")
    x, y = x.ravel(), y.ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation of the pairs where both ``a`` and ``b`` are finite (arrays of one
    shape, flattened): the Pearson correlation of their `average_ranks`. ``nan`` with fewer than
    two pairs or when either side is constant. NumPy only (float64).

    >>> spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 40.0, 30.0]), spearman([1, 2, 3], [3, 2, 1])
    (0.8, -1.0)
    """
    x, y = _finite_pairs(a, b, "spearman")
    if x.size < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(np.sum(rx * rx)) * float(np.sum(ry * ry)))
    return float(np.sum(rx * ry) / denominator) if denominator > 0 else float("nan")


def kendall_tau(a: Any, b: Any) -> float:
    """Kendall's tau-b of the pairs where both ``a`` and ``b`` are finite: (concordant - discordant)
    pairs over ``sqrt((n0 - ties_a) (n0 - ties_b))``, ``n0 = n (n - 1) / 2`` (ties counted per
    side, as scipy's default). ``nan`` when undefined. O(n^2) memory: meant for a few thousand pairs.

    >>> kendall_tau([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 40.0, 30.0])
    0.6666666666666666
    """
    x, y = _finite_pairs(a, b, "kendall_tau")
    n = x.size
    if n < 2:
        return float("nan")
    i, j = np.triu_indices(n, k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    pairs = n * (n - 1) / 2.0
    denominator = math.sqrt((pairs - float(np.sum(sx == 0))) * (pairs - float(np.sum(sy == 0))))
    return float(np.sum(sx * sy) / denominator) if denominator > 0 else float("nan")
