"""The per-leaf compression table as data, and its renderers (terminal, Markdown, JSON).

`CompressionTable` holds one `LeafRow` per leaf (path, shape, dtype, format, bits, granularity,
sparsity, encoding, bytes on disk, bytes before, SQNR) plus totals; `render_text`,
`render_markdown` and `render_json` turn it into text. `compress_checkpoint` and
`inspect_checkpoint` return one. Cost analysis, latency and Pareto plots live in
`jaxcompress.checkpoint.analysis`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

__all__ = ["LeafRow", "CompressionTable", "render_text", "render_markdown", "render_json", "format_bytes"]


@dataclasses.dataclass(frozen=True)
class LeafRow:
    """One leaf of a compressed checkpoint.

    Attributes:
      path: ``/``-joined pytree path.
      shape / dtype: the leaf's logical shape and original dtype.
      format: storage format (``"int8"``, ``"int4"``, ``"float8_e4m3fn"``, or the float dtype).
      bits: bits per stored value (``None`` for unquantized leaves).
      granularity: ``per-tensor``, ``per-channel(0,)``, ``per-group(...)`` or ``""``.
      sparsity: fraction of elements pruned (masked) or zero.
      encoding: ``dense``, ``bitmap`` or ``n:m``.
      bytes: bytes this leaf occupies on disk (all its tensors).
      bytes_before: bytes of the uncompressed leaf (``None`` if unknown).
      sqnr_db: SQNR of the stored leaf against the source, if measured.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    format: str
    bits: int | None
    granularity: str
    sparsity: float
    encoding: str
    bytes: int
    bytes_before: int | None = None
    sqnr_db: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.bytes_before is None:
            return None
        return self.bytes_before / self.bytes if self.bytes else math.inf


@dataclasses.dataclass(frozen=True)
class CompressionTable:
    """Rows plus file-level totals (``file_bytes`` includes headers and metadata).

    >>> table = CompressionTable((LeafRow("w", (4, 4), "float32", "int8", 8, "per-tensor", 0.0, "dense", 20, 64),), "demo")
    >>> table.bytes, table.bytes_before, round(table.ratio, 2)
    (20, 64, 3.2)
    >>> print(render_markdown(table).splitlines()[4])
    | w | 4x4 | float32 | int8 | 8 | per-tensor | 0.0% | dense | 20 B | 64 B | 3.20x | - |
    """

    rows: tuple[LeafRow, ...]
    title: str = ""
    file_bytes: int | None = None
    source_file_bytes: int | None = None
    compressed_leaves: int | None = None  # leaves quantized or pruned (set by compress_checkpoint)

    @property
    def bytes(self) -> int:
        return sum(row.bytes for row in self.rows)

    @property
    def bytes_before(self) -> int | None:
        if any(row.bytes_before is None for row in self.rows):
            return None
        return sum(row.bytes_before for row in self.rows)

    @property
    def ratio(self) -> float | None:
        """Source file size over compressed file size when both are known, else leaf totals."""
        if self.file_bytes and self.source_file_bytes:
            return self.source_file_bytes / self.file_bytes
        before = self.bytes_before
        return None if before is None or not self.bytes else before / self.bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "leaves": [dict(dataclasses.asdict(row), shape=list(row.shape), ratio=row.ratio) for row in self.rows],
            "totals": {
                "bytes": self.bytes,
                "bytes_before": self.bytes_before,
                "file_bytes": self.file_bytes,
                "source_file_bytes": self.source_file_bytes,
                "ratio": self.ratio,
            },
        }


def format_bytes(n: int | None) -> str:
    """``1536`` -> ``'1.5 KiB'``.

    >>> format_bytes(1536), format_bytes(12)
    ('1.5 KiB', '12 B')
    """
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


_HEADERS = ("path", "shape", "dtype", "format", "bits", "granularity", "sparsity", "encoding", "bytes", "before", "ratio", "SQNR dB")


def _cells(row: LeafRow) -> list[str]:
    ratio = row.ratio
    return [
        row.path,
        "x".join(str(d) for d in row.shape) or "()",
        row.dtype,
        row.format,
        "-" if row.bits is None else str(row.bits),
        row.granularity or "-",
        f"{row.sparsity:.1%}",
        row.encoding,
        format_bytes(row.bytes),
        format_bytes(row.bytes_before),
        "-" if ratio is None else f"{ratio:.2f}x",
        "-" if row.sqnr_db is None else ("inf" if math.isinf(row.sqnr_db) else f"{row.sqnr_db:.1f}"),
    ]


def _totals_line(table: CompressionTable) -> str:
    parts = [f"{len(table.rows)} leaves", f"leaf bytes {format_bytes(table.bytes)}"]
    if table.bytes_before is not None:
        parts.append(f"before {format_bytes(table.bytes_before)}")
    if table.file_bytes is not None:
        parts.append(f"file {format_bytes(table.file_bytes)}")
    if table.source_file_bytes is not None:
        parts.append(f"source file {format_bytes(table.source_file_bytes)}")
    if table.ratio is not None:
        parts.append(f"ratio {table.ratio:.2f}x")
    return ", ".join(parts)


def render_text(table: CompressionTable, max_path: int = 60) -> str:
    """A fixed-width table for terminals (long paths are shortened from the left).

    >>> row = LeafRow("w", (2, 2), "float32", "int8", 8, "per-tensor", 0.0, "dense", 8, 16)
    >>> print(render_text(CompressionTable((row,))).splitlines()[-1])
    1 leaves, leaf bytes 8 B, before 16 B, ratio 2.00x
    """
    rows = [_cells(row) for row in table.rows]
    for cells in rows:
        if len(cells[0]) > max_path:
            cells[0] = "..." + cells[0][-(max_path - 3):]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(_HEADERS)]
    right = {1, 4, 6, 8, 9, 10, 11}
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = ([table.title] if table.title else []) + [fmt(_HEADERS), fmt(["-" * w for w in widths])]
    lines += [fmt(cells) for cells in rows]
    lines.append(_totals_line(table))
    return "\n".join(lines)


def render_markdown(table: CompressionTable) -> str:
    """A GitHub-flavoured Markdown table with a totals line."""
    lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |" for row in table.rows]
    lines.append("")
    lines.append(f"**Totals:** {_totals_line(table)}")
    if table.title:
        lines = [f"### {table.title}", ""] + lines
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def render_json(table: CompressionTable, indent: int | None = 2) -> str:
    """Strict JSON (infinite SQNR is written as the string ``"inf"``).

    >>> row = LeafRow("w", (2,), "float32", "float32", None, "", 0.0, "dense", 8, 8, float("inf"))
    >>> import json; json.loads(render_json(CompressionTable((row,))))["leaves"][0]["sqnr_db"]
    'inf'
    """
    return json.dumps(_json_safe(table.to_dict()), indent=indent, allow_nan=False)
