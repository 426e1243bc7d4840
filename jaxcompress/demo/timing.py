"""Interleaved latency measurement for the demo's table: every variant timed in the same rounds.

A shared 2-core machine drifts (other processes, frequency scaling) on the scale of seconds, so
timing variant A for a while and then variant B compares A's quiet moment with B's busy one:
the two int8 variants of one architecture once read 6.4 and 13.6 ms. `interleaved_latency`
instead runs one call of each variant per round, in a rotating order, for ``repeats`` rounds,
and reports each variant's median and interquartile range over its rounds.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping

import numpy as np

__all__ = ["Spread", "interleaved_latency"]


@dataclasses.dataclass(frozen=True)
class Spread:
    """Latency of one variant (milliseconds): the median and the 25th / 75th percentiles of
    ``repeats`` timed calls."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    repeats: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Spread":
        """The spread of ``seconds`` (one timed call each), in milliseconds.

        >>> Spread.of([0.001, 0.002, 0.003, 0.004, 0.100]).median_ms
        3.0
        """
        if not seconds:
            raise ValueError("Spread.of needs at least one timing")
        ms = 1e3 * np.asarray(seconds, np.float64)
        p25, median, p75 = np.percentile(ms, [25, 50, 75])
        return cls(float(median), float(p25), float(p75), len(seconds))

    def format_iqr(self) -> str:
        """``'p25-p75'`` with two decimals, e.g. ``'0.50-0.55'``."""
        return f"{self.p25_ms:.2f}-{self.p75_ms:.2f}"


def interleaved_latency(calls: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, Spread]:
    """Time every ``calls[name]()`` (a function that runs one forward pass and waits for its
    result) ``repeats`` times in interleaved rounds; each is called ``warmup`` times first
    (compilation, allocation). Returns ``{name: Spread}``.

    >>> spreads = interleaved_latency({"a": lambda: sum(range(1000)), "b": lambda: None}, repeats=5)
    >>> sorted(spreads), spreads["a"].repeats
    (['a', 'b'], 5)
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(calls)
    for name in names:
        for _ in range(max(warmup, 1)):
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names) if names else 0
        for name in names[shift:] + names[:shift]:  # no variant always runs first (or last)
            start = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: Spread.of(samples[name]) for name in names}
