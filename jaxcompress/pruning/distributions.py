"""How a target sparsity is spread over the leaves one rule selects.

- ``"uniform"``: every leaf gets the target sparsity.
- ``"erk"``: Erdos-Renyi-Kernel (Evci et al. 2020, "Rigging the Lottery"): leaf ``l`` keeps a
  density proportional to ``sum(shape_l) / prod(shape_l)`` (for a Dense kernel (in, out) that is
  ``(in + out) / (in * out)``, for a conv HWIO kernel ``(H + W + I + O) / (H W I O)``), scaled so
  the group as a whole has the target sparsity. Leaves whose density would exceed 1 are kept
  dense and the rest rescaled (largest first, as in the paper's code).
- a custom per-path map: write one `PruneRule` per path pattern, each with its own sparsity.

Both take a traced target sparsity (schedules work), and return per-leaf sparsities.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["DISTRIBUTIONS", "uniform_sparsities", "erk_sparsities"]

DISTRIBUTIONS = ("uniform", "erk")


def uniform_sparsities(shapes: Sequence[Sequence[int]], sparsity: Any) -> list[jax.Array]:
    """The same sparsity for every leaf.

    >>> [float(s) for s in uniform_sparsities([(4, 4), (8,)], 0.5)]
    [0.5, 0.5]
    """
    value = jnp.asarray(sparsity, jnp.float32)
    return [value for _ in shapes]


def erk_sparsities(shapes: Sequence[Sequence[int]], sparsity: Any, power: float = 1.0) -> list[jax.Array]:
    """Per-leaf sparsities of the ERK distribution with overall sparsity ``sparsity``.

    ``power`` scales the ERK score (``(sum/prod) ** power``; 1.0 is the paper's choice).

    >>> s = erk_sparsities([(100, 100), (100, 10)], 0.9)
    >>> [round(float(x), 3) for x in s]
    [0.929, 0.61]
    >>> sizes = [10000, 1000]
    >>> round(sum(float(x) * n for x, n in zip(s, sizes)) / sum(sizes), 4)
    0.9
    """
    sizes = jnp.array([math.prod(s) for s in shapes], jnp.float32)
    raw = jnp.array([(sum(s) / math.prod(s)) ** power for s in shapes], jnp.float32)
    density = 1.0 - jnp.asarray(sparsity, jnp.float32)
    budget = density * jnp.sum(sizes)

    def body(_, dense):
        dense_params = jnp.sum(jnp.where(dense, sizes, 0.0))
        weight = jnp.sum(jnp.where(dense, 0.0, raw * sizes))
        epsilon = (budget - dense_params) / jnp.where(weight > 0, weight, 1.0)
        probability = jnp.where(dense, 0.0, epsilon * raw)
        worst = jnp.argmax(probability)
        over = probability[worst] > 1.0
        return dense.at[worst].set(dense[worst] | over)

    dense = lax.fori_loop(0, len(shapes), body, jnp.zeros(len(shapes), bool))
    dense_params = jnp.sum(jnp.where(dense, sizes, 0.0))
    weight = jnp.sum(jnp.where(dense, 0.0, raw * sizes))
    epsilon = (budget - dense_params) / jnp.where(weight > 0, weight, 1.0)
    densities = jnp.where(dense, 1.0, jnp.clip(epsilon * raw, 0.0, 1.0))
    return [1.0 - densities[i] for i in range(len(shapes))]
