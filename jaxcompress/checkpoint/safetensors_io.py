"""safetensors export / import of compressed trees, so compressed weights can leave JAX.

Tensor names (``<name>`` is the leaf's pytree path joined with ``.``, e.g.
``encoder.layer.0.attention.self.query.weight``):

==============================  ==================================================================
``<name>``                      a plain (unquantized, dense) array, in its own dtype
``<name>.values``               a `QArray`'s values (logical layout), or a sparse plain array's kept values
``<name>.scale``                a `QArray`'s float32 scale (original rank, see `jaxcompress.QArray`)
``<name>.zero_point``           asymmetric `QArray`s only; same container as the values
``<name>.<field>``              any other array field of `QArray` (e.g. ``activation_scale``)
``<name>.mask_bitmap``          ``U8``: 1 bit per element, little-endian in each byte, C order:
                                the kept elements (bitmap encoding) and/or the pruning mask
``<name>.nm_indices``           ``U8``: N:M encoding: each kept value's position in its group of
                                ``m`` along ``axis``, packed ``ceil(log2 m)`` bits (rounded up to
                                1/2/4/8) per index
==============================  ==================================================================

``int4`` / ``int2`` containers (no safetensors dtype exists) are stored as ``U8`` with two /
four values per byte (two's complement, low bits first). With the bitmap encoding ``.values``
holds only the kept elements (C order); with N:M the kept elements group by group (``axis``
moved last). A `QArray` whose codes are stored in another axis order
(`QArray.stored_permutation`) is written in its LOGICAL layout (the tensor has the param's shape,
like its scale and mask; any reader sees the usual layout) and the permutation is recorded; import
stores the codes that way again. Files without it (older ones) load in the logical layout.
Everything needed to rebuild the tree exactly (path keys, logical dtype and shape,
encoding, `QArray` static metadata, which leaves carry a mask) is JSON in
``__metadata__["jaxcompress"]``; ``__metadata__["format"]`` is ``"jaxcompress"``.

A safetensors file without that entry (e.g. a Hugging Face checkpoint) imports as nested dicts
split on ``.`` with plain NumPy-backed arrays. Headers are validated before any data is read
(`SafetensorsReader`), every record before it is used, and every `QArray` strictly
(`jaxcompress.qarray.check_qarray`): a tampered file is a `HeaderError` naming the file and the
leaf. 64-bit leaves (``int64`` step counters, ``float64``) come back as exact NumPy arrays when
JAX's x64 mode is off, instead of being truncated to 32 bits. Nothing is unpickled.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress._errors import ArgumentError
from jaxcompress.checkpoint import sparse, treemeta
from jaxcompress.checkpoint.safetensors_format import DTYPES, HeaderError, SafetensorsReader, SafetensorsWriter
from jaxcompress.checkpoint.safetensors_records import METADATA_KEY, file_metadata, read_records  # noqa: F401 (re-exported)
from jaxcompress.qarray import QArray

__all__ = ["export_safetensors", "import_safetensors", "encode_leaf", "decode_leaf", "read_records", "ENCODINGS"]

ENCODINGS = ("auto", "dense", "bitmap", "n:m")
_NATIVE = set(DTYPES.values())


def _stored(values: np.ndarray) -> tuple[np.ndarray, bool]:
    if values.dtype in _NATIVE:
        return values, False
    if values.dtype in sparse._SUB_BYTE:
        return sparse.pack_values(values), True
    raise TypeError(f"dtype {values.dtype} cannot be stored in safetensors")


def _choose(values: np.ndarray, mask: np.ndarray | None, encoding: str, name: str) -> tuple[str, Any]:
    count = values.size
    dense_bytes = sparse.packed_nbytes(count, values.dtype) + (math.ceil(count / 8) if mask is not None else 0)
    if encoding == "dense" or values.ndim == 0 or (encoding == "auto" and mask is None):
        return "dense", None
    support = mask if mask is not None else sparse.nonzero(values)
    exact = mask is None or sparse.zero_outside(values, mask)
    if not exact:
        if encoding in ("bitmap", "n:m"):
            raise ArgumentError(f"{name}: {encoding} encoding needs zeros (or, for asymmetric codes, the zero point) where the mask is False; use encoding 'auto' or 'dense'")
        return "dense", None
    kept = int(np.count_nonzero(support))
    options: list[tuple[str, Any, int]] = [("bitmap", None, math.ceil(count / 8) + sparse.packed_nbytes(kept, values.dtype))]
    for axis in sorted({max(values.ndim - 2, 0), values.ndim - 1}):
        pattern = sparse.n_m_pattern(support, axis)
        if pattern is not None:
            n, m = pattern
            cost = sparse.packed_nbytes(kept, values.dtype) + math.ceil(kept * sparse.index_bits(m) / 8)
            options.append(("n:m", (n, m, axis), cost))
            break
    if encoding != "auto":
        chosen = [o for o in options if o[0] == encoding]
        if not chosen:
            raise ArgumentError(f"{name}: the mask is not N:M along the last two axes; cannot use encoding 'n:m' (use 'auto', 'bitmap' or 'dense')")
        return chosen[0][0], chosen[0][1]
    best = min(options, key=lambda o: o[2])
    return (best[0], best[1]) if best[2] < dense_bytes else ("dense", None)


def _encode_values(base: str, dense_name: str, values: np.ndarray, mask: np.ndarray | None, encoding: str, where: str, record: dict) -> list:
    kind, extra = _choose(values, mask, encoding, where)
    record["encoding"] = kind
    tensors = []
    if kind == "dense":
        stored, _ = _stored(values)
        tensors.append((dense_name, stored))
        if mask is not None:
            tensors.append((base + ".mask_bitmap", sparse.pack_bits(mask.reshape(-1), 1)))
    elif kind == "bitmap":
        bitmap, kept = sparse.encode_bitmap(values, mask, name=where)
        record["kept"] = int(kept.size)
        tensors.append((base + ".mask_bitmap", bitmap))
        tensors.append((base + ".values", _stored(kept)[0]))
    else:
        n, m, axis = extra
        support = mask if mask is not None else sparse.nonzero(values)
        kept, indices = sparse.encode_n_m(values, support, n, m, axis, name=where)
        record.update(n=n, m=m, axis=axis, kept=int(kept.size))
        tensors.append((base + ".values", _stored(kept.reshape(-1))[0]))
        tensors.append((base + ".nm_indices", indices))
    return tensors


def encode_leaf(tokens: list, leaf: Any, mask: Any = None, *, encoding: str = "auto", where: str | None = None) -> tuple[dict, list]:
    """``(record, [(tensor name, array), ...])`` for one leaf (see the module docs for names).

    ``mask``: a bool array (the leaf's pruning mask), ``optax.MaskedNode()`` or ``None``.

    >>> import numpy as np
    >>> w = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 3], np.int8)
    >>> record, tensors = encode_leaf([["key", "w"]], w, mask=w != 0)
    >>> record["encoding"], [(n, a.tolist()) for n, a in tensors]
    ('bitmap', [('w.mask_bitmap', [0, 2]), ('w.values', [3])])
    """
    if encoding not in ENCODINGS:
        raise ArgumentError(f"encoding {encoding!r} is not one of {ENCODINGS}")
    name = treemeta.path_name(tokens, ".")
    where = where or name
    record: dict[str, Any] = {"path": tokens, "name": name}
    if mask is not None and not treemeta.is_masked_node(mask):
        mask = np.asarray(mask).astype(bool)
        record["mask"] = True
    else:
        mask = None
        record["mask"] = False
    if leaf is None or treemeta.is_masked_node(leaf):
        record["kind"] = "none" if leaf is None else "masked_node"
        return record, []
    if isinstance(leaf, QArray):
        record["kind"] = "qarray"
        # The file holds the codes in the LOGICAL layout (the param's own shape, like the scale
        # and the mask); `QArray.stored_permutation` is recorded and re-applied on import.
        arrays = {k: np.asarray(v) for k, v in treemeta.qarray_array_fields(leaf.with_layout(None)).items()}
        record["qarray"] = {
            "static": treemeta.qarray_static(leaf),
            "arrays": {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in arrays.items()},
        }
        values = arrays.pop("values")
        dense_name = name + ".values"
    else:
        record["kind"] = "array"
        values = np.asarray(leaf)
        record["dtype"], record["shape"] = values.dtype.name, list(values.shape)
        arrays = {}
        dense_name = name
    if mask is not None and mask.shape != values.shape:
        raise ValueError(f"{where}: mask shape {mask.shape} differs from the leaf's {values.shape}")
    if mask is not None and "zero_point" in arrays and encoding != "dense":
        # Asymmetric codes: a pruned value's code is its group's zero point, not 0. Store 0 there
        # (so the sparse encodings apply) and record that the reader puts the zero point back.
        fill = sparse.per_value(arrays["zero_point"], values.shape, leaf.group_axis, leaf.group_size)
        if np.array_equal(values[~mask], fill[~mask]):
            values = values.copy()
            values[~mask] = 0
            record["fill"] = "zero_point"
    try:
        tensors = _encode_values(name, dense_name, values, mask, encoding, where, record)
        tensors += [(f"{name}.{field}", _stored(value)[0]) for field, value in sorted(arrays.items())]
    except TypeError as err:
        raise TypeError(f"{where}: {err}") from None
    return record, tensors


def _as_array(values: np.ndarray) -> Any:
    """A JAX array, except 64-bit data while x64 is off: an exact NumPy array instead (JAX would
    truncate an int64 step counter ``2**40 + 5`` to ``5``)."""
    if values.dtype.itemsize == 8 and values.dtype.kind in "iufc" and not jax.config.read("jax_enable_x64"):
        return values
    return jnp.asarray(values)


def _dtype(name: Any, where: str) -> np.dtype:
    try:
        if not isinstance(name, str):
            raise TypeError(name)
        dtype = jnp.dtype(name)
    except (TypeError, ValueError):
        raise HeaderError(f"{where}: unknown dtype {name!r}"[:300]) from None
    if dtype.kind not in "biuf" and dtype.name != "bfloat16" and not dtype.name.startswith(("float8", "int4", "int2", "uint4", "uint2")):
        raise HeaderError(f"{where}: dtype {dtype.name} cannot be stored")
    return dtype


def _shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise HeaderError(f"{where}: shape {shape!r} is not a list of non-negative integers"[:300])
    return tuple(shape)


def _read_values(read: Callable, tensor: str, dtype: np.dtype, shape: tuple, where: str) -> np.ndarray:
    try:
        raw = read(tensor)
    except KeyError:
        raise HeaderError(f"{where}: tensor {tensor!r} is missing from the file") from None
    count = math.prod(shape)
    if dtype in sparse._SUB_BYTE:
        if raw.dtype != np.uint8 or raw.size != sparse.packed_nbytes(count, dtype):
            raise HeaderError(f"{where}: tensor {tensor!r} is {raw.dtype}{list(raw.shape)}, expected U8[{sparse.packed_nbytes(count, dtype)}] (packed {dtype})")
        return sparse.unpack_values(raw, dtype, shape)
    if raw.dtype != dtype or raw.size != count:
        raise HeaderError(f"{where}: tensor {tensor!r} is {raw.dtype}{list(raw.shape)}, expected {dtype}{list(shape)}")
    return raw.reshape(shape)


def decode_leaf(record: dict, read: Callable[[str], np.ndarray], where: str = "") -> tuple[Any, Any]:
    """``(leaf, mask)`` from a record and a ``read(tensor name) -> ndarray`` function; ``mask`` is
    a bool array, or ``optax.MaskedNode()`` when the leaf had none. Inverse of `encode_leaf`.

    >>> import numpy as np
    >>> w = np.array([0.0, 2.0, 0.0, 0.0], np.float32)
    >>> record, tensors = encode_leaf([["key", "w"]], w, mask=w != 0)
    >>> leaf, mask = decode_leaf(record, dict(tensors).__getitem__)
    >>> leaf.tolist(), mask.tolist()
    ([0.0, 2.0, 0.0, 0.0], [False, True, False, False])
    """
    name = record["name"]
    where = f"{where}: leaf {name!r}" if where else name
    kind = record["kind"]
    if kind in ("none", "masked_node"):
        return (None if kind == "none" else treemeta.masked_node_or(None)), treemeta.masked_node_or(None)
    if kind == "qarray":
        info = record["qarray"]["arrays"]
        dtype, shape = _dtype(info["values"]["dtype"], where), _shape(info["values"]["shape"], where)
        dense_name = name + ".values"
    elif kind == "array":
        dtype, shape, dense_name = _dtype(record["dtype"], where), _shape(record["shape"], where), name
    else:
        raise HeaderError(f"{where}: unknown leaf kind {kind!r}")
    try:
        return _decode(record, read, where, kind, dtype, shape, dense_name, info if kind == "qarray" else None)
    except HeaderError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as err:  # a record that passed its checks but does not fit
        raise HeaderError(f"{where}: {type(err).__name__}: {err}") from None


def _sparse(decode: Callable, *args: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``decode(*args, name=name)``; its ValueErrors (counts that do not fit) name the leaf."""
    try:
        return decode(*args, name=name)
    except ValueError as err:
        raise HeaderError(str(err)) from None


def _decode(record: dict, read: Callable, where: str, kind: str, dtype: np.dtype, shape: tuple, dense_name: str, info: Any) -> tuple[Any, Any]:
    name = record["name"]
    encoding = record.get("encoding", "dense")
    mask = None
    count = math.prod(shape)
    if encoding == "dense":
        values = _read_values(read, dense_name, dtype, shape, where)
        if record.get("mask"):
            mask = sparse.unpack_bits(_read_values(read, name + ".mask_bitmap", np.dtype(np.uint8), (math.ceil(count / 8),), where), 1, count).astype(bool).reshape(shape)
    elif encoding == "bitmap":
        bitmap = _read_values(read, name + ".mask_bitmap", np.dtype(np.uint8), (math.ceil(count / 8),), where)
        kept = _read_values(read, name + ".values", dtype, (int(record["kept"]),), where)
        values, mask = _sparse(sparse.decode_bitmap, bitmap, kept, shape, name=where)
    elif encoding == "n:m":
        try:
            n, m, axis, kept_count = (int(record[k]) for k in ("n", "m", "axis", "kept"))
        except KeyError as err:
            raise HeaderError(f"{where}: the n:m record lacks {err}") from None
        if not (1 <= n <= m <= 256 and -len(shape) <= axis < len(shape)) or shape[axis] % m:
            raise HeaderError(f"{where}: n:m record n={n}, m={m}, axis={axis} does not fit shape {shape} (expected 1 <= n <= m <= 256 and m dividing an axis)")
        kept = _read_values(read, name + ".values", dtype, (kept_count,), where)
        indices = _read_values(read, name + ".nm_indices", np.dtype(np.uint8), (math.ceil(kept_count * sparse.index_bits(m) / 8),), where)
        values, mask = _sparse(sparse.decode_n_m, kept, indices, shape, n, m, axis, name=where)
    else:
        raise HeaderError(f"{where}: unknown encoding {encoding!r}")
    if "fill" in record:
        if record["fill"] != "zero_point" or kind != "qarray" or "zero_point" not in info or mask is None or encoding == "dense":
            raise HeaderError(f"{where}: fill {record['fill']!r} needs an asymmetric QArray stored sparse "
                              "(expected 'zero_point' on a bitmap / n:m leaf with a zero_point array)"[:300])
        spec = info["zero_point"]
        point = _read_values(read, f"{name}.zero_point", _dtype(spec["dtype"], where), _shape(spec["shape"], where), where)
        try:
            static = record["qarray"]["static"]
            fill = sparse.per_value(point, tuple(values.shape), static.get("group_axis"), static.get("group_size"))
        except (ValueError, IndexError, TypeError) as err:
            raise HeaderError(f"{where}: the zero point of shape {tuple(point.shape)} does not fit the values {tuple(values.shape)}: {err}") from None
        values = np.where(mask, values, fill).astype(values.dtype)
    mask_out = jnp.asarray(mask) if record.get("mask") else treemeta.masked_node_or(None)
    if kind == "array":
        return _as_array(values), mask_out
    arrays = {"values": jnp.asarray(values)}
    for field, spec in info.items():
        if field != "values":
            arrays[field] = jnp.asarray(_read_values(read, f"{name}.{field}", _dtype(spec["dtype"], where), _shape(spec["shape"], where), where))
    static = dict(record["qarray"]["static"])
    permutation = static.pop("stored_permutation", None)
    logical = treemeta.qarray_from_parts(static, arrays, where)
    if permutation is None:
        return logical, mask_out
    return treemeta.qarray_from_parts(record["qarray"]["static"], {**treemeta.qarray_array_fields(logical), "values": _stored_values(logical, permutation, where)}, where), mask_out


def _stored_values(logical: QArray, permutation: Any, where: str) -> Any:
    """The codes of ``logical`` in the recorded axis order (files keep the logical layout)."""
    if not isinstance(permutation, list) or sorted(p for p in permutation if type(p) is int) != list(range(logical.ndim)):
        raise HeaderError(f"{where}: stored_permutation {permutation!r} is not a permutation of the {logical.ndim} axes"[:300])
    return jnp.transpose(logical.values, tuple(permutation))


def _mask_lookup(params_leaves: list, masks: Any, path: str) -> dict[str, Any]:
    if masks is None:
        return {}
    mask_leaves = {treemeta.path_name(t): m for t, m in treemeta.flatten_leaves(masks)}
    names = {treemeta.path_name(t) for t, _ in params_leaves}
    if set(mask_leaves) != names:
        raise ValueError(f"{path}: the masks tree does not match the params (only in masks: {sorted(set(mask_leaves) - names)[:5]}, only in params: {sorted(names - set(mask_leaves))[:5]})")
    return mask_leaves


def export_safetensors(path: str | os.PathLike, params: Any, masks: Any = None, *, encoding: str = "auto", metadata: dict[str, str] | None = None) -> int:
    """Write ``params`` (with `QArray`s, optionally ``masks``) to a safetensors file, atomically.

    ``encoding``: ``"auto"`` (leaves with a mask get the smallest exact encoding among dense +
    bitmap, bitmap and N:M; leaves without a mask stay dense), ``"dense"``, ``"bitmap"`` (kept =
    the mask, or the nonzeros when there is none) or ``"n:m"``. Returns the file size in bytes.

    >>> import os, tempfile, jax.numpy as jnp, optax, jaxcompress as jc
    >>> w = jnp.where(jnp.arange(64.0).reshape(16, 4) % 10 == 0, 1.0, 0.0)
    >>> params = {"w": jc.quantize(w, bits=4, channel_axes=(-1,)), "b": jnp.ones(4)}
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> size = export_safetensors(path, params, {"w": w != 0, "b": optax.MaskedNode()})
    >>> restored, masks = import_safetensors(path)
    >>> restored["w"].values.dtype, int(masks["w"].sum()), masks["b"]
    (dtype(int4), 7, MaskedNode())
    """
    path = os.fspath(path)
    leaves = treemeta.flatten_leaves(params)
    mask_of = _mask_lookup(leaves, masks, path)
    records = []
    writer_tensors = []
    names = set()
    with SafetensorsWriter(path) as writer:
        for tokens, leaf in leaves:
            key = treemeta.path_name(tokens)
            record, tensors = encode_leaf(tokens, leaf, mask_of.get(key), encoding=encoding, where=f"{path}: leaf {key!r}")
            if record["name"] in names:
                raise ValueError(f"{path}: two leaves are both named {record['name']!r} when joined with '.'")
            names.add(record["name"])
            records.append(record)
            for tensor_name, array in tensors:
                writer.add(tensor_name, array)
            writer_tensors.append(record["name"])
        writer.metadata = file_metadata(records, metadata)
    return os.path.getsize(path)


def _foreign_tree(reader: SafetensorsReader) -> Any:
    pairs = [([["key", part] for part in name.split(".")], _as_array(reader.read(name))) for name in sorted(reader.tensors)]
    try:
        return treemeta.tree_from_records(pairs)
    except ValueError as err:
        raise HeaderError(f"{reader.path}: {err}") from None


def import_safetensors(path: str | os.PathLike, target: Any = None) -> tuple[Any, Any]:
    """Read ``(params, masks)`` from a safetensors file (``masks`` is None when no leaf has one).

    With ``target`` (any tree with the same leaf paths) the result takes the target's structure.
    See `export_safetensors` for an example.
    """
    reader = SafetensorsReader(path)
    records = read_records(reader)
    if records is None:
        params, masks = _foreign_tree(reader), None
    else:
        pairs, mask_pairs = [], []
        for record in records:
            leaf, mask = decode_leaf(record, reader.read, reader.path)
            pairs.append((record["path"], leaf))
            mask_pairs.append((record["path"], mask))
        try:
            params = treemeta.tree_from_records(pairs)
            masks = treemeta.tree_from_records(mask_pairs) if any(r.get("mask") for r in records) else None
        except ValueError as err:  # two records with one path, or a leaf that is also a prefix
            raise HeaderError(f"{reader.path}: {err}") from None
    if target is not None:
        params = _into_target(params, target, reader.path)
        masks = None if masks is None else _into_target(masks, target, reader.path)
    return params, masks


def _into_target(tree: Any, target: Any, path: str) -> Any:
    import jax

    by_name = {treemeta.path_name(t): leaf for t, leaf in treemeta.flatten_leaves(tree)}
    flat, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=lambda x: x is None or isinstance(x, QArray) or treemeta.is_masked_node(x))
    out = []
    for key_path, _ in flat:
        name = treemeta.path_name(treemeta.encode_path(key_path))
        if name not in by_name:
            raise ValueError(f"{path}: the target has leaf {name!r}, the file does not")
        out.append(by_name.pop(name))
    if by_name:
        raise ValueError(f"{path}: the file has leaves the target lacks: {sorted(by_name)[:5]}")
    return jax.tree_util.tree_unflatten(treedef, out)
