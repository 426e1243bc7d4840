"""Adapter-only checkpoints: `save_adapters` / `load_adapters` (safetensors file or Orbax directory).

Only the adapters are written (a few MB for a model whose base is GBs): each `LoraAdapter` is
stored at its kernel's path as ``a``, ``b`` and three scalars (``alpha``, ``output_axes``,
``stacked_axes``), through `jaxcompress.export_safetensors` for a path ending in
``.safetensors`` and `jaxcompress.save_checkpoint` (Orbax) otherwise. Loading with the ``base``
checks that every adapter has a kernel of a fitting shape in it, naming the path that does not.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jaxcompress.checkpoint.orbax_io import load_checkpoint, save_checkpoint
from jaxcompress.checkpoint.safetensors_io import export_safetensors, import_safetensors
from jaxcompress.lora.adapters import LoraAdapter, LoraTargetError, adapter_items, check_fits
from jaxcompress.qarray import QArray
from jaxcompress.rules import path_to_str

__all__ = ["save_adapters", "load_adapters"]

_FIELDS = ("a", "alpha", "b", "output_axes", "stacked_axes")


def _is_safetensors(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(".safetensors")


def _plain(adapter: LoraAdapter) -> dict[str, Any]:
    return {
        "a": adapter.a,
        "b": adapter.b,
        "alpha": np.asarray(adapter.alpha, np.float32),
        "output_axes": np.asarray(adapter.output_axes, np.int32),
        "stacked_axes": np.asarray(adapter.stacked_axes, np.int32),
    }


def save_adapters(path: str | os.PathLike, adapters: Any, *, force: bool = False) -> None:
    """Write only ``adapters`` to ``path``: a safetensors file (``*.safetensors``) or an Orbax
    checkpoint directory (any other path; ``force`` overwrites one).

    >>> import os, tempfile, jax, jax.numpy as jnp
    >>> from jaxcompress.lora import LoraRule, lora_init, save_adapters, load_adapters
    >>> base = {"dense": {"kernel": jnp.ones((6, 3))}}
    >>> adapters = lora_init(jax.random.key(0), base, LoraRule(pattern=".*kernel"), rank=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "adapters.safetensors")
    >>> save_adapters(path, adapters)
    >>> restored = load_adapters(path, base)
    >>> bool(jnp.array_equal(restored["dense"]["kernel"].a, adapters["dense"]["kernel"].a))
    True
    """
    items = adapter_items(adapters)
    if not items:
        raise ValueError(f"{os.fspath(path)}: the adapters tree is empty, nothing to save")
    tree = jax.tree_util.tree_map(_plain, adapters, is_leaf=lambda x: isinstance(x, LoraAdapter))
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{os.fspath(path)}: exists (pass force=True to overwrite)")
    if _is_safetensors(path):
        export_safetensors(path, tree, metadata={"jaxcompress.content": "lora_adapters"})
    else:
        save_checkpoint(path, tree, force=force)


def _is_record(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == set(_FIELDS)


def _rebuild(tree: Any, where: str) -> Any:
    if _is_record(tree):
        return LoraAdapter(
            jax.numpy.asarray(tree["a"]),
            jax.numpy.asarray(tree["b"]),
            float(np.asarray(tree["alpha"])),
            int(np.asarray(tree["output_axes"])),
            int(np.asarray(tree["stacked_axes"])),
        )
    if isinstance(tree, dict) and tree and not any(isinstance(v, (np.ndarray, jax.Array)) for v in tree.values()):
        return {key: _rebuild(value, f"{where}/{key}" if where else str(key)) for key, value in tree.items()}
    raise LoraTargetError(f"{where or '<root>'}: not a LoRA adapter record (expected the fields {_FIELDS}); is this an adapters checkpoint?")


def load_adapters(path: str | os.PathLike, base: Any = None) -> dict:
    """Read an adapters tree written by `save_adapters`. With ``base`` (the params the adapters
    were trained on, float or quantized) every adapter is checked against its kernel: a path the
    base lacks or a shape that does not fit raises `LoraTargetError` naming it. See
    `save_adapters` for an example."""
    tree = import_safetensors(path)[0] if _is_safetensors(path) else load_checkpoint(path)[0]
    adapters = _rebuild(tree, "")
    if base is not None:
        items = adapter_items(adapters)
        flat = jax.tree_util.tree_flatten_with_path(base, is_leaf=lambda x: isinstance(x, QArray))[0]
        shapes = {path_to_str(p): tuple(getattr(leaf, "shape", ())) for p, leaf in flat}
        for name, adapter in items.items():
            if name not in shapes:
                raise LoraTargetError(f"{os.fspath(path)}: adapter for params/{name}, which the base does not have")
            check_fits(adapter, shapes[name], f"{os.fspath(path)}: params/{name}")
    return adapters
