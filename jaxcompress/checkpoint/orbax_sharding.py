"""Shardings for restoring a compressed checkpoint onto a mesh (part of `orbax_io`).

A `QArray`'s values take its param's sharding (the param's LOGICAL shape is what the
``shardings`` callable sees; codes stored in another axis order, `QArray.stored_permutation`,
get that sharding with its axes moved the same way); its scale / zero point `follow_sharding`
(keep a mesh axis only on the dims it divides); masks shard like their param.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxcompress.checkpoint import treemeta
from jaxcompress.qarray import QArray
from jaxcompress.quant.arrays import stored_sharding

__all__ = ["follow_sharding", "shard_abstract"]


def follow_sharding(sharding: Any, shape: tuple[int, ...]) -> Any:
    """``sharding`` (a param's) adapted to an array of ``shape`` with the param's rank, e.g. its
    `QArray` scale: a `NamedSharding` keeps a mesh axis on each dim the axis divides and
    replicates the others (a per-channel scale ``(1, out)`` of a ``P('data', 'model')`` kernel
    becomes ``P(None, 'model')``). Other shardings are returned unchanged.

    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> follow_sharding(NamedSharding(mesh, P("data", "model")), (1, 8)).spec
    P(None, 'model')
    """
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    kept: list[Any] = []
    for dim, names in zip(shape, spec[: len(shape)]):
        if names is None:
            kept.append(None)
            continue
        axes = names if isinstance(names, tuple) else (names,)
        size = int(np.prod([sharding.mesh.shape[a] for a in axes]))
        kept.append(names if dim > 1 and dim % size == 0 else None)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*kept))


def _sharding_for(shardings: Any, name: str, shape: tuple[int, ...]) -> Any:
    if shardings is None:
        return None
    if isinstance(shardings, jax.sharding.Sharding):
        return follow_sharding(shardings, shape)
    if callable(shardings):
        sharding = shardings(name, shape)
        if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
            raise TypeError(f"{name}: shardings(path, shape) returned {sharding!r}, expected a jax.sharding.Sharding")
        return sharding
    raise TypeError(f"shardings must be a jax.sharding.Sharding or a callable (path, shape) -> Sharding, got {shardings!r}")


def _with_sharding(abstract: Any, sharding: Any) -> Any:
    if sharding is None:
        return abstract
    return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=follow_sharding(sharding, abstract.shape))


def shard_abstract(tree: Any, shardings: Any, root: str) -> Any:
    def place(path, leaf):
        name = treemeta.path_name(treemeta.encode_path(path))
        if treemeta.is_masked_node(leaf) or leaf is None:
            return leaf
        if isinstance(leaf, QArray):
            sharding = _sharding_for(shardings, name, leaf.shape)
            fields = {k: _with_sharding(v, sharding) for k, v in treemeta.qarray_array_fields(leaf).items()}
            fields["values"] = _with_sharding(leaf.values, stored_sharding(sharding, leaf.stored_permutation))
            return dataclasses.replace(leaf, **fields)
        return _with_sharding(leaf, _sharding_for(shardings, name, tuple(leaf.shape)))

    return jax.tree_util.tree_map_with_path(
        place, tree, is_leaf=lambda x: x is None or isinstance(x, QArray) or treemeta.is_masked_node(x)
    )
