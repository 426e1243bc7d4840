"""safetensors export / import: exact round trips, documented names, header validation."""

import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

import jaxcompress as jc
from jaxcompress.checkpoint import safetensors_io
from jaxcompress.checkpoint.safetensors_format import HeaderError, SafetensorsReader, SafetensorsWriter
from jaxcompress.checkpoint.safetensors_records import METADATA_KEY
from jaxcompress.qarray import QArray


def _pruned(shape, keep_every, seed=0):
    w = jax.random.normal(jax.random.PRNGKey(seed), shape)
    mask = (jnp.arange(np.prod(shape)).reshape(shape) % keep_every) == 0
    return jnp.where(mask, w, 0.0), mask


def _two_four(shape, seed=1):
    w = jax.random.normal(jax.random.PRNGKey(seed), shape)
    groups = jnp.abs(w).reshape(-1, 4)
    order = jnp.argsort(-groups, axis=-1)
    mask = jnp.zeros_like(groups, bool)
    mask = jax.vmap(lambda m, o: m.at[o[:2]].set(True))(mask, order).reshape(shape)
    return jnp.where(mask, w, 0.0), mask


def _tree_and_masks():
    sparse_w, sparse_mask = _pruned((16, 8), 10)
    nm_w, nm_mask = _two_four((4, 16))
    params = {
        "sparse_int8": jc.quantize(sparse_w, bits=8, channel_axes=(-1,)),
        "sparse_int4": jc.quantize(sparse_w, bits=4, channel_axes=(-1,), group_size=8),
        "nm_int8": jc.quantize(nm_w, bits=8, channel_axes=(0,)),
        "asym": jc.quantize(sparse_w, bits=4, symmetric=False),
        "int2": jc.quantize(sparse_w, bits=2),
        "fp8": jc.quantize(sparse_w, qtype="float8_e5m2"),
        "float_sparse": sparse_w,
        "bias": jnp.arange(3, dtype=jnp.bfloat16),
        "flags": jnp.array([True, False]),
        "layers": [jnp.ones((2, 2)), jnp.zeros((), jnp.int32)],
    }
    masks = jax.tree_util.tree_map(lambda _: optax.MaskedNode(), params, is_leaf=lambda x: isinstance(x, QArray))
    masks.update(sparse_int8=sparse_mask, sparse_int4=sparse_mask, nm_int8=nm_mask, asym=sparse_mask, float_sparse=sparse_mask)
    return params, masks


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=lambda x: isinstance(x, QArray))
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=lambda x: isinstance(x, QArray))
    assert ta == tb, (ta, tb)
    for x, y in zip(jax.tree_util.tree_leaves(la), jax.tree_util.tree_leaves(lb)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).astype(np.float32), np.asarray(y).astype(np.float32))


def test_roundtrip_exact_with_masks(tmp_path):
    params, masks = _tree_and_masks()
    path = tmp_path / "m.safetensors"
    safetensors_io.export_safetensors(path, params, masks)
    restored, restored_masks = safetensors_io.import_safetensors(path)
    _assert_same(params, restored)
    _assert_same(masks, restored_masks)
    assert restored_masks["bias"] == optax.MaskedNode()
    records = {r["name"]: r for r in safetensors_io.read_records(SafetensorsReader(path))}
    assert records["sparse_int8"]["encoding"] == "bitmap"
    assert records["nm_int8"]["encoding"] in ("n:m", "bitmap")
    # pruned zeros sit at the zero point: stored as 0, the reader puts the zero point back
    assert records["asym"]["encoding"] == "bitmap" and records["asym"]["fill"] == "zero_point"
    assert "fill" not in records["sparse_int8"]


def test_names_are_documented_and_readable_by_safetensors(tmp_path):
    params, masks = _tree_and_masks()
    path = tmp_path / "m.safetensors"
    safetensors_io.export_safetensors(path, params, masks)
    assert SafetensorsReader(path).read("fp8.values").dtype == ml_dtypes.float8_e5m2
    # the reference implementation accepts our files (its NumPy API lacks fp8: leave that leaf out)
    del params["fp8"], masks["fp8"]
    safetensors_io.export_safetensors(path, params, masks)
    tensors = load_file(str(path))
    for name in ["sparse_int8.values", "sparse_int8.scale", "sparse_int8.mask_bitmap", "asym.zero_point",
                 "asym.mask_bitmap", "bias", "layers.0"]:
        assert name in tensors, name
    assert tensors["sparse_int4.values"].dtype == np.uint8  # int4 packed two per byte
    # 10%-kept int8 bitmap: 1 bit per element + the kept bytes
    assert tensors["sparse_int8.mask_bitmap"].size == 16 * 8 // 8
    assert tensors["sparse_int8.values"].size == int(np.sum(np.asarray(masks["sparse_int8"])))


def test_into_target_restores_structure(tmp_path):
    params, masks = _tree_and_masks()
    path = tmp_path / "m.safetensors"
    safetensors_io.export_safetensors(path, params, masks)
    restored, _ = safetensors_io.import_safetensors(path, target=jax.eval_shape(lambda: params))
    assert isinstance(restored["layers"], list)
    with pytest.raises(ValueError, match="the target has leaf 'extra'"):
        safetensors_io.import_safetensors(path, target=dict(params, extra=1))


def test_forced_encodings_and_errors(tmp_path):
    params, masks = _tree_and_masks()
    with pytest.raises(ValueError, match="asym.*bitmap encoding needs zeros"):  # kept values outside the mask
        safetensors_io.export_safetensors(tmp_path / "x.safetensors", {"asym": params["asym"]}, {"asym": ~masks["asym"]}, encoding="bitmap")
    assert not (tmp_path / "x.safetensors").exists()
    assert list(tmp_path.iterdir()) == []  # no scratch files left behind
    nm = {"w": params["nm_int8"]}
    safetensors_io.export_safetensors(tmp_path / "nm.safetensors", nm, {"w": masks["nm_int8"]}, encoding="n:m")
    restored, restored_masks = safetensors_io.import_safetensors(tmp_path / "nm.safetensors")
    _assert_same(nm, restored)
    np.testing.assert_array_equal(np.asarray(restored_masks["w"]), np.asarray(masks["nm_int8"]))


def test_foreign_file_imports_as_nested_dicts(tmp_path):
    path = tmp_path / "hf.safetensors"
    save_file({"encoder.layer.0.weight": np.ones((2, 3), np.float32), "pooler.bias": np.zeros(3, np.float16)}, str(path))
    params, masks = safetensors_io.import_safetensors(path)
    assert masks is None
    assert params["encoder"]["layer"]["0"]["weight"].shape == (2, 3)
    assert params["pooler"]["bias"].dtype == jnp.float16


def _write_raw(path, header, data=b""):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "trailing"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8"),
        ({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype 'Q7'"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "non-negative"),
        ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6, "overlaps"),
        ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4, "gap"),
        ([1, 2], b"", "expected an object"),
        ({"__metadata__": {"k": 1}}, b"", "strings to strings"),
    ],
)
def test_header_validation(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(HeaderError, match=message):
        SafetensorsReader(path)


def test_garbage_and_short_files(tmp_path):
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(HeaderError, match="8-byte header length"):
        SafetensorsReader(tmp_path / "short")
    (tmp_path / "huge").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(HeaderError, match="impossible"):
        SafetensorsReader(tmp_path / "huge")
    (tmp_path / "notjson").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(HeaderError, match="not valid UTF-8 JSON"):
        SafetensorsReader(tmp_path / "notjson")
    with pytest.raises(FileNotFoundError):
        SafetensorsReader(tmp_path / "missing.safetensors")


def test_record_inconsistent_with_tensor_is_an_error(tmp_path):
    path = tmp_path / "m.safetensors"
    params = {"w": jc.quantize(jnp.ones((4, 4)), bits=4)}
    record, tensors = safetensors_io.encode_leaf([["key", "w"]], params["w"])
    record["qarray"]["arrays"]["values"]["shape"] = [4, 8]  # lie about the shape
    with SafetensorsWriter(path) as writer:
        for name, array in tensors:
            writer.add(name, array)
        writer.metadata = safetensors_io.file_metadata([record])
    with pytest.raises(HeaderError, match=r"leaf 'w'.*'w.values'.*expected U8\[16\]"):
        safetensors_io.import_safetensors(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("name"), "needs a string 'name'"),
        (lambda r: r.update(kind="pickle"), "needs a string 'name' and a 'kind'"),
        (lambda r: r.update(path="w"), "'path' must be a non-empty list"),
        (lambda r: r.update(encoding="zip"), "unknown encoding 'zip'"),
        (lambda r: r["qarray"].pop("static"), "'qarray' needs 'static'"),
    ],
)
def test_malformed_records_are_header_errors(tmp_path, mutate, message):
    path = tmp_path / "m.safetensors"
    record, tensors = safetensors_io.encode_leaf([["key", "w"]], jc.quantize(jnp.ones((4, 4)), bits=8))
    mutate(record)
    with SafetensorsWriter(path) as writer:
        for name, array in tensors:
            writer.add(name, array)
        writer.metadata = safetensors_io.file_metadata([record])
    with pytest.raises(HeaderError, match=message):
        safetensors_io.import_safetensors(path)


@pytest.mark.parametrize("options,structure", [(dict(channel_axes=(-1,)), "random"), (dict(channel_axes=(-1,), group_size=48, group_axis=0), "random"),
                                               (dict(channel_axes=(-1,)), "2:4")])
def test_pruned_asymmetric_int4_stays_sparse_and_exact(tmp_path, options, structure):
    """int4 defaults to asymmetric codes, where a pruned value's code is its group's zero point:
    the file stores 0 there (bitmap / n:m) and the reader puts the zero point back."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(128, 64)).astype(np.float32)
    if structure == "2:4":
        mask = np.zeros_like(w, bool)
        mask[0::4] = mask[1::4] = True  # along axis 0, 2 of every 4
    else:
        mask = rng.random(w.shape) < 0.1
    params = {"k": jnp.asarray(np.where(mask, w, 0.0))}
    qparams, _ = jc.quantize_params(params, [jc.QuantRule(pattern="k", bits=4, **options)])
    assert qparams["k"].zero_point is not None
    sizes = {}
    for encoding in ("auto", "dense"):
        path = tmp_path / f"{encoding}.safetensors"
        jc.export_safetensors(path, qparams, {"k": jnp.asarray(mask)}, encoding=encoding)
        sizes[encoding] = path.stat().st_size
        back, masks = jc.import_safetensors(path)
        np.testing.assert_array_equal(np.asarray(back["k"].values), np.asarray(qparams["k"].values))
        np.testing.assert_array_equal(np.asarray(back["k"].dequantize()), np.asarray(qparams["k"].dequantize()))
        np.testing.assert_array_equal(np.asarray(masks["k"]), mask)
    assert sizes["auto"] < 0.75 * sizes["dense"], sizes
    # a record claiming a zero-point fill on a leaf without a zero point is refused, by name
    path = tmp_path / "auto.safetensors"
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + header_len])
    meta = json.loads(header["__metadata__"][METADATA_KEY])
    meta["leaves"][0]["fill"] = "something"
    header["__metadata__"][METADATA_KEY] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(struct.pack("<Q", len(text)) + text + path.read_bytes()[8 + header_len:])
    with pytest.raises(HeaderError, match="fill 'something'"):
        jc.import_safetensors(tampered)
