"""Describe a compressed pytree as JSON-able records, and rebuild it from them.

Checkpoint formats store arrays; the structure around them (which leaves are `QArray`s, with
which static metadata; which masks are ``optax.MaskedNode()`` sentinels) is recorded here as
plain data so a checkpoint can be restored WITHOUT knowing its tree in advance.

A leaf record is a dict::

    {"path": [["key", "dense"], ["key", "kernel"]],   # one token per pytree key
     "kind": "qarray" | "array" | "none",
     "qarray": {"static": {...}, "arrays": ["values", "scale", ...]},   # kind == "qarray"
     "mask": "array" | "masked_node" | None}                            # when masks are saved

`QArray` fields are handled generically through `dataclasses.fields`: a field whose metadata
says ``static=True`` is recorded by value, any other field is an array (or ``None``). A reader
therefore keeps working when `QArray` gains an optional field; a record naming a field this
version's `QArray` lacks is an error that names the leaf. A static field marked
``omit_when_default`` (``stored_permutation``) is recorded only when it is not its default, so a
`QArray` in the logical layout is written exactly as before the field existed and older readers
still read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress._errors import CheckpointFormatError, InvalidQArrayError
from jaxcompress.qarray import QArray, check_qarray

__all__ = [
    "FORMAT_VERSION",
    "encode_path",
    "path_name",
    "qarray_static",
    "qarray_array_fields",
    "qarray_from_parts",
    "tree_from_records",
    "is_masked_node",
    "flatten_leaves",
]

FORMAT_VERSION = 1


def is_masked_node(x: Any) -> bool:
    """True for ``optax.MaskedNode()`` (the sentinel unpruned leaves carry in a masks tree).

    >>> import optax
    >>> is_masked_node(optax.MaskedNode()), is_masked_node(())
    (True, False)
    """
    return type(x).__name__ == "MaskedNode" and isinstance(x, tuple) and len(x) == 0


def _masked_node() -> Any:
    import optax

    return optax.MaskedNode()


def encode_path(path: Iterable[Any]) -> list[list[Any]]:
    """A jax key path as JSON tokens.

    >>> import jax
    >>> (path, _), = jax.tree_util.tree_flatten_with_path({"a": [1]})[0]
    >>> encode_path(path)
    [['key', 'a'], ['idx', 0]]
    """
    tokens = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            if not isinstance(key.key, (str, int)):
                raise TypeError(f"dict key {key.key!r} is not a str or int; it cannot be saved")
            tokens.append(["key", key.key])
        elif isinstance(key, jax.tree_util.SequenceKey):
            tokens.append(["idx", key.idx])
        elif isinstance(key, jax.tree_util.GetAttrKey):
            tokens.append(["attr", key.name])
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            tokens.append(["idx", key.key])
        else:
            raise TypeError(f"unsupported pytree key {key!r}")
    return tokens


def path_name(tokens: Iterable[Any], sep: str = "/") -> str:
    """The ``sep``-joined name of encoded path tokens.

    >>> path_name([["key", "a"], ["idx", 0]], ".")
    'a.0'
    """
    return sep.join(str(token[1]) for token in tokens)


def _json_static(value: Any) -> Any:
    if isinstance(value, (np.dtype, type)) or hasattr(value, "dtype") and not hasattr(value, "shape"):
        return {"dtype": jnp.dtype(value).name}
    if isinstance(value, tuple):
        return [_json_static(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return {"dtype": jnp.dtype(value).name}
    except TypeError:
        raise TypeError(f"QArray static field value {value!r} is not JSON-serialisable") from None


def _from_json_static(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"dtype"}:
        if not isinstance(value["dtype"], str):
            raise TypeError(f"dtype name {value['dtype']!r} is not a string")
        return jnp.dtype(value["dtype"])
    if isinstance(value, dict):
        raise TypeError("a static field is a number, a string, a list or {'dtype': name}")
    if isinstance(value, list):
        return tuple(_from_json_static(v) for v in value)
    return value


def _is_static(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get("static", False))


def qarray_static(q: QArray) -> dict[str, Any]:
    """Every static field of ``q`` as JSON-able data.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> qarray_static(jc.quantize(jnp.ones((2, 2)), bits=4))["bits"]
    4
    """
    return {
        f.name: _json_static(getattr(q, f.name))
        for f in dataclasses.fields(q)
        if _is_static(f) and not (f.metadata.get("omit_when_default") and getattr(q, f.name) == f.default)
    }


def qarray_array_fields(q: QArray) -> dict[str, Any]:
    """The array fields of ``q`` that are not ``None`` (``values``, ``scale``, ...)."""
    out = {}
    for field in dataclasses.fields(q):
        if not _is_static(field):
            value = getattr(q, field.name)
            if value is not None:
                out[field.name] = value
    return out


def qarray_from_parts(static: dict[str, Any], arrays: dict[str, Any], where: str = "leaf") -> QArray:
    """Rebuild a `QArray` from `qarray_static` data and its array fields, checked strictly
    (`jaxcompress.qarray.check_qarray`): anything that does not fit is a `CheckpointFormatError`
    naming ``where``.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> q = jc.quantize(jnp.ones((2, 2)), bits=4)
    >>> qarray_from_parts(qarray_static(q), qarray_array_fields(q)).bits
    4
    """
    known = {f.name: f for f in dataclasses.fields(QArray)}
    kwargs = {}
    for name, value in static.items():
        if name not in known or not _is_static(known[name]):
            raise CheckpointFormatError(
                f"{where}: the checkpoint records QArray field {name!r}, which this version's "
                f"QArray does not have as a static field (fields: {sorted(known)}); it was written "
                f"by a different jaxcompress version"
            )
        try:
            kwargs[name] = _from_json_static(value)
        except (TypeError, ValueError) as err:
            raise CheckpointFormatError(f"{where}: QArray field {name!r} = {value!r} is not valid ({err})"[:400]) from None
    for name, value in arrays.items():
        if name not in known or _is_static(known[name]):
            raise CheckpointFormatError(f"{where}: the checkpoint holds QArray array field {name!r}, unknown here")
        kwargs[name] = value
    for name in ("values", "scale"):
        if name not in kwargs:
            raise CheckpointFormatError(f"{where}: QArray record lacks its {name!r} array")
    try:
        q = QArray(**kwargs)
        check_qarray(q, strict=True)
    except (InvalidQArrayError, TypeError, ValueError) as err:
        raise CheckpointFormatError(f"{where}: {err}"[:600]) from None
    return q


def flatten_leaves(tree: Any) -> list[tuple[list, Any]]:
    """``(encoded path, leaf)`` pairs with `QArray` and ``MaskedNode`` kept as leaves; ``None``
    leaves are kept too (as ``None``).

    >>> flatten_leaves({"a": None, "b": [1]})
    [([['key', 'a']], None), ([['key', 'b'], ['idx', 0]], 1)]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None or isinstance(x, QArray) or is_masked_node(x)
    )
    return [(encode_path(path), leaf) for path, leaf in flat]


def _check_key(node: dict, key: Any, where: str) -> None:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise ValueError(f"{where}: path key {key!r} is not a string or an integer")
    if node and isinstance(next(iter(node)), str) != isinstance(key, str):
        raise ValueError(f"{where}: path key {key!r} sits next to keys of another type ({next(iter(node))!r}); a tree's dict keys are all strings or all integers")


def _insert(root: dict, tokens: list, value: Any, where: str) -> None:
    node = root
    for token in tokens[:-1]:
        key = token[1]
        _check_key(node, key, where)
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"{where}: path collides with the leaf at {key!r}")
        node = child
    key = tokens[-1][1]
    _check_key(node, key, where)
    if key in node:
        raise ValueError(f"{where}: two leaves share this path")
    node[key] = value


def _lists_where_indexed(node: Any, kinds: dict) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: _lists_where_indexed(v, kinds.get(k, {}) if isinstance(kinds.get(k), dict) else {}) for k, v in node.items()}
    if kinds.get("__kind__") == "idx" and sorted(out) == list(range(len(out))):
        return [out[i] for i in range(len(out))]
    return out


def tree_from_records(pairs: Iterable[tuple[list, Any]]) -> Any:
    """Nested containers from ``(encoded path, leaf)`` pairs: dicts for dict keys and attributes,
    lists for sequence indices (so a tree saved from lists comes back with lists).

    >>> tree_from_records([([["key", "a"], ["idx", 0]], 1), ([["key", "a"], ["idx", 1]], 2)])
    {'a': [1, 2]}
    """
    root: dict = {}
    kinds: dict = {}
    for tokens, value in pairs:
        if not tokens:
            return value
        _insert(root, tokens, value, path_name(tokens))
        node = kinds
        for token in tokens:
            node.setdefault("__kind__", token[0])
            node = node.setdefault(token[1], {})
    return _lists_where_indexed(root, kinds)


def masked_node_or(value: Any) -> Any:
    """``optax.MaskedNode()`` when ``value`` is None, else ``value`` (internal)."""
    return _masked_node() if value is None else value
