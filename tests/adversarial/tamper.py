"""Real files of both formats, and ways to tamper with them (shared by the cases and the fuzz)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
import optax

import jaxcompress as jc


def compressed_tree() -> tuple[dict, dict]:
    """A params tree covering each kind of leaf, and its masks."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    sparse = np.where(np.abs(w) > 1.2, w, 0).astype(np.float32)
    nm = w.copy().reshape(16, 2, 4)
    nm[:, :, 2:] = 0
    nm = nm.reshape(16, 8)
    params = {
        "dense": {"kernel": jc.quantize(w, bits=8, channel_axes=(1,)), "bias": jnp.asarray(w[0])},
        "grouped": {"kernel": jc.quantize(w, bits=4, channel_axes=(1,), group_size=4, group_axis=0)},
        "asym": {"kernel": jc.quantize(w, bits=8, symmetric=False, channel_axes=(1,))},
        "sparse": {"kernel": jc.quantize(sparse, bits=8, channel_axes=(1,))},
        "nm": {"kernel": jnp.asarray(nm)},
        "step": np.array(2**40 + 5, np.int64),
    }
    masks = {
        "dense": {"kernel": optax.MaskedNode(), "bias": optax.MaskedNode()},
        "grouped": {"kernel": optax.MaskedNode()},
        "asym": {"kernel": optax.MaskedNode()},
        "sparse": {"kernel": jnp.asarray(sparse != 0)},
        "nm": {"kernel": jnp.asarray(nm != 0)},
        "step": optax.MaskedNode(),
    }
    return params, masks


def write_safetensors(path: Any) -> str:
    params, masks = compressed_tree()
    jc.export_safetensors(path, params, masks)
    return os.fspath(path)


def read_raw(path: Any) -> tuple[dict, bytes]:
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: Any, header: Any, body: bytes, *, header_bytes: bytes | None = None) -> None:
    encoded = header_bytes if header_bytes is not None else json.dumps(header).encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + body)


def tamper_records(path: Any, change: Callable[[dict], Any]) -> None:
    """Rewrite the jaxcompress JSON metadata of a file with ``change(meta)`` (in place)."""
    header, body = read_raw(path)
    meta = json.loads(header["__metadata__"]["jaxcompress"])
    out = change(meta)
    header["__metadata__"]["jaxcompress"] = out if isinstance(out, str) else json.dumps(meta)
    write_raw(path, header, body)


def record(meta: dict, name: str) -> dict:
    (found,) = [r for r in meta["leaves"] if r["name"] == name]
    return found


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---- Orbax -----------------------------------------------------------------------------------


def write_orbax(path: Any) -> str:
    params, masks = compressed_tree()
    params = dict(params)
    params.pop("step")  # a 64-bit leaf needs x64 in Orbax
    masks = dict(masks)
    masks.pop("step")
    jc.save_checkpoint(path, params, masks)
    return os.fspath(path)


def orbax_copy(template: str, dst: Any) -> str:
    shutil.copytree(template, dst)
    return os.fspath(dst)


def tamper_orbax_metadata(path: Any, change: Callable[[dict], Any]) -> None:
    """Rewrite ``custom_metadata["jaxcompress"]`` in ``_CHECKPOINT_METADATA`` with ``change``."""
    file = os.path.join(path, "_CHECKPOINT_METADATA")
    data = json.load(open(file))
    change(data["custom_metadata"]["jaxcompress"])
    json.dump(data, open(file, "w"))


def orbax_record(meta: dict, name: str) -> dict:
    (found,) = [r for r in meta["params"] if "/".join(str(t[1]) for t in r["path"]) == name]
    return found


def write_nm_safetensors(path: Any) -> str:
    params, masks = compressed_tree()
    jc.export_safetensors(path, {"nm": params["nm"]}, {"nm": masks["nm"]}, encoding="n:m")
    return os.fspath(path)
