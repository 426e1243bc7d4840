"""The per-leaf compression table as data, and its renderers (terminal, Markdown, JSON).

`CompressionTable` holds one `LeafRow` per leaf (path, shape, dtype, format, bits, granularity,
pruned fraction, zero fraction, encoding, bytes on disk, bytes before, SQNR) plus totals; `render_text`,
`render_markdown` and `render_json` turn it into text. `compress_checkpoint` and
`inspect_checkpoint` return one. Cost analysis, latency and Pareto plots live in
`jaxcompress.checkpoint.analysis`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import textwrap
from typing import Any

__all__ = ["LeafRow", "CompressionTable", "render_text", "render_markdown", "render_json", "format_bytes", "short_granularity"]


@dataclasses.dataclass(frozen=True)
class LeafRow:
    """One leaf of a compressed checkpoint.

    Attributes:
      path: ``/``-joined pytree path.
      shape / dtype: the leaf's logical shape and original dtype.
      format: storage format (``"int8"``, ``"int4"``, ``"float8_e4m3fn"``, or the float dtype).
      bits: bits per stored value (``None`` for unquantized leaves).
      granularity: ``per-tensor``, ``per-channel(0,)``, ``per-group(...)`` or ``""``.
      sparsity: fraction of elements pruned: masked out by the leaf's mask (a bitmap or n:m
        encoding on disk); 0 for a leaf stored without a mask.
      zeros: fraction of elements that are zero without being pruned (weights that round to
        zero when quantized, or exact zeros of a float leaf).
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
    zeros: float = 0.0

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
    | w | 4x4 | float32 | int8 | 8 | per-tensor | 0.0% | 0.0% | dense | 20 B | 64 B | 3.20x | - |
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
        before = [row.bytes_before for row in self.rows]
        if any(b is None for b in before):
            return None
        return sum(b for b in before if b is not None)

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


# Markdown / JSON: every field. The terminal table drops dtype, bits and bytes before (the
# format, the ratio and the totals line say them) and abbreviates granularity to fit 100 columns.
_HEADERS = ("path", "shape", "dtype", "format", "bits", "granularity", "pruned", "zeros", "encoding", "bytes", "before", "ratio", "SQNR dB")
_TEXT_HEADERS = ("path", "shape", "format", "granularity", "pruned", "zeros", "enc", "bytes", "ratio", "SQNR")
_TEXT_RIGHT = {1, 4, 5, 7, 8, 9}
TEXT_WIDTH = 100


def _sqnr_cell(row: LeafRow) -> str:
    return "-" if row.sqnr_db is None else ("inf" if math.isinf(row.sqnr_db) else f"{row.sqnr_db:.1f}")


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
        f"{row.zeros:.1%}",
        row.encoding,
        format_bytes(row.bytes),
        format_bytes(row.bytes_before),
        "-" if ratio is None else f"{ratio:.2f}x",
        _sqnr_cell(row),
    ]


def short_granularity(text: str) -> str:
    """`jaxcompress.describe_granularity`'s words, abbreviated for a terminal column.

    >>> short_granularity("per-channel(0,) + per-group(axis=1, size=128)"), short_granularity("per-tensor")
    ('ch0 g128@1', 'tensor')
    """
    parts = []
    for part in text.split(" + "):
        channel = re.fullmatch(r"per-channel\(([\d, ]*)\)", part)
        group = re.fullmatch(r"per-group\(axis=(-?\d+), size=(\d+)\)", part)
        if channel:
            parts.append("ch" + ",".join(a.strip() for a in channel.group(1).split(",") if a.strip()))
        elif group:
            parts.append(f"g{group.group(2)}@{group.group(1)}")
        elif part == "per-tensor":
            parts.append("tensor")
        else:
            parts.append(part)
    return " ".join(parts) if text else "-"


def _text_cells(row: LeafRow) -> list[str]:
    ratio = row.ratio
    return [
        row.path,
        "x".join(str(d) for d in row.shape) or "()",
        row.format,
        short_granularity(row.granularity),
        f"{row.sparsity:.1%}",
        f"{row.zeros:.1%}",
        "-" if row.encoding == "dense" else row.encoding,
        format_bytes(row.bytes),
        "-" if ratio is None else f"{ratio:.2f}x",
        _sqnr_cell(row),
    ]


def _shorten_path(path: str, width: int) -> str:
    """``path`` in at most ``width`` characters: its first and last components and its numeric
    ones (layer indices) always, then as many of the others as fit, nearest the leaf first;
    ``..`` stands for what was left out. Cut from the left if even that does not fit.

    >>> _shorten_path("encoder/layer/0/attention/self/query/weight", 29)
    'encoder/../0/../query/weight'
    """
    if len(path) <= width:
        return path
    tokens = path.split("/")
    last = len(tokens) - 1
    kept = {0, last} | {i for i, t in enumerate(tokens) if t.isdigit()}

    def joined(indices: set[int]) -> str:
        parts, previous = [], -1
        for i in sorted(indices):
            if i > previous + 1:
                parts.append("..")
            parts.append(tokens[i])
            previous = i
        return "/".join(parts)

    if len(tokens) < 3 or len(joined(kept)) > width:
        return "..." + path[-(width - 3):]
    for i in range(last - 1, 0, -1):
        if i not in kept and len(joined(kept | {i})) <= width:
            kept.add(i)
    return joined(kept)


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


def render_text(table: CompressionTable, width: int = TEXT_WIDTH) -> str:
    """A fixed-width table for terminals, at most ``width`` columns wide where the paths can be
    shortened to make it fit (long paths keep their first and last components). Columns: path,
    shape, format, granularity (``ch0`` per channel of axis 0, ``g128@1`` groups of 128 along
    axis 1), pruned (masked out), zeros (not pruned, but zero: weights that round to zero),
    encoding, bytes on disk, ratio, SQNR (dB). `render_markdown` / `render_json` have every field.

    >>> row = LeafRow("w", (2, 2), "float32", "int8", 8, "per-tensor", 0.0, "dense", 8, 16)
    >>> print(render_text(CompressionTable((row,))))
    path  shape format granularity pruned zeros enc bytes ratio SQNR
    ----  ----- ------ ----------- ------ ----- --- ----- ----- ----
    w       2x2 int8   tensor        0.0%  0.0% -     8 B 2.00x    -
    1 leaves, leaf bytes 8 B, before 16 B, ratio 2.00x
    """
    rows = [_text_cells(row) for row in table.rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(_TEXT_HEADERS)]
    others = sum(widths[1:]) + len(widths)  # one space between columns, two after the path
    path_width = max(20, width - others)
    if widths[0] > path_width:
        for cells in rows:
            cells[0] = _shorten_path(cells[0], path_width)
        widths[0] = max([len(_TEXT_HEADERS[0])] + [len(r[0]) for r in rows])

    def fmt(cells: list[str]) -> str:
        padded = [c.rjust(w) if i in _TEXT_RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (padded[0] + "  " + " ".join(padded[1:])).rstrip()

    lines = ([table.title] if table.title else []) + [fmt(list(_TEXT_HEADERS)), fmt(["-" * w for w in widths])]
    lines += [fmt(cells) for cells in rows]
    lines += textwrap.wrap(_totals_line(table), width, subsequent_indent="  ")
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
