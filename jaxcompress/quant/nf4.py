"""NF4: the normal-float 4-bit code book of QLoRA (Dettmers et al. 2023), computed here.

NF4 stores each weight as one of 16 code values in ``[-1, 1]`` times an absmax scale per group
(QLoRA uses groups of 64). The codes are quantiles of the standard normal distribution, so that
normally distributed weights use every code about equally often, with an exact zero. The
construction (section 3 of the paper, "asymmetric" variant that has a zero): 8 positive codes
are the quantiles of ``N(0, 1)`` at 8 evenly spaced probabilities from ``offset`` down to (not
including) 0.5, 7 negative codes likewise at 7 probabilities, plus 0; everything divided by the
largest magnitude. ``offset`` is the mean of ``1 - 1/(2*15)`` and ``1 - 1/(2*16)`` (the paper's
choice for 15 and 16 quantiles: the extreme quantile would be infinite at probability 1).

The code book is sorted ascending; a stored value ``v`` (``jnp.int4``, -8..7) means code
``NF4_CODE[v + 8]``. Encoding picks the nearest code (ties to the smaller index).

>>> float(NF4_CODE[0]), float(NF4_CODE[7]), float(NF4_CODE[15])
(-1.0, 0.0, 1.0)
>>> [round(float(c), 4) for c in NF4_CODE[8:11]]
[0.0796, 0.1609, 0.2461]
"""

from __future__ import annotations

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NF4_CODE", "nf4_code_book", "nf4_encode", "nf4_decode", "NF4_OFFSET"]

NF4_OFFSET = 0.5 * ((1.0 - 1.0 / (2 * 15)) + (1.0 - 1.0 / (2 * 16)))


def nf4_code_book(offset: float = NF4_OFFSET) -> np.ndarray:
    """The 16 NF4 code values, float64, ascending, in ``[-1, 1]`` with 0 at index 7.

    >>> book = nf4_code_book()
    >>> book.shape, bool(np.all(np.diff(book) > 0)), float(book[7])
    ((16,), True, 0.0)
    """
    normal = NormalDist()
    positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    codes = np.sort(np.array(positive + [0.0] + negative, dtype=np.float64))
    return codes / np.abs(codes).max()


NF4_CODE = nf4_code_book()
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2.0


def nf4_encode(normalized: jax.Array) -> jax.Array:
    """Values already divided by their scale (in ``[-1, 1]``; outside is clipped) -> the
    stored ``int4`` values (nearest code index - 8).

    >>> nf4_encode(jnp.array([-1.0, 0.0, 0.01, 1.0, 3.0])).tolist()
    [-8, -1, -1, 7, 7]
    """
    midpoints = jnp.asarray(_MIDPOINTS, jnp.float32)
    index = jnp.searchsorted(midpoints, normalized.astype(jnp.float32), side="left")
    return (index - 8).astype(jnp.int4)


def nf4_decode(values: jax.Array) -> jax.Array:
    """Stored ``int4`` values -> their code values (float32, before the scale).

    >>> nf4_decode(jnp.array([-8, -1, 7], jnp.int4)).tolist()
    [-1.0, 0.0, 1.0]
    """
    table = jnp.asarray(NF4_CODE, jnp.float32)
    return jnp.take(table, values.astype(jnp.int32) + 8, mode="clip")
