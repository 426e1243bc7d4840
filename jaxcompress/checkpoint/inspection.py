"""`inspect_checkpoint`: the per-leaf table of a checkpoint, optionally against its source.

Works on compressed safetensors files (bytes per leaf come from the header, so they are exactly
what is on disk), on plain safetensors files and on Orbax directories (bytes are storage bytes:
`QArray.nbytes`, ``size * itemsize`` for arrays). With ``against`` (the uncompressed source:
safetensors or Orbax) each leaf's SQNR is measured by dequantizing it and reading the same path
from the source, one leaf at a time, and the ratio is the source file size over this one's.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import numpy as np

from jaxcompress.checkpoint import orbax_io, sparse, treemeta
from jaxcompress.checkpoint.report import CompressionTable, LeafRow
from jaxcompress.checkpoint.safetensors_format import SafetensorsReader
from jaxcompress.checkpoint.safetensors_io import decode_leaf, read_records
from jaxcompress.checkpoint.sources import Source, directory_bytes, open_source
from jaxcompress.qarray import QArray, describe_granularity

__all__ = ["inspect_checkpoint", "leaf_row"]


def _sqnr(source: Source | None, path: str, leaf: Any) -> float | None:
    if source is None or leaf is None or treemeta.is_masked_node(leaf):
        return None
    from jaxcompress.metrics import sqnr_db

    try:
        reference = source.read(path)
    except KeyError:
        return None
    approx = leaf.dequantize(np.float32) if isinstance(leaf, QArray) else np.asarray(leaf)
    if tuple(reference.shape) != tuple(approx.shape):
        raise ValueError(f"{source.path}: leaf {path!r} has shape {tuple(reference.shape)}, the checkpoint {tuple(approx.shape)}")
    if reference.dtype.kind not in "fc" and str(reference.dtype) != "bfloat16":
        return math.inf if np.array_equal(reference, np.asarray(approx)) else -math.inf
    return sqnr_db(reference.astype(np.float32), np.asarray(approx, np.float32))


def leaf_row(
    path: str, leaf: Any, mask: Any, *, nbytes: int | None = None, encoding: Literal["dense", "bitmap", "n:m"] = "dense",
    bytes_before: int | None = None, sqnr: float | None = None,
) -> LeafRow:
    """A `LeafRow` describing one (possibly quantized / masked) leaf.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> row = leaf_row("w", jc.quantize(jnp.ones((4, 4)), bits=4, channel_axes=(1,)), None)
    >>> row.format, row.granularity, row.bytes, row.bytes_before  # codes 8 B, scales 16 B, int4 zero points 2 B
    ('int4', 'per-channel(1,)', 26, 64)
    """
    if isinstance(leaf, QArray):
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype).name
        fmt = f"int{leaf.bits}" if leaf.qtype == "int" else leaf.qtype
        bits, granularity = leaf.bits, describe_granularity(leaf)
        storage = leaf.nbytes
    else:
        array = np.asarray(leaf)
        shape, dtype = tuple(array.shape), array.dtype.name
        fmt, bits, granularity, storage = dtype, None, "", array.nbytes
    count = math.prod(shape)
    zero = _zeros(leaf)
    pruned = 0
    if mask is not None and not treemeta.is_masked_node(mask):
        keep = np.broadcast_to(np.asarray(mask, bool), shape)
        pruned = count - int(np.count_nonzero(keep))
        zero &= keep  # a pruned position is counted once, as pruned
    sparsity = pruned / count if count else 0.0
    zeros = int(np.count_nonzero(zero)) / count if count else 0.0
    if bytes_before is None:
        bytes_before = count * np.dtype(dtype).itemsize
    return LeafRow(path, shape, dtype, fmt, bits, granularity, sparsity, encoding, storage if nbytes is None else nbytes,
                   bytes_before, sqnr, zeros=zeros)


def _zeros(leaf: Any) -> np.ndarray:
    """Where ``leaf``'s values are zero (bool, logical shape). For an integer `QArray` that is
    where its code equals the zero point (0 when symmetric) or its scale is 0: a bool per value,
    no float copy of the leaf. Other formats are dequantized."""
    if not isinstance(leaf, QArray):
        return np.asarray(leaf) == 0
    if leaf.qtype == "int":
        codes = np.asarray(leaf.values)
        permutation = leaf.stored_permutation  # codes stored in another axis order: a transposed view
        if permutation is not None:
            codes = np.transpose(codes, np.argsort(np.asarray(permutation)))
        if leaf.zero_point is None:  # x = code * scale (/ input_scale): zero iff the code is
            return codes == 0
        # x = (code - zero_point) * scale (/ input_scale): compared in the codes' own dtype, so
        # only the bools (and, with groups, the per-value zero points) are made
        shape, group = tuple(leaf.shape), (leaf.group_axis, leaf.group_size)
        return (codes == sparse.per_value(np.asarray(leaf.zero_point), shape, *group)) | sparse.per_value(np.asarray(leaf.scale) == 0, shape, *group)
    return np.asarray(leaf.dequantize(np.float32)) == 0


def _tensor_names(record: dict, reader: SafetensorsReader) -> list[str]:
    name = record["name"]
    candidates = {name, name + ".values", name + ".mask_bitmap", name + ".nm_indices"}
    candidates |= {f"{name}.{field}" for field in record.get("qarray", {}).get("arrays", {})}
    return [n for n in candidates if n in reader.tensors]


def _progress(iterable: Any, total: int, progress: bool) -> Any:
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="inspect", unit="leaf", leave=False)


def inspect_checkpoint(path: str | os.PathLike, against: str | os.PathLike | None = None, *, progress: bool = False) -> CompressionTable:
    """Per-leaf `CompressionTable` of ``path`` (and SQNR / ratio against ``against``).

    >>> import os, tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> from jaxcompress.checkpoint import compress_checkpoint
    >>> folder = tempfile.mkdtemp()
    >>> src, dst = os.path.join(folder, "m.safetensors"), os.path.join(folder, "q.safetensors")
    >>> save_file({"dense.weight": np.random.default_rng(0).normal(size=(8, 128)).astype(np.float32)}, src)
    >>> _ = compress_checkpoint(src, dst, "w8a8")
    >>> row, = inspect_checkpoint(dst, against=src).rows
    >>> row.path, row.format, row.bytes, row.sqnr_db > 35
    ('dense/weight', 'int8', 1056, True)
    """
    path = os.path.abspath(os.fspath(path))
    source = open_source(against) if against is not None else None
    rows = []
    if os.path.isdir(path):
        params, masks = orbax_io.load_checkpoint(path)
        mask_of = {treemeta.path_name(t): m for t, m in treemeta.flatten_leaves(masks)} if masks is not None else {}
        leaves = [(t, leaf) for t, leaf in treemeta.flatten_leaves(params) if leaf is not None and not treemeta.is_masked_node(leaf)]
        for tokens, leaf in _progress(leaves, len(leaves), progress):
            name = treemeta.path_name(tokens)
            before = _source_bytes(source, name)
            rows.append(leaf_row(name, leaf, mask_of.get(name), bytes_before=before, sqnr=_sqnr(source, name, leaf)))
        file_bytes = directory_bytes(path)
    else:
        reader = SafetensorsReader(path)
        records = read_records(reader)
        if records is None:  # a plain safetensors file
            records = [{"path": [["key", p] for p in n.split(".")], "name": n, "kind": "plain"} for n in reader.tensors]
        for record in _progress(records, len(records), progress):
            if record["kind"] in ("none", "masked_node"):
                continue
            name = treemeta.path_name(record["path"])
            if record["kind"] == "plain":
                leaf, mask = reader.read(record["name"]), None
            else:
                leaf, mask = decode_leaf(record, reader.read, reader.path)
            nbytes = sum(reader.nbytes(t) for t in _tensor_names(record, reader))
            before = _source_bytes(source, name)
            rows.append(leaf_row(name, leaf, mask, nbytes=nbytes, encoding=record.get("encoding", "dense"), bytes_before=before, sqnr=_sqnr(source, name, leaf)))
            del leaf, mask
        file_bytes = os.path.getsize(path)
    title = os.path.basename(path) + (f" against {os.path.basename(source.path)}" if source else "")
    return CompressionTable(tuple(rows), title, file_bytes, source.total_bytes if source else None)


def _source_bytes(source: Source | None, name: str) -> int | None:
    if source is None:
        return None
    for leaf in source.leaves:
        if leaf.path == name:
            return leaf.nbytes
    return None
