"""Masks read as bits inside a training step: what `prune` costs per ordinary step.

A bool mask is one byte per weight. `prune`'s step reads it three times (the masked gradient in
the inner optimizer's first- and second-moment passes, and the final ``where(mask, update,
-param)``): XLA:CPU fuses each use into a different elementwise pass, so on a 5.3M-param MLP the
masks cost 16 MB of reads per step against about 210 MB for Adam itself, several percent of the
step. `bit_view` reads the bool mask ONCE, packs it into bits (one eighth of the bytes, kept in
memory by an optimization barrier so that XLA cannot fuse the packing, and with it the byte
reads, back into every consumer), and returns a bool array computed from the bits on demand,
which XLA fuses into each consumer. Reads per step: 1 + 3/8 bytes per weight instead of 3.

The state keeps its plain bool masks (checkpoints, sharding, `prune_masks` unchanged): the bits
live only inside the step, as a temporary of 1/8 byte per weight. Small leaves, and leaves with
explicit mesh axes (whose sharded last axis the packing reshape cannot split), are used as they
are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxcompress.pruning.topk import explicit_sharding

__all__ = ["bit_view", "MIN_PACKED_SIZE"]

# Below this many weights the extra pass and kernel launch cost more than the bytes they save.
MIN_PACKED_SIZE = 1 << 16


def bit_view(mask: jax.Array) -> jax.Array:
    """``mask`` (bool) as a bool array that XLA recomputes from packed bits wherever it is used.

    Equal to ``mask`` element for element; only the bytes each use reads change (module
    docstring). Masks under `MIN_PACKED_SIZE` weights, 0-d masks and explicitly sharded masks
    come back unchanged.

    >>> import jax.numpy as jnp
    >>> mask = jnp.arange(70000).reshape(7, 10000) % 3 == 0
    >>> bool(jnp.array_equal(bit_view(mask), mask))
    True
    """
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        mask = mask.astype(bool)
    if mask.ndim == 0 or mask.size < MIN_PACKED_SIZE or explicit_sharding(mask) is not None:
        return mask
    last = mask.shape[-1]
    bits = lax.optimization_barrier(_pack(mask))
    # bit j of byte i is element 8 * i + j of the last axis
    shifts = jnp.arange(8, dtype=jnp.uint8)
    unpacked = ((bits[..., None] >> shifts) & jnp.uint8(1)).astype(bool)
    return unpacked.reshape(*mask.shape[:-1], -1)[..., :last]


def _pack(mask: jax.Array) -> jax.Array:
    """uint8 bytes of 8 consecutive mask entries along the last axis (zero-padded), built with
    shifts and ORs: one fused pass writing uint8 (`jnp.packbits` sums in uint32 first, which XLA
    keeps as a 4-byte-per-byte temporary)."""
    last = mask.shape[-1]
    pad = (-last) % 8
    if pad:
        mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)])
    groups = mask.reshape(*mask.shape[:-1], -1, 8).astype(jnp.uint8)
    # distinct powers of two: their uint8 sum is their OR
    return jnp.sum(groups << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)
