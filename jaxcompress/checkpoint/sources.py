"""Read an uncompressed checkpoint leaf by leaf: a safetensors file or an Orbax directory.

`open_source` validates the whole checkpoint's layout (safetensors header, Orbax metadata)
before anything is read or written and lists its leaves; `Source.iter_arrays` then yields
one NumPy array at a time (Orbax: small groups of leaves via partial restores), so a caller
holding one compressed leaf at a time stays near the size of the largest leaf.

safetensors names are split on ``.`` into pytree keys, so ``encoder.layer.0.output.dense.weight``
is matched by rules as ``encoder/layer/0/output/dense/weight``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator

import numpy as np

from jaxcompress._errors import CheckpointFormatError, CheckpointNotFoundError
from jaxcompress.checkpoint import orbax_io, treemeta
from jaxcompress.checkpoint.safetensors_format import HeaderError, SafetensorsReader
from jaxcompress.checkpoint.safetensors_io import read_records

__all__ = ["SourceLeaf", "Source", "open_source", "directory_bytes"]


@dataclasses.dataclass(frozen=True)
class SourceLeaf:
    """One leaf of a source checkpoint: encoded path tokens, shape, dtype name, bytes."""

    tokens: tuple
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def path(self) -> str:
        return treemeta.path_name(self.tokens, "/")


def directory_bytes(path: str) -> int:
    """Total size of the files under ``path`` (or of the file ``path``).

    >>> import tempfile
    >>> directory_bytes(tempfile.mkdtemp())
    0
    """
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


@dataclasses.dataclass
class Source:
    """An opened, validated source checkpoint (see `open_source`)."""

    path: str
    format: str  # "safetensors" or "orbax"
    leaves: list[SourceLeaf]
    total_bytes: int
    _reader: Any = None
    _names: dict = dataclasses.field(default_factory=dict)

    @property
    def largest_leaf_bytes(self) -> int:
        return max((leaf.nbytes for leaf in self.leaves), default=0)

    def row_reader(self, leaf: SourceLeaf) -> Any:
        """``read(begin, end)`` returning rows ``begin:end`` of ``leaf`` without reading the rest
        (safetensors), or ``None`` when the format cannot (Orbax)."""
        if self.format != "safetensors" or not leaf.shape:
            return None
        name = self._names[leaf.tokens]
        return lambda begin, end: self._reader.read_rows(name, begin, end)

    def iter_leaves(self) -> Iterator[tuple[SourceLeaf, Any]]:
        """Yield ``(leaf, load)`` where ``load()`` reads the whole array: lets a caller that can
        work on row slices (see `row_reader`) skip reading whole leaves. Orbax leaves are
        restored in small groups as the iteration reaches them."""
        if self.format == "safetensors":
            for leaf in self.leaves:
                yield leaf, (lambda leaf=leaf: self._reader.read(self._names[leaf.tokens]))
            return
        for leaf, array in self.iter_arrays():
            yield leaf, (lambda array=array: array)
            del array

    def iter_arrays(self) -> Iterator[tuple[SourceLeaf, np.ndarray]]:
        """Yield ``(leaf, array)`` in order, one array alive at a time (for safetensors)."""
        if self.format == "safetensors":
            for leaf in self.leaves:
                yield leaf, self._reader.read(self._names[leaf.tokens])
            return
        by_tokens = {leaf.tokens: leaf for leaf in self.leaves}
        budget = max(self.largest_leaf_bytes // 4, 1 << 20)
        leaves = orbax_io.iter_orbax_leaves(self.path, budget_bytes=budget)
        while True:
            try:
                tokens, array = next(leaves)
            except StopIteration:
                return
            except Exception as err:  # tensorstore / orbax errors for damaged data files
                raise CheckpointFormatError(f"{self.path}: cannot read the checkpoint's arrays (corrupt or truncated?): {type(err).__name__}: {str(err)[:500]}") from None
            yield by_tokens[_freeze(tokens)], array

    def read(self, path: str) -> np.ndarray:
        """One leaf by its ``/``-joined path (safetensors: direct read; Orbax: partial restore)."""
        for leaf in self.leaves:
            if leaf.path == path:
                if self.format == "safetensors":
                    return self._reader.read(self._names[leaf.tokens])
                import orbax.checkpoint as ocp

                tokens = [list(t) for t in leaf.tokens]
                item = treemeta.tree_from_records([(tokens, 0)])
                args = treemeta.tree_from_records([(tokens, ocp.RestoreArgs(restore_type=np.ndarray))])
                with orbax_io.checkpointer(ocp.PyTreeCheckpointer, self.path) as reader:
                    raw = reader.restore(self.path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
                return np.asarray(orbax_io._lookup(raw, tokens, f"{self.path}/{path}"))
        raise KeyError(f"{self.path}: no leaf {path!r}")


def _freeze(tokens: Any) -> tuple:
    return tuple(tuple(t) for t in tokens)


def open_source(path: str | os.PathLike) -> Source:
    """Open a float checkpoint for `compress_checkpoint`: a ``.safetensors`` file or an Orbax
    checkpoint directory. A file `jaxcompress.export_safetensors` wrote from a float tree (plain
    dense arrays only) is a source too. Raises a `CheckpointFormatError` (a ``ValueError``; for a
    missing path `CheckpointNotFoundError`, also a ``FileNotFoundError``) naming the path and what
    was expected for a missing, truncated, corrupt or foreign checkpoint, or one that is already
    compressed (a `QArray`, a mask or a sparse encoding in it).

    >>> import os, tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_file({"dense.weight": np.ones((2, 3), np.float32)}, path)
    >>> source = open_source(path)
    >>> source.format, [(leaf.path, leaf.shape) for leaf in source.leaves]
    ('safetensors', [('dense/weight', (2, 3))])
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointNotFoundError(2, f"{path}: no such checkpoint (expected a .safetensors file or an Orbax directory)")
    if os.path.isdir(path):
        return _open_orbax(path)
    reader = SafetensorsReader(path)
    records = read_records(reader)
    if records is not None:
        return _open_plain_jaxcompress(path, reader, records)
    leaves: list[SourceLeaf] = []
    names: dict[tuple, str] = {}
    for name in sorted(reader.tensors, key=lambda n: reader.tensors[n][2]):
        dtype, shape, begin, end = reader.tensors[name]
        tokens = tuple(("key", part) for part in name.split("."))
        if tokens in names:
            raise HeaderError(f"{path}: tensor names {name!r} and {names[tokens]!r} map to the same path")
        names[tokens] = name
        leaves.append(SourceLeaf(tokens, shape, dtype.name, end - begin))
    _check_prefixes(path, [leaf.tokens for leaf in leaves])
    return Source(path, "safetensors", leaves, os.path.getsize(path), reader, names)


def _open_plain_jaxcompress(path: str, reader: SafetensorsReader, records: list[dict]) -> Source:
    """A file `export_safetensors` wrote from a tree of plain dense arrays (a float tree) is a
    source like any other, its leaves at the paths its records name (keys split on ``.``, as
    for any safetensors file); one with a `QArray`, a
    mask, a sparse encoding or a placeholder leaf is already compressed and refused."""
    leaves: list[SourceLeaf] = []
    names: dict[tuple, str] = {}
    for record in records:
        where = f"{path}: leaf {record['name']!r}"
        if record["kind"] == "qarray" or record.get("mask") or record.get("encoding", "dense") != "dense":
            raise CheckpointFormatError(f"{path}: already a jaxcompress-compressed file ({where[len(path) + 2:]} is quantized, masked or sparse-encoded); compress the original float checkpoint")
        if record["kind"] != "array":
            raise CheckpointFormatError(f"{where}: a {record['kind']!r} placeholder, not an array; a source checkpoint holds arrays only")
        name = record["name"]
        if name not in reader.tensors:
            raise HeaderError(f"{where}: tensor {name!r} is missing from the file")
        dtype, shape, begin, end = reader.tensors[name]
        if dtype.name != record["dtype"] or list(shape) != record["shape"]:
            raise CheckpointFormatError(f"{where}: stored as {dtype.name}{list(shape)}, recorded as {record['dtype']}{record['shape']} (packed sub-byte arrays are not a float source)")
        # Keys split on "." as for any safetensors source: a flat {"encoder.dense.weight": ...}
        # tree and a nested one get the same paths (the tensor names are the same); list
        # indices stay indices.
        tokens = tuple(("key", part) if kind == "key" else (kind, key)
                       for kind, key in record["path"] for part in (str(key).split(".") if kind == "key" else [key]))
        if tokens in names:
            raise HeaderError(f"{where}: two records have the path {treemeta.path_name(tokens, '/')!r}")
        names[tokens] = name
        leaves.append(SourceLeaf(tokens, shape, dtype.name, end - begin))
    extra = sorted(set(reader.tensors) - set(names.values()))
    if extra:
        raise HeaderError(f"{path}: tensors {extra[:4]} belong to no jaxcompress record")
    _check_prefixes(path, [leaf.tokens for leaf in leaves])
    return Source(path, "safetensors", leaves, os.path.getsize(path), reader, names)


def _check_prefixes(path: str, all_tokens: list[tuple]) -> None:
    keys = set(all_tokens)
    for tokens in all_tokens:
        for cut in range(1, len(tokens)):
            if tokens[:cut] in keys:
                raise HeaderError(
                    f"{path}: tensor {treemeta.path_name(tokens[:cut], '.')!r} is also the prefix of "
                    f"{treemeta.path_name(tokens, '.')!r}; such names cannot form a tree"
                )


def _open_orbax(path: str) -> Source:
    if not orbax_io.is_orbax_checkpoint(path):
        raise CheckpointFormatError(
            f"{path}: a directory but not an Orbax checkpoint (no _CHECKPOINT_METADATA or _METADATA); "
            f"expected an Orbax checkpoint directory or a .safetensors file"
        )
    import jax

    step_metadata = orbax_io.read_step_metadata(path)
    if (step_metadata.custom_metadata or {}).get(orbax_io.METADATA_KEY) is not None:
        raise CheckpointFormatError(f"{path}: already a jaxcompress checkpoint; compress the original float checkpoint")
    tree = getattr(step_metadata.item_metadata, "tree", step_metadata.item_metadata)
    if tree is None:
        raise CheckpointFormatError(f"{path}: the Orbax checkpoint has no readable item metadata (corrupt or truncated, or not saved by a StandardCheckpointer)")
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda m: hasattr(m, "shape"))
    leaves = []
    for key_path, meta in flat:
        if meta is None or not hasattr(meta, "shape"):
            continue
        dtype = np.dtype(meta.dtype)
        shape = tuple(int(d) for d in meta.shape)
        leaves.append(SourceLeaf(_freeze(treemeta.encode_path(key_path)), shape, dtype.name, math.prod(shape) * dtype.itemsize))
    if not leaves:
        raise CheckpointFormatError(f"{path}: the Orbax checkpoint holds no arrays")
    return Source(path, "orbax", leaves, directory_bytes(path))
