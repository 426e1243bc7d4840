"""Measurements for reports: XLA cost analysis, latency medians, and an accuracy-vs-size
Pareto plot (matplotlib is optional and imported only when a plot is drawn)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Sequence

import jax

__all__ = ["Cost", "cost_analysis", "latency", "Latency", "ParetoPoint", "pareto_front", "pareto_plot"]


@dataclasses.dataclass(frozen=True)
class Cost:
    """What XLA's cost model says one call of a compiled function does.

    Attributes:
      flops: floating-point operations (XLA's ``"flops"``; integer dots count here too).
      bytes_accessed: bytes read and written (XLA's ``"bytes accessed"``).
      raw: every entry XLA reported.
    """

    flops: float
    bytes_accessed: float
    raw: dict[str, float]


def cost_analysis(fn: Callable, *args: Any, **kwargs: Any) -> Cost:
    """FLOPs and bytes of ``jax.jit(fn)(*args, **kwargs)`` from the compiled executable.

    >>> import jax.numpy as jnp
    >>> cost = cost_analysis(lambda a, b: a @ b, jnp.ones((8, 16)), jnp.ones((16, 4)))
    >>> cost.flops
    1024.0
    """
    compiled = jax.jit(fn).lower(*args, **kwargs).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
        analysis = analysis[0] if analysis else {}
    analysis = {str(k): float(v) for k, v in (analysis or {}).items()}
    return Cost(analysis.get("flops", 0.0), analysis.get("bytes accessed", 0.0), analysis)


@dataclasses.dataclass(frozen=True)
class Latency:
    """Wall-clock seconds per call: the median and every sample (the CPU may be shared, so
    report the median and look at the spread)."""

    median_s: float
    samples_s: tuple[float, ...]

    @property
    def min_s(self) -> float:
        return min(self.samples_s)


def latency(fn: Callable, *args: Any, repeats: int = 20, warmup: int = 2, **kwargs: Any) -> Latency:
    """Median latency of ``jax.jit(fn)`` (compiled first; each call waits for its result).

    >>> import jax.numpy as jnp
    >>> result = latency(lambda x: x * 2, jnp.ones(4), repeats=3)
    >>> len(result.samples_s), result.median_s >= 0
    (3, True)
    """
    jitted = jax.jit(fn)
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(jitted(*args, **kwargs))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args, **kwargs))
        samples.append(time.perf_counter() - start)
    return Latency(statistics.median(samples), tuple(samples))


@dataclasses.dataclass(frozen=True)
class ParetoPoint:
    """One compressed variant: a label, its size in bytes and its accuracy (higher is better)."""

    label: str
    size_bytes: float
    accuracy: float


def pareto_front(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """The points no other point beats on both size (smaller) and accuracy (higher), by size.

    >>> pts = [ParetoPoint("f32", 100, 0.9), ParetoPoint("int8", 25, 0.89), ParetoPoint("bad", 30, 0.5)]
    >>> [p.label for p in pareto_front(pts)]
    ['int8', 'f32']
    """
    front: list[ParetoPoint] = []
    for p in sorted(points, key=lambda p: (p.size_bytes, -p.accuracy)):
        if not front or p.accuracy > front[-1].accuracy:
            front.append(p)
    return front


def pareto_plot(points: Sequence[ParetoPoint], path: str, *, title: str = "accuracy vs size", accuracy_label: str = "accuracy") -> str:
    """Write an accuracy-vs-size scatter with its Pareto front to the PNG ``path``.

    Needs matplotlib (``pip install matplotlib``); raises ``ImportError`` saying so otherwise.
    Returns ``path``.

    >>> import os, tempfile
    >>> pts = [ParetoPoint("f32", 100, 0.9), ParetoPoint("int8", 25, 0.89)]
    >>> try:
    ...     out = pareto_plot(pts, os.path.join(tempfile.mkdtemp(), "pareto.png"))
    ... except ImportError:
    ...     out = "pareto.png"  # matplotlib is optional
    >>> out.endswith("pareto.png")
    True
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(f"pareto_plot needs matplotlib (pip install matplotlib): {err}") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.scatter([p.size_bytes / 2**20 for p in points], [p.accuracy for p in points], color="tab:blue")
        for p in points:
            ax.annotate(p.label, (p.size_bytes / 2**20, p.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(points)
        ax.plot([p.size_bytes / 2**20 for p in front], [p.accuracy for p in front], color="tab:orange", label="Pareto front")
        ax.set_xlabel("size (MiB)")
        ax.set_ylabel(accuracy_label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
