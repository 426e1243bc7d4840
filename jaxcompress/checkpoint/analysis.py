"""Measurements for reports: XLA cost analysis, latency medians, and an accuracy-vs-size
Pareto plot (matplotlib is optional and imported only when a plot is drawn)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Sequence

import jax

__all__ = ["Cost", "cost_analysis", "latency", "Latency", "ParetoPoint", "pareto_front", "pareto_figure", "pareto_plot"]


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


# Where a label may sit relative to its point (offset in points, horizontal alignment), tried
# in this order until one overlaps no label placed before it.
_LABEL_SLOTS = (
    ((5, 5), "left"), ((5, -11), "left"), ((-5, 5), "right"), ((-5, -11), "right"),
    ((5, 16), "left"), ((-5, 16), "right"), ((5, -22), "left"), ((-5, -22), "right"),
    ((12, 28), "left"), ((-12, 28), "right"), ((12, -34), "left"), ((-12, -34), "right"),
)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(f"pareto_plot needs matplotlib (pip install matplotlib): {err}") from None
    return plt


def _place_labels(fig: Any, ax: Any, points: Sequence[ParetoPoint]) -> None:
    """One annotation per point, each in the first of `_LABEL_SLOTS` whose box overlaps no
    earlier label and no marker (the least-overlapping slot if all do; far slots get a leader)."""
    renderer = fig.canvas.get_renderer()
    to_pixels = ax.transData.transform
    markers = [to_pixels((p.size_bytes / 2**20, p.accuracy)) for p in points]
    radius = 4.0  # marker radius in pixels (about 6 pt markers at dpi 100)
    placed: list[Any] = []
    for p in sorted(points, key=lambda p: (p.size_bytes, p.accuracy)):
        best, best_overlap = None, None
        for offset, align in _LABEL_SLOTS:
            far = abs(offset[1]) > 20
            text = ax.annotate(
                p.label, (p.size_bytes / 2**20, p.accuracy), textcoords="offset points", xytext=offset,
                ha=align, va="bottom" if offset[1] > 0 else "top", fontsize=8,
                arrowprops=dict(arrowstyle="-", color="0.6", lw=0.6) if far else None,
            )
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            overlap = sum(_overlap_area(box, other) for other in placed)
            overlap += sum(_overlap_area(box, _point_box(m, radius)) for m in markers)
            if best_overlap is None or overlap < best_overlap:
                if best is not None:
                    best[0].remove()
                best, best_overlap = (text, box), overlap
            else:
                text.remove()
            if overlap == 0:
                break
        assert best is not None
        placed.append(best[1])


def _point_box(center: Any, radius: float) -> Any:
    from matplotlib.transforms import Bbox

    return Bbox.from_extents(center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius)


def _overlap_area(a: Any, b: Any) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def pareto_figure(points: Sequence[ParetoPoint], *, title: str = "accuracy vs size", accuracy_label: str = "accuracy") -> Any:
    """The accuracy-vs-size figure of ``points`` (a matplotlib ``Figure``; close it when done):
    size on a log axis (MiB), every variant marked and labelled (labels placed so they do not
    overlap each other or the markers), the Pareto front (`pareto_front`) as a step line through
    its points, which are marked in its colour.

    >>> pts = [ParetoPoint("f32", 4e6, 0.9), ParetoPoint("int8", 1e6, 0.89), ParetoPoint("bad", 2e6, 0.5)]
    >>> try:
    ...     fig = pareto_figure(pts)
    ... except ImportError:  # matplotlib is optional
    ...     pass
    ... else:
    ...     ax, = fig.axes
    ...     print(ax.get_xscale(), len(ax.texts))
    ...     import matplotlib.pyplot as plt; plt.close(fig)
    log 3
    """
    if not points:
        raise ValueError("pareto_figure needs at least one ParetoPoint, got none")
    for p in points:
        if not p.size_bytes > 0:
            raise ValueError(f"ParetoPoint {p.label!r}: size_bytes must be > 0 on a log axis, got {p.size_bytes}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    front = pareto_front(points)
    on_front = {id(p) for p in front}
    others = [p for p in points if id(p) not in on_front]
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.2, 0.5, 1, 2 ... not 2x10^-1
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.xaxis.set_minor_formatter(plain)
    if others:
        ax.scatter([p.size_bytes / 2**20 for p in others], [p.accuracy for p in others], s=30, color="tab:blue",
                   zorder=3, label="variant")
    ax.step([p.size_bytes / 2**20 for p in front], [p.accuracy for p in front], where="post", color="tab:orange",
            marker="o", markersize=6, zorder=4, label="Pareto front")
    sizes = [p.size_bytes / 2**20 for p in points]
    accuracies = [p.accuracy for p in points]
    low, high = min(sizes), max(sizes)
    ax.set_xlim(low / 1.6, high * 1.6)
    spread = (max(accuracies) - min(accuracies)) or abs(max(accuracies)) or 1.0
    ax.set_ylim(min(accuracies) - 0.15 * spread, max(accuracies) + 0.15 * spread)
    ax.set_xlabel("size (MiB, log scale)")
    ax.set_ylabel(accuracy_label)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _place_labels(fig, ax, points)
    return fig


def pareto_plot(points: Sequence[ParetoPoint], path: str, *, title: str = "accuracy vs size", accuracy_label: str = "accuracy") -> str:
    """Write `pareto_figure`'s plot of ``points`` to the PNG ``path``; returns ``path``.

    Needs matplotlib (``pip install matplotlib``); raises ``ImportError`` saying so otherwise.

    >>> import os, tempfile
    >>> pts = [ParetoPoint("f32", 100, 0.9), ParetoPoint("int8", 25, 0.89)]
    >>> try:
    ...     out = pareto_plot(pts, os.path.join(tempfile.mkdtemp(), "pareto.png"))
    ... except ImportError:
    ...     out = "pareto.png"  # matplotlib is optional
    >>> out.endswith("pareto.png")
    True
    """
    fig = pareto_figure(points, title=title, accuracy_label=accuracy_label)
    try:
        fig.savefig(path, dpi=120)
    finally:
        _pyplot().close(fig)
    return path
