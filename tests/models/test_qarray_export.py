"""jax.export of functions taking QArray arguments (jaxcompress/quant/serialization.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress._errors import CheckpointFormatError
from jaxcompress.quant import serialization


def _roundtrip_call(f, *args):
    exported = jax.export.export(jax.jit(f))(*args)
    restored = jax.export.deserialize(exported.serialize())
    return restored, restored.call(*args)


@pytest.mark.parametrize(
    "spec",
    [
        dict(bits=8, channel_axes=(1,), activation="dynamic"),
        dict(bits=4, channel_axes=(1,), group_size=8, group_axis=0),
        dict(bits=8, channel_axes=(), symmetric=False),
    ],
)
def test_exported_compressed_function_round_trips(spec):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, 16)), jnp.float32)
    q = jc.quantize(w, **spec)
    f = jc.compressed(lambda params, x: jnp.tanh(x @ params["w"]))
    restored, out = _roundtrip_call(f, {"w": q}, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(f)({"w": q}, x)))
    # the restored calling convention is the original one, QArray node and static fields included
    assert restored.in_tree == jax.tree_util.tree_structure((({"w": q}, x), {}))
    args, _ = jax.tree_util.tree_unflatten(restored.in_tree, jax.tree_util.tree_leaves((({"w": q}, x), {})))
    rebuilt = args[0]["w"]
    for name in serialization.static_field_names():
        assert getattr(rebuilt, name) == getattr(q, name), name


def test_static_fields_by_name_default_and_unknown():
    q = jc.quantize(jnp.ones((4, 2)), bits=4, channel_axes=(1,))
    auxdata = jax.tree_util.tree_structure(q).node_data()[1]
    data = json.loads(serialization.serialize_static(auxdata))
    assert data["fields"]["bits"] == 4 and data["fields"]["channel_axes"] == [1]
    del data["fields"]["activation"]  # an artifact from a version without this field: the default
    restored = serialization.deserialize_static(json.dumps(data).encode())
    names = serialization.static_field_names()
    assert restored[names.index("activation")] == "weight_only"
    assert restored[names.index("channel_axes")] == (1,)
    data["fields"]["sparsity_layout"] = "2:4"  # a field this version does not know
    with pytest.raises(CheckpointFormatError, match="sparsity_layout"):
        serialization.deserialize_static(json.dumps(data).encode())
    with pytest.raises(CheckpointFormatError):
        serialization.deserialize_static(b"\xff not json")
