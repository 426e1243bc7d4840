"""Hugging Face checkpoints (float or jaxcompress-compressed safetensors) as Flax param trees.

`load_hf` reads a Hugging Face model folder or ``.safetensors`` file: the original float
weights, or a file ``jaxcompress compress`` wrote from them (`QArray` leaves, pruned leaves),
and returns ``({"params": tree}, config)`` for `jaxcompress.models.bert.BertModel` or
`jaxcompress.models.llama.Llama` (`model_for` builds the model). Run a compressed tree with
``jaxcompress.compressed(model.apply)``: int8 dots where the weights are int8.

The name mapping (`bert_names`, `llama_names`, `hf_to_flax`) works on any leaf: torch
``Linear`` weights ``(out, in)`` become Flax kernels ``(in, out)`` by `transpose_leaf`, which
transposes a `QArray`'s values, scale, zero point and input scale and renumbers its channel /
group axes (and masks, when a masks tree is mapped). An integer-mode (W8A8) `QArray` kernel keeps
its codes where the file has them, ``(out, in)``, and records ``stored_permutation=(1, 0)``: the
layout `jaxcompress.quantize_params` gives such kernels by default, the one XLA's integer dot runs
fast, loaded without a copy. LayerNorm / RMSNorm ``weight`` become
``scale``, embedding ``weight`` become ``embedding``. Every tensor of the file must be used
(except buffers: ``position_ids``, ``rotary_emb.inv_freq``, a tied ``lm_head``), and the tree
must have exactly the shapes the model's ``init`` creates: anything else is a
`jaxcompress.CheckpointFormatError` naming the file and the tensor.

The model's config comes from ``config.json`` beside the weights, from the ``config=``
argument, or (for a file ``jaxcompress compress`` wrote) from the copy of the source's
``config.json`` the compressed file carries in its metadata.
"""

from __future__ import annotations

import functools
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Union

import jax
import jax.numpy as jnp

from jaxcompress._errors import ArgumentError, CheckpointFormatError, CheckpointNotFoundError
from jaxcompress.checkpoint import treemeta
from jaxcompress.checkpoint.compress import HF_CONFIG_KEY
from jaxcompress.checkpoint.safetensors_format import SafetensorsReader
from jaxcompress.checkpoint.safetensors_io import import_safetensors
from jaxcompress.models.bert import BertConfig, BertModel
from jaxcompress.models.layout import transpose_leaf
from jaxcompress.qarray import QArray

if TYPE_CHECKING:
    from jaxcompress.models.llama import LlamaConfig

__all__ = ["Arch", "ModelConfig", "HF_CONFIG_KEY", "load_hf", "hf_to_flax", "bert_names", "llama_names", "detect_arch", "model_for", "flax_to_hf"]

Arch = Literal["bert", "llama"]
ModelConfig = Union[BertConfig, "LlamaConfig"]
_MODEL_TYPES: dict[str, Arch] = {"bert": "bert", "llama": "llama"}
_BUFFERS = ("position_ids", "rotary_emb.inv_freq")

# (Hugging Face tensor name, Flax path under "params", transpose (out, in) -> (in, out))
Entry = tuple[str, tuple[str, ...], bool]


def _dense(hf: str, flax: tuple[str, ...], bias: bool = True) -> list[Entry]:
    out = [(f"{hf}.weight", flax + ("kernel",), True)]
    return out + [(f"{hf}.bias", flax + ("bias",), False)] if bias else out


def _layer_norm(hf: str, flax: tuple[str, ...], bias: bool = True) -> list[Entry]:
    out = [(f"{hf}.weight", flax + ("scale",), False)]
    return out + [(f"{hf}.bias", flax + ("bias",), False)] if bias else out


def bert_names(config: BertConfig) -> list[Entry]:
    """``(hf_name, flax_path, transpose)`` for every parameter of `BertModel` (``config``).

    >>> bert_names(BertConfig(num_hidden_layers=1))[0]
    ('embeddings.word_embeddings.weight', ('embeddings', 'word_embeddings', 'embedding'), False)
    """
    entries: list[Entry] = [
        (f"embeddings.{name}.weight", ("embeddings", name, "embedding"), False)
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ]
    entries += _layer_norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"))
    for i in range(config.num_hidden_layers):
        hf, flax = f"encoder.layer.{i}", ("encoder", f"layer_{i}")
        for name in ("query", "key", "value"):
            entries += _dense(f"{hf}.attention.self.{name}", flax + ("attention", name))
        entries += _dense(f"{hf}.attention.output.dense", flax + ("attention", "output", "dense"))
        entries += _layer_norm(f"{hf}.attention.output.LayerNorm", flax + ("attention", "output", "LayerNorm"))
        entries += _dense(f"{hf}.intermediate.dense", flax + ("intermediate", "dense"))
        entries += _dense(f"{hf}.output.dense", flax + ("output", "dense"))
        entries += _layer_norm(f"{hf}.output.LayerNorm", flax + ("output", "LayerNorm"))
    return entries + _dense("pooler.dense", ("pooler", "dense"))


def llama_names(config: "LlamaConfig") -> list[Entry]:
    """``(hf_name, flax_path, transpose)`` for every parameter of the Llama-style decoder.

    >>> from types import SimpleNamespace
    >>> [e[0] for e in llama_names(SimpleNamespace(num_layers=1, tie_embeddings=True))][:3]
    ['model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight', 'model.layers.0.self_attn.q_proj.weight']
    """
    entries: list[Entry] = [("model.embed_tokens.weight", ("embed_tokens", "embedding"), False)]
    for i in range(config.num_layers):
        hf, flax = f"model.layers.{i}", (f"layers_{i}",)
        entries += _layer_norm(f"{hf}.input_layernorm", flax + ("input_layernorm",), bias=False)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            entries += _dense(f"{hf}.self_attn.{name}", flax + ("self_attn", name), bias=False)
        entries += _layer_norm(f"{hf}.post_attention_layernorm", flax + ("post_attention_layernorm",), bias=False)
        for name in ("gate_proj", "up_proj", "down_proj"):
            entries += _dense(f"{hf}.mlp.{name}", flax + ("mlp", name), bias=False)
    entries += _layer_norm("model.norm", ("norm",), bias=False)
    return entries if config.tie_embeddings else entries + _dense("lm_head", ("lm_head",), bias=False)


def _config_arch(config: Any) -> Arch:
    if isinstance(config, BertConfig):
        return "bert"
    from jaxcompress.models.llama import LlamaConfig

    if isinstance(config, LlamaConfig):
        return "llama"
    raise ArgumentError(f"config: expected a BertConfig or a LlamaConfig, got {type(config).__name__}")


def model_for(config: ModelConfig) -> Any:
    """The Flax module for ``config``: `BertModel` or `jaxcompress.models.llama.Llama`.

    >>> type(model_for(BertConfig())).__name__
    'BertModel'
    """
    if _config_arch(config) == "bert" and isinstance(config, BertConfig):
        return BertModel(config)
    from jaxcompress.models.llama import Llama, LlamaConfig

    assert isinstance(config, LlamaConfig)
    return Llama(config)


def _normalise_names(names: list[str], arch: Arch) -> Callable[[str], str]:
    """How a file's tensor names relate to the canonical ones: an optional ``bert.`` prefix
    (BertFor* heads); Llama base models (``LlamaModel``) saved without the ``model.`` prefix."""
    if arch == "bert" and names and all(n.startswith("bert.") or n.startswith("cls.") for n in names):
        return lambda n: n.removeprefix("bert.")
    if arch == "llama" and "embed_tokens.weight" in names and "model.embed_tokens.weight" not in names:
        return lambda n: n if n == "lm_head.weight" else "model." + n
    return lambda n: n


def detect_arch(names: list[str], hf_config: Mapping[str, Any] | None = None) -> Arch:
    """``"bert"`` or ``"llama"`` from a ``config.json``'s ``model_type``, else from tensor names.

    >>> detect_arch(["model.embed_tokens.weight", "lm_head.weight"])
    'llama'
    """
    model_type = (hf_config or {}).get("model_type")
    if model_type is not None:
        if model_type not in _MODEL_TYPES:
            raise ArgumentError(f"config.json model_type {model_type!r} is not supported (supported: {', '.join(_MODEL_TYPES)})")
        return _MODEL_TYPES[model_type]
    if any(n.endswith("embeddings.word_embeddings.weight") for n in names):
        return "bert"
    if any(n.endswith("embed_tokens.weight") for n in names):
        return "llama"
    raise ArgumentError(f"cannot tell the architecture from the tensor names (first: {names[:3]}); pass arch='bert' or 'llama'")


@functools.lru_cache(maxsize=8)
def _expected_shapes(config: ModelConfig, arch: Arch) -> dict[tuple[str, ...], tuple[int, ...]]:
    model = model_for(config)
    ids = jnp.zeros((1, 2), jnp.int32)
    args = (ids, jnp.ones((1, 2), jnp.int32)) if arch == "bert" else (ids,)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes)
    return {tuple(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def _to_flax_kernel(leaf: Any, path: tuple[str, ...], *, where: str) -> Any:
    """A torch ``(out, in)`` weight as a Flax ``(in, out)`` kernel. A `QArray` that
    `jaxcompress.quantize_params` would store ``(out, in)`` by default (an integer-mode Dense
    kernel: `jaxcompress.execute.layout.default_layout`) keeps its codes where they are (zero-copy,
    ``stored_permutation=(1, 0)``); every other leaf is transposed into the logical layout."""
    from jaxcompress.execute.layout import default_layout

    if isinstance(leaf, QArray) and len(leaf.shape) == 2:
        wanted = default_layout("/".join(("params",) + path), leaf)
        if wanted is not None:
            return transpose_leaf(leaf, where=where, move_codes=False).with_layout(wanted)
    return transpose_leaf(leaf, where=where)


def hf_to_flax(tensors: Mapping[str, Any], config: ModelConfig, *, where: str = "checkpoint") -> dict:
    """``{"params": tree}`` for the model of ``config`` from ``{hf_name: leaf}``.

    Leaves may be arrays, `QArray`s or masks (``optax.MaskedNode()`` passes through); weights
    are transposed to Flax's ``(in, out)`` with `transpose_leaf`. Missing, unused or misshapen
    tensors are a `jaxcompress.CheckpointFormatError` naming ``where`` and the tensor.

    >>> import jax, numpy as np
    >>> config = BertConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
    ...                     intermediate_size=8, max_position_embeddings=4)
    >>> params = BertModel(config).init(jax.random.PRNGKey(0), np.zeros((1, 2), int), np.ones((1, 2), int))
    >>> tensors = flax_to_hf(params, config)
    >>> tensors["encoder.layer.0.intermediate.dense.weight"].shape  # torch (out, in)
    (8, 4)
    >>> hf_to_flax(tensors, config)["params"]["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"].shape
    (4, 8)
    """
    arch = _config_arch(config)
    entries = bert_names(config) if isinstance(config, BertConfig) else llama_names(config)
    canonical = _normalise_names(list(tensors), arch)
    by_name = {canonical(name): name for name in tensors}
    expected = _expected_shapes(config, arch)
    tree: dict[str, Any] = {}
    missing = [hf for hf, _, _ in entries if hf not in by_name]
    if missing:
        raise CheckpointFormatError(f"{where}: lacks {len(missing)} tensor(s) a {arch} model with this config needs, e.g. {missing[:4]}")
    for hf, path, transpose in entries:
        name = by_name.pop(hf)
        leaf = tensors[name]
        if transpose:
            leaf = _to_flax_kernel(leaf, path, where=f"{where}: {name}")
        shape = expected.get(path)
        if shape is None:
            raise CheckpointFormatError(f"{where}: {name} maps to params/{'/'.join(path)}, which the {arch} model does not have")
        if not treemeta.is_masked_node(leaf) and tuple(leaf.shape) != shape:
            raise CheckpointFormatError(
                f"{where}: {name} has shape {tuple(leaf.shape)}{' (transposed)' if transpose else ''}, the model's "
                f"params/{'/'.join(path)} is {shape} (does the config match the weights?)"
            )
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    tied_head = arch == "llama" and getattr(config, "tie_embeddings", False) and "lm_head.weight" in by_name
    leftover = sorted(n for hf, n in by_name.items() if not hf.endswith(_BUFFERS) and not (tied_head and hf == "lm_head.weight"))
    if leftover:
        raise CheckpointFormatError(f"{where}: {len(leftover)} tensor(s) the {arch} model does not use: {leftover[:6]}")
    if len(expected) != sum(1 for _ in entries):
        raise CheckpointFormatError(f"{where}: the {arch} model has {len(expected)} parameters, the mapping {len(entries)}")
    return {"params": tree}


def flax_to_hf(params: Mapping[str, Any], config: ModelConfig) -> dict[str, Any]:
    """The inverse of `hf_to_flax`: ``{hf_name: leaf}`` from ``{"params": tree}`` (or the tree),
    kernels transposed back to torch's ``(out, in)`` (`QArray`s too). Write it with
    `jaxcompress.export_safetensors` (split on ``.``) for a file in Hugging Face names.

    See `hf_to_flax` for an example.
    """
    tree = params.get("params", params)
    arch = _config_arch(config)
    entries = bert_names(config) if isinstance(config, BertConfig) else llama_names(config)
    out = {}
    for hf, path, transpose in entries:
        node: Any = tree
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                raise KeyError(f"params/{'/'.join(path)}: missing from the {arch} tree")
            node = node[key]
        if transpose:  # codes already stored (out, in) stay where they are
            stored = isinstance(node, QArray) and node.stored_permutation is not None
            node = transpose_leaf(node, where="params/" + "/".join(path), move_codes=not stored)
        out[hf] = node
    return out


def _weight_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]
    found = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    if len(found) == 1:
        return [os.path.join(path, found[0])]
    raise CheckpointNotFoundError(
        2, f"{path}: expected model.safetensors, a model.safetensors.index.json or exactly one .safetensors file, found {found or 'none'}; pass the file's path"
    )


def _read_hf_config(path: str, files: list[str], config: Any) -> tuple[Any, dict | None]:
    """``(config argument or None, config.json dict or None)``."""
    if config is not None and not isinstance(config, (str, os.PathLike, Mapping)):
        return config, None
    if isinstance(config, Mapping):
        return None, dict(config)
    candidates = [os.fspath(config)] if config is not None else [os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")]
    for candidate in candidates:
        if os.path.exists(candidate):
            with open(candidate, encoding="utf-8") as f:
                return None, json.load(f)
        if config is not None:
            raise CheckpointNotFoundError(2, f"{candidate}: no such config.json")
    embedded = SafetensorsReader(files[0]).metadata.get(HF_CONFIG_KEY)
    return None, (json.loads(embedded) if embedded is not None else None)


def _build_config(arch: Arch, hf_config: dict | None, where: str) -> ModelConfig:
    if hf_config is None:
        raise CheckpointNotFoundError(2, f"{where}: no config.json beside the weights and none recorded in the file; pass config= (a path, a dict or a config object)")
    if arch == "bert":
        return BertConfig.from_hf_json(hf_config)
    from jaxcompress.models.llama import LlamaConfig

    return LlamaConfig.from_hf_json(hf_config)


def load_hf(
    path: str | os.PathLike,
    arch: Arch | None = None,
    *,
    config: ModelConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    dtype: Any = jnp.float32,
) -> tuple[dict, ModelConfig]:
    """``({"params": tree}, config)`` from a Hugging Face folder or ``.safetensors`` file.

    Args:
      path: a model folder (``config.json`` + ``model.safetensors`` or a sharded index) or one
        ``.safetensors`` file: the float original, or what ``jaxcompress compress`` wrote.
      arch: ``"bert"`` or ``"llama"``; ``None`` reads ``model_type`` from the config, else
        the tensor names.
      config: a `BertConfig` / ``LlamaConfig``, a ``config.json`` dict or path; default: the
        ``config.json`` beside the weights, else the copy a compressed file carries.
      dtype: float leaves are cast to it (``None`` keeps the stored dtype); `QArray` leaves
        are returned as stored.

    >>> import dataclasses, os, tempfile, json, jax, numpy as np, jaxcompress as jc
    >>> config = BertConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
    ...                     intermediate_size=8, max_position_embeddings=4)
    >>> params = BertModel(config).init(jax.random.PRNGKey(0), np.zeros((1, 2), int), np.ones((1, 2), int))
    >>> folder = tempfile.mkdtemp()
    >>> _ = jc.export_safetensors(os.path.join(folder, "model.safetensors"), flax_to_hf(params, config))
    >>> with open(os.path.join(folder, "config.json"), "w") as f:
    ...     json.dump({"model_type": "bert", **dataclasses.asdict(config)}, f)
    >>> loaded, loaded_config = load_hf(folder)
    >>> loaded_config == config, loaded["params"]["encoder"]["layer_0"]["output"]["dense"]["kernel"].shape
    (True, (8, 4))
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointNotFoundError(2, f"{path}: no such Hugging Face model folder or .safetensors file")
    files = _weight_files(path)
    tensors: dict[str, Any] = {}
    for file in files:
        tree, _ = import_safetensors(file)
        for tokens, leaf in treemeta.flatten_leaves(tree):
            name = treemeta.path_name(tokens, ".")
            if name in tensors:
                raise CheckpointFormatError(f"{file}: tensor {name!r} is also in another shard")
            if dtype is not None and not isinstance(leaf, QArray) and jnp.issubdtype(leaf.dtype, jnp.floating):
                leaf = leaf.astype(dtype)
            tensors[name] = leaf
    given, hf_config = _read_hf_config(path, files, config)
    if given is not None:
        detected = _config_arch(given)
        if arch is not None and arch != detected:
            raise ArgumentError(f"arch={arch!r} but config is a {type(given).__name__}")
        model_config = given
    else:
        if arch is not None and (hf_config or {}).get("model_type") is None:
            detected = arch
        else:
            detected = detect_arch(sorted(tensors), hf_config)
        if arch is not None and arch != detected:
            raise ArgumentError(f"{path}: arch={arch!r}, but the checkpoint is a {detected} model")
        model_config = _build_config(detected, hf_config, path)
    where = files[0] if len(files) == 1 else path
    return hf_to_flax(tensors, model_config, where=where), model_config
