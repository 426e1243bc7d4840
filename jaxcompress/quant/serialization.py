"""`QArray` in ``jax.export``: its pytree node registered for export serialization.

``jax.export.export(jax.jit(f))(q, x).serialize()`` writes the calling convention (the input
and output pytree structure) into the artifact, so every custom node in it needs a registered
serializer. Importing this module registers `jaxcompress.QArray` under the name
``"jaxcompress.QArray"``: its static fields (the pytree auxdata: ``bits``, ``qtype``,
``channel_axes``, ``group_axis``, ``group_size``, ``dtype``, ``activation``, and any static
field a later version adds) are written as JSON *by name*, read back by name, so

* a field added later (absent from an older artifact) takes its dataclass default;
* a field this version does not know is a `jaxcompress.CheckpointFormatError` naming it.

The array fields (values, scale, ...) are ordinary inputs of the exported function and need
nothing here.

>>> import jax, jax.numpy as jnp, jaxcompress as jc
>>> import jaxcompress.quant.serialization  # registers QArray (jaxcompress imports it too)
>>> q = jc.quantize(jnp.arange(8.0).reshape(4, 2), bits=8, channel_axes=(1,))
>>> f = jc.compressed(lambda w, x: x @ w)
>>> x = jnp.ones((3, 4))
>>> blob = jax.export.export(jax.jit(f))(q, x).serialize()
>>> restored = jax.export.deserialize(blob)
>>> bool(jnp.array_equal(restored.call(q, x), jax.jit(f)(q, x)))
True
"""

from __future__ import annotations

import dataclasses
import json

import jax

from jaxcompress._errors import CheckpointFormatError
from jaxcompress.checkpoint.treemeta import _from_json_static, _json_static
from jaxcompress.qarray import QArray

__all__ = ["SERIALIZED_NAME", "static_field_names", "serialize_static", "deserialize_static"]

SERIALIZED_NAME = "jaxcompress.QArray"
_FORMAT = 1


def static_field_names() -> tuple[str, ...]:
    """The static fields of `QArray`, in the order of its pytree auxdata.

    >>> static_field_names()[:3]
    ('bits', 'qtype', 'channel_axes')
    """
    return tuple(field.name for field in dataclasses.fields(QArray) if field.metadata.get("static", False))


def serialize_static(auxdata: tuple) -> bytes:
    """JSON bytes of a `QArray` node's auxdata (its static field values, by field name).

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> node = jax.tree_util.tree_structure(jc.quantize(jnp.ones((2, 2)), bits=4)).node_data()
    >>> json.loads(serialize_static(node[1]))["fields"]["bits"]
    4
    """
    names = static_field_names()
    if len(auxdata) != len(names):
        raise ValueError(f"QArray auxdata has {len(auxdata)} entries, the static fields are {names}")
    fields = {name: _json_static(value) for name, value in zip(names, auxdata)}
    return json.dumps({"format": _FORMAT, "fields": fields}, sort_keys=True).encode("utf-8")


def deserialize_static(data: bytes) -> tuple:
    """Inverse of `serialize_static`: the auxdata tuple in this version's field order.

    A field the data lacks takes the `QArray` default; an unknown one, or data that is not a
    serialized `QArray` node, is a `jaxcompress.CheckpointFormatError`.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> aux = jax.tree_util.tree_structure(jc.quantize(jnp.ones((2, 2)), bits=4)).node_data()[1]
    >>> deserialize_static(serialize_static(aux)) == aux
    True
    """
    try:
        document = json.loads(bytes(data).decode("utf-8"))
        version, fields = document["format"], document["fields"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointFormatError(f"{SERIALIZED_NAME}: the serialized node data is not valid ({type(err).__name__}: {err})") from None
    if version != _FORMAT or not isinstance(fields, dict):
        raise CheckpointFormatError(f"{SERIALIZED_NAME}: node data format {version!r}, this version reads {_FORMAT}")
    defaults = {field.name: field for field in dataclasses.fields(QArray)}
    names = static_field_names()
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise CheckpointFormatError(
            f"{SERIALIZED_NAME}: the artifact has QArray static field(s) {unknown}, which this version's "
            f"QArray lacks (static fields: {list(names)}); it was exported by a different jaxcompress version"
        )
    out = []
    for name in names:
        if name in fields:
            try:
                out.append(_from_json_static(fields[name]))
            except (TypeError, ValueError) as err:
                raise CheckpointFormatError(f"{SERIALIZED_NAME}: field {name!r} = {fields[name]!r} is not valid ({err})"[:400]) from None
        else:
            field = defaults[name]
            if field.default is dataclasses.MISSING:
                raise CheckpointFormatError(f"{SERIALIZED_NAME}: the artifact lacks QArray static field {name!r}, which has no default")
            out.append(field.default)
    return tuple(out)


def _register() -> None:
    try:
        jax.export.register_pytree_node_serialization(
            QArray, serialized_name=SERIALIZED_NAME, serialize_auxdata=serialize_static, deserialize_auxdata=deserialize_static
        )
    except ValueError:  # already registered (the module was reloaded): the registration stands
        pass


_register()
