"""Per-leaf compression metrics as data: SQNR, bytes before / after, totals and ratio.

Byte counts are storage bytes: a float leaf counts ``size * itemsize``; a `QArray` counts its
packed values plus scales and zero points (`QArray.nbytes`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.qarray import QArray, describe_granularity
from jaxcompress.rules import path_to_keystr, path_to_str

__all__ = ["LeafMetrics", "CompressionMetrics", "quantization_metrics", "sqnr_db", "leaf_nbytes"]


def leaf_nbytes(leaf: Any) -> int:
    """Storage bytes of one leaf (a `QArray`, an array, or a Python scalar)."""
    if isinstance(leaf, QArray):
        return leaf.nbytes
    if leaf is None:
        return 0
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return np.asarray(leaf).nbytes


@jax.jit
def _signal_and_noise(x: jax.Array, approx: jax.Array):
    x = x.astype(jnp.float32)
    noise = x - approx.astype(jnp.float32)
    return jnp.sum(jnp.square(x)), jnp.sum(jnp.square(noise))


def sqnr_db(x: Any, approx: Any) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - approx)^2)`` in dB.

    ``inf`` when the approximation is exact (including an all-zero ``x``).

    >>> import jax.numpy as jnp
    >>> round(sqnr_db(jnp.array([1.0, 1.0]), jnp.array([1.1, 0.9])), 3)
    20.0
    """
    signal, noise = (float(v) for v in _signal_and_noise(jnp.asarray(x), jnp.asarray(approx)))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclasses.dataclass(frozen=True)
class LeafMetrics:
    path: str
    shape: tuple[int, ...]
    format: str
    granularity: str
    bytes_before: int
    bytes_after: int
    sqnr_db: float | None

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else math.inf


@dataclasses.dataclass(frozen=True)
class CompressionMetrics:
    """Per-leaf `LeafMetrics` plus totals."""

    leaves: tuple[LeafMetrics, ...]

    @property
    def bytes_before(self) -> int:
        return sum(m.bytes_before for m in self.leaves)

    @property
    def bytes_after(self) -> int:
        return sum(m.bytes_after for m in self.leaves)

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else math.inf

    @property
    def quantized(self) -> tuple[LeafMetrics, ...]:
        return tuple(m for m in self.leaves if m.sqnr_db is not None)

    @property
    def median_sqnr_db(self) -> float | None:
        values = [m.sqnr_db for m in self.quantized if m.sqnr_db is not None]
        return float(np.median(values)) if values else None

    def to_dict(self) -> dict[str, Any]:
        def clean(value):
            return None if isinstance(value, float) and not math.isfinite(value) else value

        return {
            "leaves": [
                {**dataclasses.asdict(m), "sqnr_db": clean(m.sqnr_db), "ratio": clean(m.ratio)}
                for m in self.leaves
            ],
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ratio": clean(self.ratio),
            "median_sqnr_db": clean(self.median_sqnr_db),
        }

    def table(self) -> str:
        """A plain-text table, one row per leaf, then the totals."""
        header = f"{'path':<48} {'shape':<16} {'format':<14} {'granularity':<30} {'bytes':>12} {'ratio':>7} {'SQNR dB':>8}"
        rows = [header, "-" * len(header)]
        for m in self.leaves:
            sqnr = "" if m.sqnr_db is None else f"{m.sqnr_db:8.2f}"
            rows.append(
                f"{m.path:<48} {str(m.shape):<16} {m.format:<14} {m.granularity:<30} "
                f"{m.bytes_after:>12,} {m.ratio:>7.2f} {sqnr:>8}"
            )
        median = self.median_sqnr_db
        rows.append("-" * len(header))
        rows.append(
            f"total: {self.bytes_before:,} -> {self.bytes_after:,} bytes, ratio {self.ratio:.2f}x"
            + ("" if median is None else f", median SQNR {median:.2f} dB")
        )
        return "\n".join(rows)


def _format_name(q: QArray) -> str:
    return f"int{q.bits}" if q.qtype == "int" else q.qtype


def quantization_metrics(params: Any, qparams: Any) -> CompressionMetrics:
    """Compare ``qparams`` (with `QArray` leaves) against the original ``params``.

    The two trees must have the same structure, with `QArray` nodes in ``qparams`` where
    ``params`` has arrays.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jnp.linspace(-1, 1, 64).reshape(8, 8)}
    >>> qparams, _ = jc.quantize_params(params, [jc.QuantRule(pattern="w", bits=8)])
    >>> m = jc.quantization_metrics(params, qparams)
    >>> m.bytes_before, m.bytes_after
    (256, 68)
    """
    flat_q = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, QArray))[0]
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    q_paths, p_paths = [path for path, _ in flat_q], [path for path, _ in flat_p]
    if q_paths != p_paths:
        index = next((i for i, (a, b) in enumerate(zip(q_paths, p_paths)) if a != b), min(len(q_paths), len(p_paths)))
        where = lambda paths: path_to_keystr(paths[index]) if index < len(paths) else "(no more leaves)"
        raise ValueError(
            f"params and qparams do not have the same tree structure: leaf {index} is {where(p_paths)} "
            f"in params but {where(q_paths)} in qparams"
        )
    leaves = []
    for (path, qleaf), (_, leaf) in zip(flat_q, flat_p):
        path_str = path_to_str(path)
        shape = tuple(getattr(leaf, "shape", ()))
        if isinstance(qleaf, QArray):
            if tuple(qleaf.shape) != shape:
                raise ValueError(
                    f"{path_to_keystr(path)}: quantized shape {qleaf.shape} does not match the "
                    f"original shape {shape}"
                )
            leaves.append(
                LeafMetrics(
                    path_str,
                    shape,
                    _format_name(qleaf),
                    describe_granularity(qleaf),
                    leaf_nbytes(leaf),
                    qleaf.nbytes,
                    sqnr_db(leaf, qleaf.dequantize()),
                )
            )
        else:
            dtype = getattr(leaf, "dtype", None)
            fmt = jnp.dtype(dtype).name if dtype is not None else type(leaf).__name__
            leaves.append(
                LeafMetrics(path_str, shape, fmt, "-", leaf_nbytes(leaf), leaf_nbytes(qleaf), None)
            )
    return CompressionMetrics(tuple(leaves))
