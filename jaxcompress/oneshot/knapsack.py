"""The multiple-choice knapsack behind `jaxcompress.oneshot.mixed.mixed_precision`: one candidate
per layer, least summed error, summed bytes within a budget (dynamic programming over the byte
budget; see `choose_bits`)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["choose_bits"]


def choose_bits(
    errors: np.ndarray, nbytes: np.ndarray, budget: int, *, max_states: int = 200_000
) -> tuple[np.ndarray, bool]:
    """Multiple-choice knapsack: per row (layer) pick one column (candidate) minimising the summed
    ``errors`` with the summed ``nbytes`` at most ``budget``. Returns ``(choice per layer, exact)``.

    >>> errors = np.array([[9.0, 1.0], [5.0, 4.0]])
    >>> nbytes = np.array([[10, 20], [10, 20]])
    >>> choose_bits(errors, nbytes, 30)
    (array([1, 0]), True)
    """
    errors = np.asarray(errors, np.float64)
    nbytes = np.asarray(nbytes, np.int64)
    layers, choices = errors.shape
    base = nbytes.min(axis=1)
    room = int(budget) - int(base.sum())
    if room < 0:
        raise ValueError(f"size budget {int(budget)} B is below the smallest possible total {int(base.sum())} B")
    extra = nbytes - base[:, None]
    step = int(np.gcd.reduce(extra[extra > 0])) if np.any(extra > 0) else 1
    exact = room // step <= max_states
    if not exact:
        step = math.ceil(room / max_states)
    units = -(-extra // step)  # rounded up: whatever the DP accepts fits in bytes
    exact = exact or bool(np.all(extra % step == 0))
    capacity = room // step
    best = np.zeros(capacity + 1)  # best[c]: least error of the layers so far within c units
    picks = np.zeros((layers, capacity + 1), np.int32)
    for layer in range(layers):
        new = np.full(capacity + 1, np.inf)
        for choice in range(choices):
            u = int(units[layer, choice])
            if u > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[u:] = best[: capacity + 1 - u] + errors[layer, choice]
            better = candidate < new
            new[better] = candidate[better]
            picks[layer, better] = choice
        best = new
    chosen = np.zeros(layers, np.int64)
    c = capacity
    for layer in range(layers - 1, -1, -1):
        chosen[layer] = picks[layer, c]
        c -= int(units[layer, chosen[layer]])
    if not exact:  # never worse than a uniform choice that fits
        total = lambda pick: errors[np.arange(layers), pick].sum()
        for choice in range(choices):
            uniform = np.full(layers, choice)
            if nbytes[np.arange(layers), uniform].sum() <= budget and total(uniform) < total(chosen):
                chosen = uniform
    return chosen, exact
