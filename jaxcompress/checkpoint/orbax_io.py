"""Save and restore compressed trees (`QArray`s, masks) with Orbax.

`save_checkpoint` writes a params tree (and optionally its masks tree) with
``orbax.checkpoint.StandardCheckpointer`` and records the tree's compression structure in the
checkpoint's ``custom_metadata["jaxcompress"]`` (see `jaxcompress.checkpoint.treemeta`): which
leaves are `QArray`s and their static metadata (bits, qtype, axes, group size, dtype, ...), and
which mask leaves are ``optax.MaskedNode()`` sentinels (Orbax itself stores those as ``None``).
Arrays are written as they are in memory: a `QArray` whose codes are stored in another axis order
(`QArray.stored_permutation`, e.g. an integer-mode Dense kernel kept ``(out, in)``) is saved in that
stored layout, with the permutation in the metadata (no transpose of a sharded array on save or
restore); checkpoints without it restore in the logical layout.

`load_checkpoint` restores it:

* without a target: the structure comes from the metadata (dict keys and list indices as
  saved; other containers come back as dicts), `QArray`s and ``MaskedNode``s are rebuilt;
* into a target (concrete or abstract, e.g. ``jax.eval_shape`` output, possibly sharded): Orbax
  restores into it and the recorded `QArray` metadata is checked against the target's;
* onto a (new) mesh with ``shardings=``: `abstract_checkpoint` builds the abstract target from the
  checkpoint's own metadata, each array carrying the sharding you ask for per param path; `QArray`
  scales and zero points follow their param's sharding on the axes where they keep a full or
  grouped dim (`follow_sharding`), masks shard like their param. Each process reads only its own
  shards, so a checkpoint saved on one mesh restores bitwise onto any other (8 devices as 2x4 ->
  4x2 -> 2 devices in tests/multidevice/md_scale_checkpoint.py).

`save_to_manager` / `restore_from_manager` do the same through an ``ocp.CheckpointManager``.
A directory written by plain Orbax (no jaxcompress metadata) loads as the plain tree Orbax
returns. A directory that is not an Orbax checkpoint, or a damaged or tampered one, raises a
`CheckpointFormatError` (a ``ValueError``) naming it, and the leaf when one is at fault; every
Orbax call goes through `jaxcompress.checkpoint.orbax_guard` (errors translated, checkpointers
closed). A target that does not match the checkpoint is an `ArgumentError` (also a
``ValueError``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jaxcompress._errors import ArgumentError, CheckpointFormatError
from jaxcompress.checkpoint import treemeta
from jaxcompress.checkpoint.orbax_guard import check_metadata, checkpointer, read_step_metadata, require_checkpoint, translate
from jaxcompress.checkpoint.orbax_sharding import follow_sharding, shard_abstract
from jaxcompress.qarray import QArray

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "save_to_manager",
    "restore_from_manager",
    "compression_metadata",
    "is_orbax_checkpoint",
    "abstract_checkpoint",
    "follow_sharding",
]

METADATA_KEY = "jaxcompress"


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def compression_metadata(params: Any, masks: Any = None) -> dict[str, Any]:
    """The JSON-able record of ``params`` (and ``masks``) that `load_checkpoint` rebuilds from.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> meta = compression_metadata({"w": jc.quantize(jnp.ones((2, 2)), bits=4), "b": jnp.zeros(2)})
    >>> [(r["path"], r["kind"]) for r in meta["params"]]
    [([['key', 'b']], 'array'), ([['key', 'w']], 'qarray')]
    """
    records = []
    for tokens, leaf in treemeta.flatten_leaves(params):
        if isinstance(leaf, QArray):
            records.append({
                "path": tokens,
                "kind": "qarray",
                "qarray": {
                    "static": treemeta.qarray_static(leaf),
                    "arrays": sorted(treemeta.qarray_array_fields(leaf)),
                },
            })
        elif treemeta.is_masked_node(leaf):
            records.append({"path": tokens, "kind": "masked_node"})
        else:
            records.append({"path": tokens, "kind": "none" if leaf is None else "array"})
    meta: dict[str, Any] = {"format_version": treemeta.FORMAT_VERSION, "params": records, "masks": None}
    if masks is not None:
        meta["masks"] = [
            {"path": tokens, "kind": "masked_node" if treemeta.is_masked_node(leaf) else "array"}
            for tokens, leaf in treemeta.flatten_leaves(masks)
        ]
    return meta


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a finished Orbax checkpoint.

    >>> import tempfile
    >>> is_orbax_checkpoint(tempfile.mkdtemp())
    False
    """
    path = os.fspath(path)
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("_CHECKPOINT_METADATA", "_METADATA")
    )


def _item(params: Any, masks: Any) -> dict[str, Any]:
    return {"params": params} if masks is None else {"params": params, "masks": masks}


def save_checkpoint(path: str | os.PathLike, params: Any, masks: Any = None, *, force: bool = False) -> None:
    """Save ``params`` (and ``masks``) to the Orbax checkpoint directory ``path``.

    >>> import tempfile, os, jax.numpy as jnp, optax, jaxcompress as jc
    >>> params = {"w": jc.quantize(jnp.ones((4, 2)), bits=4), "b": jnp.zeros(2)}
    >>> masks = {"w": jnp.ones((4, 2), bool), "b": optax.MaskedNode()}
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> save_checkpoint(path, params, masks)
    >>> restored, restored_masks = load_checkpoint(path)
    >>> restored["w"].values.dtype, restored["w"].bits, restored_masks["b"]
    (dtype(int4), 4, MaskedNode())
    """
    ocp = _ocp()
    metadata = compression_metadata(params, masks)
    writer = ocp.StandardCheckpointer()
    try:
        writer.save(os.path.abspath(os.fspath(path)), _item(params, masks), custom_metadata={METADATA_KEY: metadata}, force=force)
        writer.wait_until_finished()
    finally:
        writer.close()


def _lookup(raw: Any, tokens: list, where: str) -> Any:
    node = raw
    for _, key in tokens:
        if isinstance(node, dict):
            if key in node:
                node = node[key]
            elif str(key) in node:
                node = node[str(key)]
            else:
                raise CheckpointFormatError(f"{where}: the checkpoint's arrays lack this leaf (metadata lists it)")
        elif isinstance(node, (list, tuple)) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            raise CheckpointFormatError(f"{where}: the checkpoint's arrays lack this leaf (metadata lists it)")
    return node


def _rebuild(raw: Any, records: list[dict], root: str) -> Any:
    pairs = []
    for record in records:
        tokens = record["path"]
        where = f"{root}/{treemeta.path_name(tokens)}"
        kind = record["kind"]
        if kind == "masked_node":
            pairs.append((tokens, treemeta.masked_node_or(None)))
            continue
        value = _lookup(raw, tokens, where)
        if kind == "qarray":
            if not isinstance(value, dict):
                raise CheckpointFormatError(f"{where}: expected the fields of a QArray, found {type(value).__name__}")
            arrays = {name: value[name] for name in record["qarray"]["arrays"] if name in value}
            missing = set(record["qarray"]["arrays"]) - set(arrays)
            if missing:
                raise CheckpointFormatError(f"{where}: QArray fields {sorted(missing)} are missing from the checkpoint")
            value = treemeta.qarray_from_parts(record["qarray"]["static"], arrays, where)
        elif kind == "none":
            value = None
        pairs.append((tokens, value))
    try:
        return treemeta.tree_from_records(pairs)
    except ValueError as err:  # two records with one path
        raise CheckpointFormatError(f"{root}: {err}") from None


def _check_target(target: Any, records: list[dict], root: str) -> None:
    by_name = {treemeta.path_name(r["path"]): r for r in records}
    target_leaves = treemeta.flatten_leaves(target)
    names = {treemeta.path_name(tokens) for tokens, _ in target_leaves}
    missing, extra = sorted(set(by_name) - names), sorted(names - set(by_name))
    if missing or extra:
        raise ArgumentError(
            f"{root}: the target's leaves do not match the checkpoint's: in the checkpoint only "
            f"{missing[:5]}, in the target only {extra[:5]}"
        )
    for tokens, leaf in target_leaves:
        name = treemeta.path_name(tokens)
        record = by_name[name]
        if isinstance(leaf, QArray):
            if record["kind"] != "qarray":
                raise ArgumentError(f"{root}/{name}: the target has a QArray, the checkpoint a {record['kind']}")
            want = treemeta.qarray_static(leaf)
            have = record["qarray"]["static"]
            if want != have:
                diff = {k: (have.get(k), want.get(k)) for k in set(want) | set(have) if want.get(k) != have.get(k)}
                raise ArgumentError(f"{root}/{name}: QArray metadata differs (checkpoint, target): {diff}")
        elif record["kind"] == "qarray":
            raise ArgumentError(f"{root}/{name}: the checkpoint has a QArray, the target a {type(leaf).__name__}")


def _masks_for_orbax(masks: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: None if treemeta.is_masked_node(x) else x, masks, is_leaf=treemeta.is_masked_node
    )


def _abstract_from_metadata(tree_metadata: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda m: None if m is None else jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
        tree_metadata,
        is_leaf=lambda m: m is None or hasattr(m, "shape"),
    )


def _finish(raw: Any, meta: dict | None, target: Any, masks_target: Any, root: str) -> tuple[Any, Any]:
    if meta is None:  # plain orbax checkpoint
        return raw, None
    if target is None:
        params = _rebuild(raw["params"], meta["params"], root)
    else:
        params = raw["params"]
    masks = None
    if meta.get("masks") is not None:
        masks = _rebuild(raw["masks"], meta["masks"], root + "[masks]")
    return params, masks


def _read_meta(custom: Any, path: str) -> dict | None:
    if not isinstance(custom, dict):
        return None
    return check_metadata(custom.get(METADATA_KEY), path)


def _restore_target(meta: dict | None, item_metadata: Any, target: Any, masks_target: Any, root: str) -> Any:
    if target is None:
        return None
    if meta is None:
        return target
    _check_target(target, meta["params"], root)
    item = {"params": target}
    if meta.get("masks") is not None:
        if masks_target is None:
            masks_target = _abstract_from_metadata(item_metadata["masks"])
        item["masks"] = _masks_for_orbax(masks_target)
    return item


def abstract_checkpoint(path: str | os.PathLike, shardings: Any = None) -> tuple[Any, Any]:
    """``(params, masks)`` of a jaxcompress Orbax checkpoint as ABSTRACT trees built from its
    metadata (no array is read): ``jax.ShapeDtypeStruct`` leaves, `QArray` nodes holding them,
    ``MaskedNode()`` where the masks have none (``masks`` is None if none were saved).

    ``shardings`` places every array for a restore onto a (new) mesh: one
    ``jax.sharding.Sharding`` for all leaves, or a callable ``(path, shape) -> Sharding`` called
    with each param's path string (``"dense/kernel"``) and shape. A `QArray`'s values take its
    param's sharding, its scale / zero point `follow_sharding`; a mask takes the sharding of the
    param at the same path. Pass the result to `load_checkpoint` as ``target`` /
    ``masks_target`` (``load_checkpoint(path, shardings=...)`` does exactly that).

    >>> import tempfile, os, jax, jax.numpy as jnp, jaxcompress as jc
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> save_checkpoint(path, {"w": jc.quantize(jnp.ones((4, 2)), bits=4, channel_axes=(1,))})
    >>> params, masks = abstract_checkpoint(path, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    >>> params["w"].values.shape, params["w"].values.dtype, params["w"].scale.shape, masks
    ((4, 2), dtype(int4), (1, 2), None)
    """
    path = os.path.abspath(os.fspath(path))
    step_metadata = read_step_metadata(path)
    meta = _read_meta(step_metadata.custom_metadata, path)
    if meta is None:
        raise CheckpointFormatError(f"{path}: not a jaxcompress checkpoint (no compression metadata); use orbax directly")
    with translate(path):
        item_metadata = getattr(step_metadata.item_metadata, "tree", step_metadata.item_metadata)
        params = _rebuild(_abstract_from_metadata(item_metadata["params"]), meta["params"], path)
        masks = None
        if meta.get("masks") is not None:
            masks = _rebuild(_abstract_from_metadata(item_metadata["masks"]), meta["masks"], path + "[masks]")
    if shardings is not None:
        params = shard_abstract(params, shardings, path)
        if masks is not None:
            masks = shard_abstract(masks, shardings, path + "[masks]")
    return params, masks


def load_checkpoint(
    path: str | os.PathLike, target: Any = None, *, masks_target: Any = None, shardings: Any = None
) -> tuple[Any, Any]:
    """Restore ``(params, masks)`` from an Orbax checkpoint (``masks`` is None if none were saved).

    ``target`` (optional) is a params tree, concrete or abstract (``jax.ShapeDtypeStruct`` leaves,
    `QArray` nodes holding them), whose structure, dtypes and shardings the result takes; its
    `QArray` metadata must equal the recorded one. See `save_checkpoint` for an example.

    ``shardings`` (instead of targets): restore onto a mesh, e.g.
    ``load_checkpoint(path, shardings=lambda path, shape: NamedSharding(mesh, spec_of(path)))``;
    see `abstract_checkpoint` for how `QArray` scales and masks are placed.
    """
    if shardings is not None:
        if target is not None or masks_target is not None:
            raise TypeError("pass either shardings or target / masks_target, not both")
        target, masks_target = abstract_checkpoint(path, shardings)
    path = os.path.abspath(os.fspath(path))
    require_checkpoint(path)
    with checkpointer(_ocp().StandardCheckpointer, path) as reader:
        step_metadata = reader.metadata(path)
        meta = _read_meta(step_metadata.custom_metadata, path)
        item_metadata = step_metadata.item_metadata
        item_metadata = getattr(item_metadata, "tree", item_metadata)
        item = _restore_target(meta, item_metadata, target, masks_target, path)
        raw = reader.restore(path) if item is None else reader.restore(path, item)
        return _finish(raw, meta, target, masks_target, path)


def save_to_manager(manager: Any, step: int, params: Any, masks: Any = None, *, metrics: Any = None) -> bool:
    """Save through an ``orbax.checkpoint.CheckpointManager`` (waits until written).

    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp, jaxcompress as jc
    >>> manager = ocp.CheckpointManager(tempfile.mkdtemp())
    >>> save_to_manager(manager, 3, {"w": jc.quantize(jnp.ones((2, 2)), bits=8)})
    True
    >>> params, masks = restore_from_manager(manager)
    >>> params["w"].values.dtype, masks
    (dtype('int8'), None)
    """
    ocp = _ocp()
    saved = manager.save(
        step,
        args=ocp.args.StandardSave(_item(params, masks)),
        metrics=metrics,
        custom_metadata={METADATA_KEY: compression_metadata(params, masks)},
    )
    manager.wait_until_finished()
    return saved


def restore_from_manager(manager: Any, step: int | None = None, target: Any = None, *, masks_target: Any = None) -> tuple[Any, Any]:
    """Restore ``(params, masks)`` saved by `save_to_manager` (default: the latest step)."""
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise CheckpointFormatError(f"{manager.directory}: the CheckpointManager holds no checkpoint")
    root = f"{manager.directory}@step{step}"
    with translate(root):
        return _restore_step(manager, step, target, masks_target, root)


def _restore_step(manager: Any, step: int, target: Any, masks_target: Any, root: str) -> tuple[Any, Any]:
    ocp = _ocp()
    step_metadata = manager.metadata(step)
    meta = _read_meta(step_metadata.custom_metadata, root)
    item_metadata = step_metadata.item_metadata
    if item_metadata is not None and not hasattr(item_metadata, "keys") and hasattr(item_metadata, "tree"):
        item_metadata = item_metadata.tree
    if item_metadata is not None and "default" in getattr(item_metadata, "keys", lambda: ())():
        item_metadata = item_metadata["default"]
    item_metadata = getattr(item_metadata, "tree", item_metadata)
    item = _restore_target(meta, item_metadata, target, masks_target, root)
    raw = manager.restore(step, args=ocp.args.StandardRestore(item))
    return _finish(raw, meta, target, masks_target, root)


def leaf_groups(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices grouped so each group's byte total stays within ``budget`` (internal)."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if groups and total + size <= budget:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


def iter_orbax_leaves(path: str | os.PathLike, budget_bytes: int = 1 << 26):
    """Yield ``(encoded path, numpy array)`` from a plain (float) Orbax checkpoint, restoring a
    few leaves at a time (partial restores) so memory stays near ``budget_bytes`` or the largest
    leaf (internal: used by `compress_checkpoint`)."""
    path = os.path.abspath(os.fspath(path))
    ocp = _ocp()
    step_metadata = read_step_metadata(path)
    if _read_meta(step_metadata.custom_metadata, path) is not None:
        raise CheckpointFormatError(f"{path}: already a jaxcompress checkpoint; compress the original float checkpoint")
    tree_md = getattr(step_metadata.item_metadata, "tree", step_metadata.item_metadata)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree_md, is_leaf=lambda m: hasattr(m, "shape"))
    flat = [(p, m) for p, m in flat if m is not None]
    sizes = [int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for _, m in flat]
    with checkpointer(ocp.PyTreeCheckpointer, path) as reader:
        for group in leaf_groups(sizes, max(budget_bytes, 1)):
            pairs = [(treemeta.encode_path(flat[i][0]), flat[i][1]) for i in group]
            item = treemeta.tree_from_records([(tokens, 0) for tokens, _ in pairs])
            restore_args = treemeta.tree_from_records(
                [(tokens, ocp.RestoreArgs(restore_type=np.ndarray)) for tokens, _ in pairs]
            )
            raw = reader.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
            for tokens, _ in pairs:
                yield tokens, np.asarray(_lookup(raw, tokens, f"{path}/{treemeta.path_name(tokens)}"))
            del raw
