"""The jaxcompress record of a safetensors file: ``__metadata__["jaxcompress"]``, validated.

The JSON lists one record per leaf (see `jaxcompress.checkpoint.safetensors_io` for the tensor
names and `jaxcompress.checkpoint.treemeta` for the record's fields). It is untrusted input:
`read_records` checks the document and each record's shape and types (path tokens, kind,
encoding and the fields it needs, `QArray` array specs) before anything is read, and raises a
`HeaderError` naming the file and the leaf; sizes are checked against the tensors on read.
"""

from __future__ import annotations

import json
from typing import Any

from jaxcompress.checkpoint import treemeta
from jaxcompress.checkpoint.safetensors_format import HeaderError, SafetensorsReader

__all__ = ["METADATA_KEY", "read_records", "file_metadata"]

METADATA_KEY = "jaxcompress"


def read_records(reader: SafetensorsReader) -> list[dict] | None:
    """The jaxcompress leaf records of a file (validated), or ``None`` for a foreign file.

    >>> import os, tempfile, numpy as np
    >>> from jaxcompress.checkpoint.safetensors_io import export_safetensors
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> _ = export_safetensors(path, {"b": np.zeros(2, np.float32)})
    >>> [(r["name"], r["kind"], r["encoding"]) for r in read_records(SafetensorsReader(path))]
    [('b', 'array', 'dense')]
    """
    raw = reader.metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
        version, records = meta["format_version"], meta["leaves"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise HeaderError(f"{reader.path}: __metadata__['{METADATA_KEY}'] is not valid ({err})") from None
    except RecursionError:
        raise HeaderError(f"{reader.path}: __metadata__['{METADATA_KEY}'] is JSON nested too deeply") from None
    if version != treemeta.FORMAT_VERSION:
        raise HeaderError(f"{reader.path}: __metadata__['{METADATA_KEY}'] is jaxcompress format {version!r}, this version reads {treemeta.FORMAT_VERSION}")
    if not isinstance(records, list):
        raise HeaderError(f"{reader.path}: __metadata__['{METADATA_KEY}'].leaves is not a list")
    for i, record in enumerate(records):
        _check_record(record, f"{reader.path}: __metadata__['{METADATA_KEY}'].leaves[{i}]")
    return records


_RECORD_FIELDS = {"array": ("dtype", "shape"), "qarray": ("qarray",), "none": (), "masked_node": ()}
_ENCODING_FIELDS = {"dense": (), "bitmap": ("kept",), "n:m": ("n", "m", "axis", "kept")}


def _token_ok(token: Any) -> bool:
    """A path token ``[kind, key]``: ``key`` a string, or an int (``idx`` needs an int)."""
    if not isinstance(token, list) or len(token) != 2 or token[0] not in ("key", "idx", "attr"):
        return False
    key = token[1]
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        return False
    return isinstance(key, int) if token[0] == "idx" else True


def _check_record(record: Any, where: str) -> None:
    """Shape of one leaf record (types only; sizes are checked against the tensors on read)."""
    if not isinstance(record, dict):
        raise HeaderError(f"{where}: expected an object, got {type(record).__name__}")
    path, name, kind = record.get("path"), record.get("name"), record.get("kind")
    if isinstance(name, str):
        where = f"{where} (leaf {name!r})"
    if not isinstance(path, list) or not path or not all(_token_ok(t) for t in path):
        raise HeaderError(f"{where}: 'path' must be a non-empty list of [kind, key] tokens, got {path!r}"[:300])
    if not isinstance(name, str) or not isinstance(kind, str) or kind not in _RECORD_FIELDS:
        raise HeaderError(f"{where}: needs a string 'name' and a 'kind' in {sorted(_RECORD_FIELDS)}")
    missing = [f for f in _RECORD_FIELDS[kind] if f not in record]
    if missing:
        raise HeaderError(f"{where}: kind {kind!r} needs {missing}")
    encoding = record.get("encoding", "dense")
    if not isinstance(encoding, str) or encoding not in _ENCODING_FIELDS:
        raise HeaderError(f"{where}: unknown encoding {encoding!r}")
    missing = [f for f in _ENCODING_FIELDS[encoding] if f not in record]
    if missing and kind in ("array", "qarray"):
        raise HeaderError(f"{where}: encoding {encoding!r} needs {missing}")
    for key in ("kept", "n", "m", "axis"):
        if key in record and (type(record[key]) is not int or record[key] < (0 if key != "axis" else -64)):
            raise HeaderError(f"{where}: {key!r} must be a non-negative integer")
    if kind == "qarray":
        info = record["qarray"]
        arrays = info.get("arrays") if isinstance(info, dict) else None
        if not isinstance(arrays, dict) or "values" not in arrays or not isinstance(info.get("static"), dict):
            raise HeaderError(f"{where}: 'qarray' needs 'static' and 'arrays' (with 'values')")
        for field, spec in arrays.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str) or not isinstance(spec.get("shape"), list):
                raise HeaderError(f"{where}: qarray array {field!r} needs a dtype string and a shape list")


def file_metadata(records: list[dict], extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ``__metadata__`` dict for a file holding ``records`` (internal)."""
    meta = {"format": "jaxcompress", METADATA_KEY: json.dumps({"format_version": treemeta.FORMAT_VERSION, "leaves": records})}
    meta.update(extra or {})
    return meta
