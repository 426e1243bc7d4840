"""Checkpoints of `QArray`s whose codes are stored in another axis order (`stored_permutation`):
safetensors files hold the LOGICAL layout (plus the permutation), Orbax checkpoints the stored one;
both round-trip exactly, and files written without the field load in the logical layout."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors import safe_open

import jaxcompress as jc
from jaxcompress._errors import ArgumentError
from jaxcompress.checkpoint import orbax_io, safetensors_io, treemeta
from jaxcompress.checkpoint.safetensors_format import HeaderError

RULES = [
    jc.QuantRule(pattern=r"asym/kernel", bits=8, channel_axes=(-1,), activation="dynamic", symmetric=False),
    jc.QuantRule(pattern=r".*kernel", bits=8, channel_axes=(-1,), activation="static"),
]


def _qparams():
    w = jax.random.normal(jax.random.key(0), (12, 6))
    w = jnp.where(jnp.abs(w) < 0.6, 0.0, w)  # pruned zeros, so masks and sparse encodings apply
    params = {"dense": {"kernel": w, "bias": jnp.arange(6.0)}, "asym": {"kernel": w[:8, :4] + 0.5}}
    qparams, _ = jc.quantize_params(params, RULES, on_unused="error")
    qparams["dense"]["kernel"] = dataclasses.replace(qparams["dense"]["kernel"], activation_scale=jnp.float32(0.05))
    masks = {"dense": {"kernel": w != 0, "bias": optax.MaskedNode()}, "asym": {"kernel": optax.MaskedNode()}}
    return qparams, masks


def _assert_same(restored, qparams):
    for name in ("dense", "asym"):
        a, b = restored[name]["kernel"], qparams[name]["kernel"]
        assert a.stored_permutation == b.stored_permutation == (1, 0) and a.shape == b.shape
        for field in ("values", "scale", "zero_point", "activation_scale"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None), field
            if x is not None:
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("encoding", ["dense", "bitmap", "auto"])
def test_safetensors_round_trip_keeps_layout_and_writes_logical_codes(tmp_path, encoding):
    qparams, masks = _qparams()
    q = qparams["dense"]["kernel"]
    assert q.stored_permutation == (1, 0)
    path = tmp_path / "m.safetensors"
    jc.export_safetensors(path, qparams, masks if encoding != "dense" else None, encoding=encoding)
    restored, restored_masks = jc.import_safetensors(path)
    _assert_same(restored, qparams)
    if encoding != "dense":
        np.testing.assert_array_equal(np.asarray(restored_masks["dense"]["kernel"]), np.asarray(masks["dense"]["kernel"]))
    if encoding == "dense":  # the file's tensor is the logical (in, out) code matrix
        with safe_open(str(path), "numpy") as f:
            np.testing.assert_array_equal(f.get_tensor("dense.kernel.values"), np.asarray(q.logical_values))
            record = json.loads(f.metadata()["jaxcompress"])
        [leaf] = [r for r in record["leaves"] if r["name"] == "dense.kernel"]
        assert leaf["qarray"]["static"]["stored_permutation"] == [1, 0]
        assert leaf["qarray"]["arrays"]["values"]["shape"] == [12, 6]


def test_logical_qarrays_are_recorded_as_before_and_old_files_load_logical():
    q = jc.quantize(jnp.ones((4, 2)), channel_axes=(1,), activation="dynamic")
    assert "stored_permutation" not in treemeta.qarray_static(q)  # byte-identical records for logical QArrays
    record, tensors = safetensors_io.encode_leaf([["key", "w"]], q)
    leaf, _ = safetensors_io.decode_leaf(record, dict(tensors).__getitem__)
    assert leaf.stored_permutation is None and leaf.values.shape == (4, 2)


def test_safetensors_rejects_a_bad_recorded_permutation():
    q = jc.quantize(jnp.ones((4, 2)), channel_axes=(1,), activation="dynamic").with_layout((1, 0))
    record, tensors = safetensors_io.encode_leaf([["key", "w"]], q)
    record["qarray"]["static"]["stored_permutation"] = [0, 0]
    with pytest.raises(HeaderError):
        safetensors_io.decode_leaf(record, dict(tensors).__getitem__)


def test_orbax_round_trip_keeps_the_stored_layout(tmp_path):
    qparams, masks = _qparams()
    path = tmp_path / "ckpt"
    jc.save_checkpoint(path, qparams, masks)
    restored, restored_masks = jc.load_checkpoint(path)
    _assert_same(restored, qparams)
    np.testing.assert_array_equal(np.asarray(restored_masks["dense"]["kernel"]), np.asarray(masks["dense"]["kernel"]))
    # abstract restore (metadata only): the stored shape on disk, the logical shape on the QArray
    abstract, _ = orbax_io.abstract_checkpoint(path, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    node = abstract["dense"]["kernel"]
    assert node.values.shape == (6, 12) and node.shape == (12, 6) and node.stored_permutation == (1, 0)
    into, _ = jc.load_checkpoint(path, target=jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), qparams))
    _assert_same(into, qparams)
    # a logical-layout target is told what differs
    logical = jax.tree_util.tree_map(
        lambda x: x.with_layout(None) if isinstance(x, jc.QArray) else x, qparams, is_leaf=lambda x: isinstance(x, jc.QArray)
    )
    with pytest.raises(ArgumentError):
        jc.load_checkpoint(path, target=logical)


def test_orbax_checkpoint_without_the_field_loads_logical(tmp_path):
    qparams, _ = jc.quantize_params({"dense": {"kernel": jnp.ones((4, 2))}}, RULES[1:], layout="logical")
    path = tmp_path / "ckpt"
    jc.save_checkpoint(path, qparams)
    meta = orbax_io.compression_metadata(qparams)
    assert all("stored_permutation" not in r["qarray"]["static"] for r in meta["params"] if r["kind"] == "qarray")
    restored, _ = jc.load_checkpoint(path)
    assert restored["dense"]["kernel"].stored_permutation is None and restored["dense"]["kernel"].values.shape == (4, 2)
