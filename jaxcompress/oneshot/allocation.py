"""Non-uniform layer-wise sparsity for one-shot pruning: OWL (Yin et al. 2024, "Outlier Weighed
Layerwise Sparsity").

A layer's outlier ratio is the fraction of its Wanda scores ``|W_ij| * ||X_j||_2`` that exceed
``threshold`` times the layer's mean score. Layers with more outliers are pruned LESS: with ``r``
the outlier ratios, each layer's sparsity is ``target - d`` where ``d`` is ``r`` minus its mean
weighted by the layers' sizes, scaled so that ``max |d| == spread``. The weighted mean
of ``d`` is zero, so the sizes-weighted mean sparsity is the target; the per-layer counts are then
rounded to whole weights by largest remainder so that the total number of pruned weights is
EXACTLY ``round(target * total size)``.

A "layer" is one weight leaf by default, or (``group=`` a regex) all leaves whose paths contain
the same first match of it (e.g. ``r"layer_\\d+/"``: a transformer block, as the paper), which
share one outlier ratio and one sparsity.

Measured (``benchmarks/oneshot_prune.py``, all-MiniLM-L6-v2 at 50%, mean cosine to fp32):
SparseGPT 0.920 uniform, 0.907 with per-kernel OWL (threshold 5, spread 0.08), 0.900 with one
sparsity per encoder layer (``group=r"layer_\\d+/"``); on the tiny
decoder LM the allocation changed nothing measurable. OWL was designed for LLMs whose activations
carry large outlier features; ``"uniform"`` stays the default of both methods.

`owl_counts` is the pure allocation from per-layer scores; `jaxcompress.oneshot.wanda.wanda` and
`jaxcompress.oneshot.sparsegpt.sparsegpt` take ``allocation="owl"`` (or an `OWL` instance).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, Sequence, Union

import numpy as np

__all__ = ["OWL", "Allocation", "resolve_allocation", "outlier_ratio", "owl_counts", "largest_remainder"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OWL:
    """OWL's settings.

    Attributes:
      threshold: a score is an outlier above ``threshold * mean`` of its layer's scores (``M``
        of the paper, 5 there).
      spread: the largest distance of a layer's sparsity from the target (``lambda`` of the
        paper, 0.08 there); reduced to fit when ``target +- spread`` leaves ``[0, 1)``.
      group: ``None`` (every leaf is a layer) or a regex: leaves whose paths share its first
        match form one layer (``re.search``; a leaf with no match is a layer of its own).

    >>> OWL(threshold=5.0, spread=0.05).spread
    0.05
    """

    threshold: float = 5.0
    spread: float = 0.08
    group: str | None = None

    def __post_init__(self):
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"OWL: threshold must be a positive number, got {self.threshold!r}")
        if not (np.isfinite(self.spread) and 0 <= self.spread < 1):
            raise ValueError(f"OWL: spread must be in [0, 1), got {self.spread!r}")
        if self.group is not None:
            try:
                re.compile(self.group)
            except re.error as err:
                raise ValueError(f"OWL: group={self.group!r} is not a valid regex ({err})") from None


Allocation = Union[Literal["uniform", "owl"], OWL]


def resolve_allocation(allocation: Allocation) -> OWL | None:
    """``None`` for ``"uniform"``, the `OWL` settings otherwise (``"owl"``: the paper's).

    >>> resolve_allocation("uniform") is None, resolve_allocation("owl").threshold
    (True, 5.0)
    """
    if isinstance(allocation, OWL):
        return allocation
    if allocation == "uniform":
        return None
    if allocation == "owl":
        return OWL()
    raise ValueError(f"allocation must be 'uniform', 'owl' or an OWL(...) instance, got {allocation!r}")


def outlier_ratio(scores: Sequence[np.ndarray], threshold: float) -> float:
    """The fraction of all ``scores`` (one layer's, possibly several arrays) above ``threshold``
    times their mean.

    >>> outlier_ratio([np.ones(9), np.array([91.0])], 5.0)     # mean 10: only 91 > 50
    0.1
    """
    flat = np.concatenate([np.asarray(s, np.float64).ravel() for s in scores])
    if flat.size == 0:
        return 0.0
    return float(np.mean(flat > threshold * np.mean(flat)))


def largest_remainder(wanted: np.ndarray, total: int, upper: np.ndarray) -> np.ndarray:
    """Integers ``c`` with ``sum(c) == total``, ``0 <= c <= upper`` and ``|c - wanted| < 1`` where
    the bounds allow: the floors of ``wanted`` plus one for the largest fractional parts.

    >>> largest_remainder(np.array([1.5, 1.5, 1.0]), 4, np.array([3, 3, 3])).tolist()
    [2, 1, 1]
    """
    wanted = np.clip(np.asarray(wanted, np.float64), 0, upper)
    counts = np.floor(wanted).astype(np.int64)
    short = int(total) - int(counts.sum())
    order = np.argsort(-(wanted - counts), kind="stable")
    step = 1 if short > 0 else -1
    while short != 0:
        moved = False
        for i in order if step > 0 else order[::-1]:
            if short == 0:
                break
            if 0 <= counts[i] + step <= upper[i]:
                counts[i] += step
                short -= step
                moved = True
        if not moved:
            raise ValueError(f"cannot place {total} pruned weights in layers of sizes {upper.tolist()}")
    return counts


def owl_counts(
    scores: Sequence[Sequence[np.ndarray]], sizes: Sequence[int], target: float, settings: OWL
) -> tuple[np.ndarray, np.ndarray]:
    """OWL allocation: ``(pruned count per layer, outlier ratio per layer)``.

    Args:
      scores: per layer, its Wanda score arrays (see `outlier_ratio`).
      sizes: per layer, its number of weights.
      target: the overall sparsity; the counts add up to exactly ``round(target * sum(sizes))``.
      settings: `OWL`.

    >>> flat = [np.ones(100)]
    >>> spiky = [np.concatenate([np.ones(90), np.full(10, 100.0)])]
    >>> counts, ratios = owl_counts([flat, spiky], [100, 100], 0.5, OWL(spread=0.1))
    >>> counts.tolist(), ratios.tolist()         # the layer with outliers keeps more
    ([60, 40], [0.0, 0.1])
    """
    sizes_arr = np.asarray(sizes, np.int64)
    if len(scores) != len(sizes_arr) or np.any(sizes_arr <= 0):
        raise ValueError(f"owl_counts: need one positive size per layer, got {len(scores)} layers and sizes {list(sizes)}")
    if not 0.0 <= float(target) < 1.0:
        raise ValueError(f"owl_counts: target sparsity must be in [0, 1), got {target!r}")
    ratios = np.array([outlier_ratio(layer, settings.threshold) for layer in scores])
    weights = sizes_arr / sizes_arr.sum()
    deviation = ratios - float(np.sum(weights * ratios))
    spread = min(settings.spread, float(target), 1.0 - float(target))
    largest = float(np.max(np.abs(deviation))) if deviation.size else 0.0
    if largest > 0:
        deviation = deviation * (spread / largest)
    total = int(np.round(float(target) * int(sizes_arr.sum())))
    upper = np.maximum(sizes_arr - 1, 0)  # never a whole layer: at least one weight stays
    counts = largest_remainder((float(target) - deviation) * sizes_arr, total, upper)
    return counts, ratios


def layer_keys(paths: Sequence[str], settings: OWL) -> list[str]:
    """The layer each path belongs to (itself, or the first match of ``settings.group``).

    >>> layer_keys(["enc/layer_0/q", "enc/layer_0/k", "head"], OWL(group=r"layer_\\d+"))
    ['layer_0', 'layer_0', 'head']
    """
    if settings.group is None:
        return list(paths)
    keys = []
    for path in paths:
        found = re.search(settings.group, path)
        keys.append(path if found is None else found.group(0))
    return keys
