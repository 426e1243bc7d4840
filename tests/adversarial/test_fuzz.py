"""Hypothesis fuzz over header and metadata mutations of real files of both formats: a mutated
file either loads into a valid tree or raises a clear error naming the file. Nothing else (no
bare numpy / JAX / JSON / tensorstore error, no crash)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.qarray import QArray
from tests.adversarial import tamper
from tests.adversarial.support import FORMAT_ERROR

_FOLDER = tempfile.mkdtemp(prefix="jc-fuzz-")
_SAFETENSORS = tamper.write_safetensors(os.path.join(_FOLDER, "model.safetensors"))
_HEADER, _BODY = tamper.read_raw(_SAFETENSORS)
_META = json.loads(_HEADER["__metadata__"]["jaxcompress"])

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 2, 3, 4, 8, 16, 99]) | st.text(max_size=8)
    | st.sampled_from(["int8", "int4", "float32", "float8_e4m3fn", "int", "qarray", "array", "bitmap", "n:m", "dense"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


_META_PATHS = [p for p in _paths(_META) if p]
_HEADER_PATHS = [p for p in _paths({k: v for k, v in _HEADER.items() if k != "__metadata__"}) if p]


def _replace(root, path, value):
    node = root
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()


def _check_loaded(params):
    for leaf in __import__("jax").tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QArray)):
        if isinstance(leaf, QArray):
            assert leaf.dequantize().shape == leaf.shape


def _load(path):
    try:
        params, _ = jc.import_safetensors(path)
    except FORMAT_ERROR as err:
        assert os.path.basename(path) in str(err), str(err)
        return
    _check_loaded(params)


@settings(max_examples=int(os.environ.get("JC_FUZZ_EXAMPLES", 120)), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_safetensors_metadata(data):
    meta = json.loads(json.dumps(_META))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_META_PATHS))
        try:
            _replace(meta, path, data.draw(_json_values | st.just(_DELETE)))
        except (KeyError, IndexError, TypeError):
            pass
    header = json.loads(json.dumps(_HEADER))
    header["__metadata__"]["jaxcompress"] = json.dumps(meta)
    path = os.path.join(_FOLDER, "meta.safetensors")
    tamper.write_raw(path, header, _BODY)
    _load(path)


@settings(max_examples=int(os.environ.get("JC_FUZZ_EXAMPLES", 80)), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_safetensors_header(data):
    header = json.loads(json.dumps(_HEADER))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    path_ = data.draw(st.sampled_from(_HEADER_PATHS))
    try:
        _replace(tensors, path_, data.draw(_json_values | st.just(_DELETE)))
    except (KeyError, IndexError, TypeError):
        pass
    tensors["__metadata__"] = header["__metadata__"]
    path = os.path.join(_FOLDER, "header.safetensors")
    tamper.write_raw(path, tensors, _BODY)
    _load(path)


@settings(max_examples=int(os.environ.get("JC_FUZZ_EXAMPLES", 80)), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=1, max_size=4), st.integers(0, 2**31), st.booleans())
def test_fuzz_safetensors_bytes(patch, where, cut):
    raw = bytearray(open(_SAFETENSORS, "rb").read())
    if cut:
        raw = raw[: where % len(raw)]
    else:
        at = where % (len(raw) - len(patch))
        raw[at : at + len(patch)] = patch
    path = os.path.join(_FOLDER, "bytes.safetensors")
    open(path, "wb").write(bytes(raw))
    _load(path)


_ORBAX = None


def _orbax_template():
    global _ORBAX
    if _ORBAX is None:
        _ORBAX = tamper.write_orbax(os.path.join(_FOLDER, "ckpt"))
    return _ORBAX


@settings(max_examples=int(os.environ.get("JC_FUZZ_ORBAX_EXAMPLES", 12)), deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_orbax_metadata(data):
    template = _orbax_template()
    meta = json.load(open(os.path.join(template, "_CHECKPOINT_METADATA")))["custom_metadata"]["jaxcompress"]
    paths = [p for p in _paths(meta) if p]
    target = os.path.join(_FOLDER, "fuzzed")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(template, target)
    changes = [(data.draw(st.sampled_from(paths)), data.draw(_json_values | st.just(_DELETE))) for _ in range(data.draw(st.integers(1, 2)))]

    def change(m):
        for path, value in changes:
            try:
                _replace(m, path, value)
            except (KeyError, IndexError, TypeError):
                pass

    tamper.tamper_orbax_metadata(target, change)
    try:
        params, _ = jc.load_checkpoint(target)
    except FORMAT_ERROR as err:
        assert "fuzzed" in str(err), str(err)
        return
    _check_loaded(params)
