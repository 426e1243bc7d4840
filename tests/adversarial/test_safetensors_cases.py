"""Tampered, truncated and foreign safetensors files: every load path (`import_safetensors`,
`inspect_checkpoint`, `compress_checkpoint`'s source detection) gives a clear error naming the
file and the leaf, and writes nothing."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zipfile

import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.checkpoint import inspect_checkpoint
from tests.adversarial import tamper
from tests.adversarial.support import FORMAT_ERROR, expect_clear, expect_ok, listing


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("template")
    return tamper.write_safetensors(folder / "model.safetensors"), tamper.write_nm_safetensors(folder / "nm.safetensors")


@pytest.fixture
def model(template, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(template[0], path)
    return str(path)


@pytest.fixture
def nm_model(template, tmp_path):
    path = tmp_path / "nm.safetensors"
    shutil.copy(template[1], path)
    return str(path)


def _static(name, /, **changes):
    def change(meta):
        tamper.record(meta, name)["qarray"]["static"].update(changes)
    return change


def _arrays(name, field, /, **changes):
    def change(meta):
        tamper.record(meta, name)["qarray"]["arrays"][field].update(changes)
    return change


def _set(name, /, **changes):
    def change(meta):
        tamper.record(meta, name).update(changes)
    return change


def _drop(name, *keys):
    def change(meta):
        node = tamper.record(meta, name)
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return change


def _duplicate(meta):
    meta["leaves"].append(dict(tamper.record(meta, "dense.bias")))


# name -> (metadata change, leaf the error must name)
METADATA = {
    "bits-99": (_static("dense.kernel", bits=99), "dense.kernel"),
    "bits-4-on-int8-values": (_static("dense.kernel", bits=4), "dense.kernel"),
    "bits-8-on-int4-values": (_static("grouped.kernel", bits=8), "grouped.kernel"),
    "bits-true": (_static("dense.kernel", bits=True), "dense.kernel"),
    "qtype-fp8-on-int8": (_static("dense.kernel", qtype="float8_e4m3fn"), "dense.kernel"),
    "qtype-unknown": (_static("dense.kernel", qtype="int7"), "dense.kernel"),
    "channel-axes-contradict-scale": (_static("dense.kernel", channel_axes=[0]), "dense.kernel"),
    "channel-axes-out-of-range": (_static("dense.kernel", channel_axes=[5]), "dense.kernel"),
    "channel-axes-string": (_static("dense.kernel", channel_axes="x"), "dense.kernel"),
    # group size 3 on the 16-long group axis: a valid ragged layout (6 groups) that contradicts the 4-group scale
    "group-size-ragged-contradicts-scale": (_static("grouped.kernel", group_size=3), "grouped.kernel"),
    "qtype-nf4-on-int8": (_static("dense.kernel", qtype="nf4"), "dense.kernel"),
    "group-size-contradicts-scale": (_static("grouped.kernel", group_size=8), "grouped.kernel"),
    "group-axis-dropped": (_static("grouped.kernel", group_axis=None), "grouped.kernel"),
    "original-dtype-int": (_static("dense.kernel", dtype={"dtype": "int32"}), "dense.kernel"),
    "original-dtype-nonsense": (_static("dense.kernel", dtype={"dtype": "nonsense"}), "dense.kernel"),
    "unknown-static-field": (_static("dense.kernel", foo=1), "dense.kernel"),
    "activation-unknown": (_static("dense.kernel", activation="turbo"), "dense.kernel"),
    "scale-shape-vs-bytes": (_arrays("dense.kernel", "scale", shape=[1, 4]), "dense.kernel"),
    "values-shape-vs-bytes": (_arrays("dense.kernel", "values", shape=[16, 4]), "dense.kernel"),
    "values-dtype-float": (_arrays("dense.kernel", "values", dtype="float32"), "dense.kernel"),
    "values-dtype-nonsense": (_arrays("dense.kernel", "values", dtype="int99"), "dense.kernel"),
    "scale-missing": (_drop("dense.kernel", "qarray", "arrays", "scale"), "dense.kernel"),
    "zero-point-shape": (_arrays("asym.kernel", "zero_point", shape=[8, 1]), "asym.kernel"),
    "kind-unknown": (_set("dense.bias", kind="weird"), "dense.bias"),
    "encoding-unknown": (_set("sparse.kernel", encoding="zip"), "sparse.kernel"),
    "kept-count-wrong": (lambda m: tamper.record(m, "sparse.kernel").update(kept=tamper.record(m, "sparse.kernel")["kept"] + 1), "sparse.kernel"),
    "kept-negative": (_set("sparse.kernel", kept=-1), "sparse.kernel"),
    "array-shape-wrong": (_set("dense.bias", shape=[5]), "dense.bias"),
    "array-shape-negative": (_set("dense.bias", shape=[-8]), "dense.bias"),
    "array-dtype-wrong": (_set("dense.bias", dtype="int8"), "dense.bias"),
    "array-dtype-nonsense": (_set("dense.bias", dtype="float99"), "dense.bias"),
    "mask-without-bitmap": (_set("dense.bias", mask=True), "dense.bias"),
    "name-of-missing-tensor": (_set("dense.bias", name="dense.gone"), "dense.gone"),
    "path-token-kind": (_set("dense.bias", path=[["foo", "dense"]]), "dense.bias"),
    "path-missing": (_drop("dense.bias", "path"), "dense.bias"),
    "two-leaves-one-path": (_duplicate, "dense"),
}


@pytest.mark.parametrize("case", sorted(METADATA))
def test_tampered_metadata_import(model, case):
    change, leaf = METADATA[case]
    tamper.tamper_records(model, change)
    expect_clear(lambda: jc.import_safetensors(model), FORMAT_ERROR, "model.safetensors", leaf)


INSPECTED = ["bits-99", "channel-axes-contradict-scale", "group-size-ragged-contradicts-scale", "scale-shape-vs-bytes", "kept-count-wrong", "original-dtype-nonsense"]


@pytest.mark.parametrize("case", INSPECTED)
def test_tampered_metadata_inspect(model, case):
    change, leaf = METADATA[case]
    tamper.tamper_records(model, change)
    expect_clear(lambda: inspect_checkpoint(model), FORMAT_ERROR, "model.safetensors", leaf)


NM = {
    "m-zero": _set("nm.kernel", m=0),
    "n-over-m": _set("nm.kernel", n=5),
    "axis-out-of-range": _set("nm.kernel", axis=7),
    "kept-wrong": lambda m: tamper.record(m, "nm.kernel").update(kept=3),
}


@pytest.mark.parametrize("case", sorted(NM))
def test_tampered_n_m_record(nm_model, case):
    tamper.tamper_records(nm_model, NM[case])
    expect_clear(lambda: jc.import_safetensors(nm_model), FORMAT_ERROR, "nm.safetensors", "nm.kernel")


WHOLE_METADATA = {
    "format-version": lambda m: m.update(format_version=2),
    "leaves-not-a-list": lambda m: m.update(leaves={"a": 1}),
    "not-json": lambda m: "{ not json",
    "deeply-nested": lambda m: '{"format_version": 1, "leaves": ' + tamper.deep_json(100_000) + "}",
    "leaf-not-an-object": lambda m: m["leaves"].append(7),
}


@pytest.mark.parametrize("case", sorted(WHOLE_METADATA))
def test_tampered_metadata_document(model, case):
    tamper.tamper_records(model, WHOLE_METADATA[case])
    expect_clear(lambda: jc.import_safetensors(model), FORMAT_ERROR, "model.safetensors", "__metadata__")


def _container(kind, path):
    header, body = tamper.read_raw(path)
    raw = open(path, "rb").read()
    first = sorted(k for k in header if k != "__metadata__")[0]
    if kind == "empty":
        open(path, "wb").close()
    elif kind == "four-bytes":
        open(path, "wb").write(b"\x01\x02\x03\x04")
    elif kind == "header-length-huge":
        open(path, "wb").write(struct.pack("<Q", 2**62) + raw[8:])
    elif kind == "header-length-past-end":
        open(path, "wb").write(struct.pack("<Q", len(raw)) + raw[8:])
    elif kind == "truncated":
        open(path, "wb").write(raw[:-10])
    elif kind == "trailing-bytes":
        open(path, "wb").write(raw + b"\0" * 16)
    elif kind == "header-not-json":
        tamper.write_raw(path, None, body, header_bytes=b"{ this is not json")
    elif kind == "header-not-utf8":
        tamper.write_raw(path, None, body, header_bytes=b"\xff\xfe{}")
    elif kind == "header-is-a-list":
        tamper.write_raw(path, [1, 2], body)
    elif kind == "header-deeply-nested":
        tamper.write_raw(path, None, body, header_bytes=tamper.deep_json(200_000).encode())
    elif kind == "unknown-dtype":
        header[first]["dtype"] = "Q7"
        tamper.write_raw(path, header, body)
    elif kind == "negative-shape":
        header[first]["shape"] = [-1]
        tamper.write_raw(path, header, body)
    elif kind == "offsets-overlap":
        header[first]["data_offsets"] = [0, header[first]["data_offsets"][1] - header[first]["data_offsets"][0]]
        second = sorted(k for k in header if k != "__metadata__")[1]
        span = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
        header[second]["data_offsets"] = [0, span]
        tamper.write_raw(path, header, body)
    elif kind == "offsets-span":
        begin, end = header[first]["data_offsets"]
        header[first]["data_offsets"] = [begin, end + 4]
        tamper.write_raw(path, header, body)
    elif kind == "metadata-not-strings":
        header["__metadata__"]["format"] = 7
        tamper.write_raw(path, header, body)
    elif kind == "pickle":
        open(path, "wb").write(pickle.dumps({"weight": np.ones(3)}))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps([1, 2]))
    elif kind == "random-bytes":
        open(path, "wb").write(np.random.default_rng(1).bytes(4096))
    else:
        raise AssertionError(kind)


CONTAINER = ["empty", "four-bytes", "header-length-huge", "header-length-past-end", "truncated", "trailing-bytes",
             "header-not-json", "header-not-utf8", "header-is-a-list", "header-deeply-nested", "unknown-dtype",
             "negative-shape", "offsets-overlap", "offsets-span", "metadata-not-strings", "pickle", "zip", "random-bytes"]


@pytest.mark.parametrize("kind", CONTAINER)
def test_damaged_container(model, kind):
    _container(kind, model)
    expect_clear(lambda: jc.import_safetensors(model), FORMAT_ERROR, "model.safetensors")


@pytest.mark.parametrize("kind", ["truncated", "header-deeply-nested", "pickle", "offsets-span"])
def test_damaged_source_for_compress(model, tmp_path, kind):
    _container(kind, model)
    out = tmp_path / "out"
    out.mkdir()
    expect_clear(lambda: jc.compress_checkpoint(model, out / "c.safetensors", "w8a8"), FORMAT_ERROR, "model.safetensors", folder=out)


def test_compressed_file_as_source_is_refused(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    expect_clear(lambda: jc.compress_checkpoint(model, out / "c.safetensors", "w8a8"), FORMAT_ERROR, "model.safetensors", "already", folder=out)


def test_tampered_compressed_file_as_source(model, tmp_path):
    # source detection validates the records too (a bad record is not mistaken for a float file)
    tamper.tamper_records(model, lambda m: m.update(leaves="junk"))
    out = tmp_path / "out"
    out.mkdir()
    expect_clear(lambda: jc.compress_checkpoint(model, out / "c.safetensors", "w8a8"), FORMAT_ERROR, "model.safetensors", folder=out)


# ---- 64-bit leaves with x64 disabled ---------------------------------------------------------


def test_int64_leaf_is_exact(model):
    params, _ = expect_ok(lambda: jc.import_safetensors(model))
    assert int(params["step"]) == 2**40 + 5 and np.asarray(params["step"]).dtype == np.int64


def test_int64_foreign_leaf_is_exact(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "hf.safetensors"
    save_file({"step": np.array([2**40 + 5, -(2**50)], np.int64), "ids": np.array([2**63 - 1], np.uint64)}, str(path))
    params, _ = expect_ok(lambda: jc.import_safetensors(path))
    assert np.asarray(params["step"]).tolist() == [2**40 + 5, -(2**50)]
    assert np.asarray(params["ids"]).tolist() == [2**63 - 1]


def test_int64_leaf_in_inspect(model):
    table = expect_ok(lambda: inspect_checkpoint(model))
    (row,) = [r for r in table.rows if r.path == "step"]
    assert row.dtype == "int64" and row.bytes == 8


def test_float64_leaf_is_exact(tmp_path):
    path = tmp_path / "f64.safetensors"
    value = np.array([1.0 + 2**-40], np.float64)
    jc.export_safetensors(path, {"x": value})
    params, _ = expect_ok(lambda: jc.import_safetensors(path))
    assert np.asarray(params["x"]).dtype == np.float64 and np.asarray(params["x"])[0] == value[0]


def test_untampered_file_loads(model):
    params, masks = expect_ok(lambda: jc.import_safetensors(model))
    reference, _ = tamper.compressed_tree()
    np.testing.assert_array_equal(np.asarray(params["grouped"]["kernel"].values), np.asarray(reference["grouped"]["kernel"].values))
    assert listing(os.path.dirname(model)) == ["model.safetensors"]
