"""Putting one-shot results back where the parameter lives (its devices, sharding and dtype)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def place_like(leaf: Any, value: Any) -> Any:
    """``value`` (an array of ``leaf``'s rank, e.g. the leaf's mask or its scales) on ``leaf``'s
    devices: a `NamedSharding` leaf's partitioning along each axis where the two lengths agree,
    replicated along the others; a plain (NumPy) leaf leaves ``value`` as it is. One-shot methods
    run their per-matrix algorithm on the whole matrix (see docs/scaling.md) and put the result
    back where the parameter lives with this."""
    if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer) or value is None:
        return value
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding) and np.ndim(value) == leaf.ndim:
        spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
        spec = tuple(axes if value.shape[d] == leaf.shape[d] else None for d, axes in enumerate(spec))
        return jax.device_put(value, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec)))
    if np.shape(value) == leaf.shape or len(sharding.device_set) == 1:
        return jax.device_put(value, sharding)
    return value


def like_leaf(leaf: Any, value: Any) -> Any:
    """``value`` in ``leaf``'s place: its dtype, and its sharding for a `jax.Array` leaf (NumPy
    for a NumPy leaf), so a compressed leaf replacing its original keeps the call signature the
    capture programs were compiled for (and a sharded leaf stays sharded)."""
    if isinstance(leaf, np.ndarray):
        return np.asarray(value, dtype=leaf.dtype)
    return place_like(leaf, jnp.asarray(value, dtype=leaf.dtype))
