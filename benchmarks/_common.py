"""Small helpers shared by the benchmark scripts: timing, JSON output, a plain-text table.

Benchmarks are scripts (``python benchmarks/<name>.py``), not timed tests. They write their
numbers as JSON (default under ``results/``, which git ignores) and print a table.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"

__all__ = ["REPO_ROOT", "RESULTS_DIR", "time_calls", "environment", "to_jsonable", "write_json", "format_table"]


def time_calls(fn: Callable[[], Any], repeats: int, block: Callable[[Any], Any] | None = None) -> dict:
    """Call ``fn`` ``repeats`` times (after the caller has warmed it up) and return wall times.

    ``block`` is applied to each result before the clock stops (e.g. ``jax.block_until_ready``).
    Returns ``{"median_s", "min_s", "max_s", "runs_s"}``; on a shared CPU quote the median.
    """
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if block is not None:
            block(out)
        runs.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(runs),
        "min_s": min(runs),
        "max_s": max(runs),
        "runs_s": runs,
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the tables that quote a machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    """Where the numbers came from: host, CPU count, Python / jax versions, backend."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Other jobs on a shared CPU slow every timing down; record how busy the machine was.
        "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import jax

        info["jax"] = jax.__version__
        info["backend"] = jax.default_backend()
        info["devices"] = [str(d) for d in jax.devices()]
    except Exception as err:  # pragma: no cover - jax is a core dependency
        info["jax"] = f"unavailable: {err}"
    return info


def to_jsonable(value: Any) -> Any:
    """Numbers, arrays, tuples and dataclass-like values as strict JSON (NaN/Inf become None)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return to_jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented strict JSON, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n")
    return path


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table. ``columns`` are ``(key, header, format_spec)``, e.g.
    ``("ratio", "ratio", ".2f")``; missing or ``None`` cells print as ``-``."""

    def cell(row, key, spec):
        value = row.get(key)
        if value is None:
            return "-"
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            return str(value)

    table = [[header for _, header, _ in columns]]
    table += [[cell(row, key, spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]

    def render(line):
        return "  ".join(
            text.ljust(width) if i == 0 else text.rjust(width) for i, (text, width) in enumerate(zip(line, widths))
        )

    out = [render(table[0]), "  ".join("-" * w for w in widths)]
    out += [render(line) for line in table[1:]]
    return "\n".join(out)
