"""`compress_checkpoint`: checkpoint on disk in, smaller checkpoint on disk out, leaf by leaf.

The source (a ``.safetensors`` file or an Orbax directory, see `open_source`) is validated in
full before anything is written. Then, for one leaf at a time: read it, prune it with the
recipe's first matching ``[[prune]]`` rule (`jaxcompress.pruning.prune_params` on a one-leaf
tree, so patterns see the same path as on the whole tree), quantize it with the first matching
``[[quantize]]`` rule (`jaxcompress.quantize_params`), encode it (`encode_leaf`: packed int4,
sparse bitmap or N:M where smaller) and append its bytes to a scratch file. Only then is the
safetensors header written and the data copied over in chunks (`SafetensorsWriter`), and the
result renamed onto ``dst``. Peak memory is therefore about one leaf and its transforms, not the
model; an exception or Ctrl-C removes the scratch files and leaves no ``dst``; a hard kill leaves
no ``dst`` either, and its hidden scratch files are removed by the next write to that folder
(see `jaxcompress.checkpoint.safetensors_format`). A full disk or a read-only folder is a
`CheckpointWriteError` naming ``dst``, with nothing left behind.

Because leaves are processed independently, prune rules must be leaf-local: ``scope="layer"``,
``distribution="uniform"``, ``score`` ``"magnitude"`` or ``"random"`` (a fixed key), and a
constant sparsity. Anything else is a `RecipeError` naming the rule, raised before any work; a
rule that does not fit a leaf (a group size that does not divide its axis) is a `RecipeError`
naming the rule and the leaf. A recipe that compresses no leaf at all warns
``"... no leaf compressed"`` (`NoLeafCompressedWarning`).
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable

import numpy as np

from jaxcompress._errors import DestinationExistsError, DestinationIsDirectoryError, DestinationFolderMissingError, RuleMismatchError
from jaxcompress.checkpoint import treemeta
from jaxcompress.checkpoint.recipes import Recipe, RecipeError, load_recipe
from jaxcompress.checkpoint.inspection import leaf_row
from jaxcompress.checkpoint.report import CompressionTable, LeafRow
from jaxcompress.checkpoint.safetensors_format import SafetensorsWriter
from jaxcompress.checkpoint.safetensors_io import encode_leaf, file_metadata
from jaxcompress.checkpoint.sliced import is_float as _is_float
from jaxcompress.checkpoint.sliced import quantize_sliced as _quantize_in_chunks
from jaxcompress.checkpoint.sliced import split_axis as _split_axis
from jaxcompress.checkpoint.sources import open_source
from jaxcompress.qarray import QArray
from jaxcompress.rules import match_rules

__all__ = ["compress_checkpoint", "compress_leaf", "check_leaf_local", "NoLeafCompressedWarning", "HF_CONFIG_KEY"]

HF_CONFIG_KEY = "jaxcompress.hf_config"  # __metadata__: the source's Hugging Face config.json (see _hf_config)

Progress = Callable[[int, int, str], None]


class NoLeafCompressedWarning(UserWarning):
    """`compress_checkpoint` wrote a file in which no leaf is quantized or pruned."""


def check_leaf_local(recipe: Recipe) -> None:
    """Raise a `RecipeError` naming the rule if a prune rule needs the whole tree at once.

    >>> check_leaf_local(load_recipe("sparse90-int8"))  # layer-wise magnitude: fine
    """
    for i, rule in enumerate(recipe.prune):
        where = f"{recipe.source}: prune[{i}]"
        if rule.skip:
            continue
        if rule.scope != "layer":
            raise RecipeError(f"{where}.scope: {rule.scope!r} needs every leaf at once; compress_checkpoint works leaf by leaf (use 'layer')")
        if rule.distribution != "uniform":
            raise RecipeError(f"{where}.distribution: {rule.distribution!r} needs every leaf at once; use 'uniform'")
        if rule.score not in ("magnitude", "random"):
            raise RecipeError(f"{where}.score: {rule.score!r} needs gradients; checkpoints have none (use 'magnitude')")
        if callable(rule.sparsity):
            raise RecipeError(f"{where}.sparsity: a schedule has no meaning for one-shot compression; give a number")


def _bounded_magnitude(rule: Any) -> bool:
    """Rules `magnitude_mask` computes exactly like ``prune_params``, in bounded memory."""
    return (rule.structure == "unstructured" and rule.score == "magnitude" and rule.scope == "layer"
            and rule.distribution == "uniform" and not callable(rule.sparsity))


def _matched(tree: Any, rules: tuple) -> int | None:
    if not rules:
        return None
    return match_rules(tree, rules).rule_indices[0]


CHUNK_BYTES = 4 << 20  # most bytes of float input one quantizer call sees
SLICE_MIN_BYTES = 1 << 16  # leaves from this size up are quantized slice by slice


def compress_leaf(tokens: Any, array: Any, recipe: Recipe, *, used: set | None = None, chunk_bytes: int | None = None, consume: bool = False) -> tuple[Any, Any]:
    """``(leaf, mask)`` for one source array under ``recipe``: the leaf is the input, a pruned
    array, or a `QArray`; ``mask`` a bool array or ``None``. ``used`` collects the
    ``("prune"|"quantize", index)`` of the rules that matched. Leaves over ``chunk_bytes`` are
    quantized in slices along a channel / group axis; layer-wise unstructured magnitude rules use
    the bounded-memory `jaxcompress.checkpoint.magnitude.magnitude_mask`, other prune rules
    `jaxcompress.pruning.prune_params` (same results as the in-memory transforms either way). ``consume=True`` hands ``array`` over: pruned weights
    may then be zeroed in it in place instead of in a copy.

    >>> import numpy as np
    >>> leaf, mask = compress_leaf([["key", "w"], ["key", "kernel"]], np.arange(1.0, 9.0, dtype=np.float32).reshape(4, 2), load_recipe("sparse90-int8"))
    >>> type(leaf).__name__, int(mask.sum())
    ('QArray', 1)
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    tokens = [list(t) for t in tokens]
    tree = treemeta.tree_from_records([(tokens, array)])
    used = set() if used is None else used
    mask = None
    index = _matched(tree, recipe.prune)
    floating = np.issubdtype(np.asarray(array).dtype, np.floating) or str(np.asarray(array).dtype) == "bfloat16"
    if index is not None:
        used.add(("prune", index))
        rule = recipe.prune[index]
        if not rule.skip and floating and np.ndim(array) > 0 and _bounded_magnitude(rule):
            from jaxcompress.checkpoint.magnitude import magnitude_mask

            if not (consume and isinstance(array, np.ndarray) and array.flags.writeable and array.flags.c_contiguous):
                array = np.array(array)  # never write into the caller's array
            mask = magnitude_mask(array, float(rule.sparsity))
            flat, flat_mask = array.reshape(-1), mask.reshape(-1)
            for begin in range(0, flat.size, 1 << 20):
                part = slice(begin, begin + (1 << 20))
                flat[part][~flat_mask[part]] = 0
            tree = treemeta.tree_from_records([(tokens, array)])
        elif not rule.skip and floating and np.ndim(array) > 0:
            import jax
            from jaxcompress.pruning import prune_params

            pruned, masks = prune_params(tree, recipe.prune, key=jax.random.PRNGKey(0), on_unused="ignore")
            (_, array), = treemeta.flatten_leaves(pruned)
            (_, mask), = treemeta.flatten_leaves(masks)
            mask = None if treemeta.is_masked_node(mask) else mask
            tree = treemeta.tree_from_records([(tokens, array)])
            del pruned, masks
    index = _matched(tree, recipe.quantize)
    if index is not None:
        used.add(("quantize", index))
        if not recipe.quantize[index].skip:
            if np.asarray(array).nbytes > SLICE_MIN_BYTES:
                array = _quantize_in_chunks(tokens, array, recipe.quantize[index].spec, chunk_bytes)
            else:
                from jaxcompress.params import quantize_params

                # logical layout, as the sliced path above: every leaf of a file is recorded alike
                qtree, _ = quantize_params(tree, recipe.quantize, on_unused="ignore", layout="logical")
                (_, array), = treemeta.flatten_leaves(qtree)
                del qtree
    return array, mask


def _compress_streamed(leaf_info: Any, load: Callable, rows: Callable | None, recipe: Recipe, used: set, chunk_bytes: int) -> tuple[Any, Any]:
    """`compress_leaf` for a source leaf, reading only row slices when that suffices: no prune
    rule applies and quantization can be sliced along axis 0 (e.g. per-output-channel
    (out, in) weights and embedding tables)."""
    import jax

    tokens = [list(t) for t in leaf_info.tokens]
    stub = treemeta.tree_from_records([(tokens, jax.ShapeDtypeStruct(leaf_info.shape, np.dtype(leaf_info.dtype)))])
    prune_index = _matched(stub, recipe.prune)
    quant_index = _matched(stub, recipe.quantize)
    prunes = prune_index is not None and not recipe.prune[prune_index].skip and _is_float(leaf_info.dtype) and leaf_info.shape
    if (rows is not None and prunes and prune_index is not None and _bounded_magnitude(recipe.prune[prune_index]) and quant_index is not None
            and not recipe.quantize[quant_index].skip and leaf_info.nbytes > SLICE_MIN_BYTES):
        spec = recipe.quantize[quant_index].spec
        split = _split_axis(spec.resolve(tuple(leaf_info.shape), leaf_info.path), leaf_info.shape)
        if split is not None and split[0] == 0:  # prune and quantize row slices: the leaf is never whole
            from jaxcompress.checkpoint.magnitude import magnitude_mask_from_rows

            used.update({("prune", prune_index), ("quantize", quant_index)})
            mask = magnitude_mask_from_rows(rows, leaf_info.shape, float(recipe.prune[prune_index].sparsity))
            masked_rows = lambda begin, end: np.where(mask[begin:end], rows(begin, end), 0).astype(np.dtype(leaf_info.dtype))
            leaf = _quantize_in_chunks(tokens, None, spec, chunk_bytes, shape=leaf_info.shape, dtype=np.dtype(leaf_info.dtype), rows=masked_rows)
            return leaf, mask
    if (rows is not None and not prunes and quant_index is not None and not recipe.quantize[quant_index].skip
            and leaf_info.nbytes > SLICE_MIN_BYTES and _is_float(leaf_info.dtype)):
        spec = recipe.quantize[quant_index].spec
        split = _split_axis(spec.resolve(tuple(leaf_info.shape), leaf_info.path), leaf_info.shape)
        if split is not None and split[0] == 0:
            used.add(("quantize", quant_index))
            if prune_index is not None:
                used.add(("prune", prune_index))
            leaf = _quantize_in_chunks(tokens, None, spec, chunk_bytes, shape=leaf_info.shape, dtype=np.dtype(leaf_info.dtype), rows=rows)
            return leaf, None
    return compress_leaf(tokens, load(), recipe, used=used, chunk_bytes=chunk_bytes, consume=True)


def _hf_config(source: Any) -> str | None:
    """The Hugging Face ``config.json`` of a safetensors source, so that the compressed file
    alone is enough for `jaxcompress.models.load_hf`: the one beside the source file, else the
    copy the source itself carries. ``None`` when there is none (or it is not a JSON object)."""
    import json

    if source.format != "safetensors":
        return None
    candidate = os.path.join(os.path.dirname(source.path), "config.json")
    text = source._reader.metadata.get(HF_CONFIG_KEY)
    if os.path.isfile(candidate) and os.path.getsize(candidate) < (1 << 20):
        with open(candidate, encoding="utf-8") as f:
            text = f.read()
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return json.dumps(data, sort_keys=True) if isinstance(data, dict) else None


def _row(path: str, leaf: Any, mask: Any, record: dict, nbytes: int, before: int) -> LeafRow:
    # one row definition for compress's report and `inspect`: pruned (masks) and rounding zeros apart
    return leaf_row(path, leaf, mask, nbytes=nbytes, encoding=record.get("encoding", "dense"), bytes_before=before)


def _progress_callback(progress: bool | Progress, total_bytes: int) -> tuple[Progress | None, Callable[[], None]]:
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return None, lambda: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None, lambda: None
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="compress", leave=False)
    sizes: dict[str, int] = {}

    def update(done: int, total: int, path: str) -> None:
        bar.set_postfix_str(path[-40:], refresh=False)
        bar.update(sizes.get(path, 0))

    update.sizes = sizes  # type: ignore[attr-defined]  # a function attribute read back by the caller
    return update, bar.close


def compress_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    recipe: str | os.PathLike | Recipe,
    *,
    encoding: str = "auto",
    overwrite: bool = False,
    progress: bool | Progress = False,
    on_unused: str | None = None,
) -> CompressionTable:
    """Compress the checkpoint ``src`` into the safetensors file ``dst`` with ``recipe``.

    Args:
      src: a ``.safetensors`` file (e.g. a Hugging Face ``model.safetensors``, or one
        `export_safetensors` wrote from a float tree) or an Orbax checkpoint directory of float
        weights.
      dst: the compressed ``.safetensors`` file to create (see `export_safetensors` for its
        tensor names); read it back with `import_safetensors`, or run it as a Hugging Face
        model with `jaxcompress.models.load_hf` (the ``config.json`` beside ``src`` is copied
        into the file's metadata).
      recipe: a preset name (``"w8a8"``, ``"w4-g128"``, ``"2:4+int8"``, ``"90%-sparse+int8"``),
        a TOML path, or a `Recipe`.
      encoding: per-leaf storage, as in `export_safetensors`.
      overwrite: replace an existing ``dst`` (atomically); otherwise it is an error.
      progress: ``True`` for a tqdm bar (if tqdm is installed), or a callable
        ``(leaves_done, leaves_total, path)``.
      on_unused: ``"warn"``, ``"error"`` or ``"ignore"`` for recipe rules that matched no leaf;
        default ``"ignore"`` for presets (they carry rules for several layouts), else ``"warn"``.

    Returns:
      The per-leaf `CompressionTable` (bytes on disk, ratio against the source file).

    >>> import os, tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> folder = tempfile.mkdtemp()
    >>> save_file({"dense.weight": np.ones((8, 256), np.float32), "dense.bias": np.zeros(8, np.float32)},
    ...           os.path.join(folder, "model.safetensors"))
    >>> table = compress_checkpoint(os.path.join(folder, "model.safetensors"), os.path.join(folder, "w4.safetensors"), "w4-g128")
    >>> [(row.path, row.format) for row in table.rows]
    [('dense/bias', 'float32'), ('dense/weight', 'int4')]
    """
    recipe = load_recipe(recipe)
    check_leaf_local(recipe)
    if on_unused is None:
        on_unused = "ignore" if recipe.source.startswith("preset:") else "warn"
    if on_unused not in ("warn", "error", "ignore"):
        raise ValueError(f"on_unused must be 'warn', 'error' or 'ignore', got {on_unused!r}")
    dst = os.path.abspath(os.fspath(dst))
    if os.path.isdir(dst):
        raise DestinationIsDirectoryError(21, f"{dst}: is a directory; the compressed checkpoint is one .safetensors file")
    if os.path.exists(dst) and not overwrite:
        raise DestinationExistsError(17, f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")
    if not os.path.isdir(os.path.dirname(dst)):
        raise DestinationFolderMissingError(2, f"{dst}: the destination directory {os.path.dirname(dst)} does not exist")
    source = open_source(src)
    if os.path.abspath(source.path) == dst:
        raise DestinationExistsError(17, f"{dst}: source and destination are the same file")
    callback, finish = _progress_callback(progress, sum(leaf.nbytes for leaf in source.leaves))
    sizes = getattr(callback, "sizes", None)
    if sizes is not None:
        sizes.update({leaf.path: leaf.nbytes for leaf in source.leaves})
    used: set = set()
    rows, records = [], []
    compressed_leaves = 0
    start = time.perf_counter()
    try:
        with SafetensorsWriter(dst) as writer:
            for done, (leaf_info, load) in enumerate(source.iter_leaves(), start=1):
                try:
                    leaf, mask = _compress_streamed(leaf_info, load, source.row_reader(leaf_info), recipe, used, CHUNK_BYTES)
                except RuleMismatchError as err:
                    raise RecipeError(f"{recipe.source}: a rule does not fit leaf {leaf_info.path!r} of {source.path}: {err}") from None
                compressed_leaves += isinstance(leaf, QArray) or mask is not None
                where = f"{source.path}: leaf {leaf_info.path!r}"
                record, tensors = encode_leaf([list(t) for t in leaf_info.tokens], leaf, mask, encoding=encoding, where=where)
                nbytes = sum(writer.add(name, tensor) for name, tensor in tensors)
                del tensors
                records.append(record)
                rows.append(_row(leaf_info.path, leaf, mask, record, nbytes, leaf_info.nbytes))
                del leaf, mask
                if callback is not None:
                    callback(done, len(source.leaves), leaf_info.path)
            unused = [f"{kind}[{i}] (pattern {rules[i].pattern!r})" for kind, rules in (("prune", recipe.prune), ("quantize", recipe.quantize)) for i in range(len(rules)) if (kind, i) not in used]
            if unused and on_unused == "error":
                raise RecipeError(f"{recipe.source}: {len(unused)} rule(s) matched no leaf of {source.path}: {', '.join(unused)}")
            extra = {"jaxcompress.recipe": recipe.name, "jaxcompress.source": os.path.basename(source.path)}
            hf_config = _hf_config(source)
            if hf_config is not None:
                extra[HF_CONFIG_KEY] = hf_config
            writer.metadata = file_metadata(records, extra)
    finally:
        finish()
    if unused and on_unused == "warn":
        warnings.warn(f"{recipe.source}: {len(unused)} rule(s) matched no leaf: {', '.join(unused)}", UserWarning, stacklevel=2)
    if not compressed_leaves:
        warnings.warn(
            f"{recipe.source}: no leaf compressed: no rule quantized or pruned any of the {len(rows)} leaves of "
            f"{source.path}; {dst} holds them unchanged (check the recipe's patterns against the leaf paths "
            f"`jaxcompress inspect {source.path}` lists)", NoLeafCompressedWarning, stacklevel=2)
    title = f"{os.path.basename(source.path)} -> {os.path.basename(dst)} ({recipe.name}, {time.perf_counter() - start:.1f} s)"
    return CompressionTable(tuple(rows), title, os.path.getsize(dst), source.total_bytes, compressed_leaves=compressed_leaves)
