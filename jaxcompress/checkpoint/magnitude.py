"""Layer-wise magnitude pruning of one large leaf in bounded memory (NumPy, slice by slice).

`jaxcompress.pruning.prune_params` finds the k-th largest ``|w|`` with a jitted bisection that
holds several leaf-sized temporaries; on a 47 MB embedding table that is ~6 leaves of memory.
`magnitude_mask` computes the SAME mask (tested equal to ``prune_params``: same count
``round(float32(sparsity) * size)`` pruned, same order of scores, ties at the threshold kept
from the lowest flat index) with a radix select over the scores' 32-bit sortable keys: two
counting passes (high 16 bits, then low 16 bits) and one pass writing the mask, each over
slices of ``chunk`` elements. Extra memory: the bool mask plus one slice.

Scores follow `jaxcompress.pruning.topk`: float32 ``|w|``, NaN lowest, and float32 denormals
flushed to zero (as XLA does on CPU) so they tie with 0.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["magnitude_mask", "magnitude_mask_from_rows", "num_to_keep"]

_TINY = np.finfo(np.float32).tiny


def num_to_keep(sparsity: float, size: int) -> int:
    """``size - round(sparsity * size)``, with the product rounded in float32 as
    `jaxcompress.pruning.masks.num_to_prune` does.

    >>> num_to_keep(0.9, 11_720_448)
    1172045
    """
    pruned = int(np.round(np.float32(sparsity) * np.float32(size)))
    return size - min(max(pruned, 0), size)


def _keys(flat_slice: np.ndarray) -> np.ndarray:
    scores = np.abs(flat_slice.astype(np.float32))
    scores[scores < _TINY] = 0.0  # denormals (and -0.0) -> +0.0
    scores[np.isnan(scores)] = -np.inf
    bits = scores.view(np.uint32)
    negative = (bits >> np.uint32(31)) == 1
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def _select_bin(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry, and how many entries lie in higher bins."""
    above = np.cumsum(counts[::-1])  # above[i]: entries in the top i + 1 bins
    index = int(np.searchsorted(above, k))  # first i with above[i] >= k
    higher = int(above[index - 1]) if index > 0 else 0
    return len(counts) - 1 - index, higher


def magnitude_mask(weights: Any, sparsity: float, *, chunk: int = 1 << 20) -> np.ndarray:
    """Keep the ``size - round(sparsity * size)`` largest ``|w|`` (ties: lowest flat index).

    >>> magnitude_mask(np.array([[1.0, -5.0], [0.5, 2.0]]), 0.5).tolist()
    [[False, True], [False, True]]
    >>> magnitude_mask(np.zeros(4), 0.5).tolist()  # all tied: the first two are kept
    [True, True, False, False]
    """
    weights = np.asarray(weights)
    flat = weights.reshape(-1)

    def pieces():
        for begin in range(0, flat.size, chunk):
            yield flat[begin : begin + chunk]

    return _mask_from_pieces(pieces, flat.size, sparsity).reshape(weights.shape)


def magnitude_mask_from_rows(read_rows: Callable[[int, int], np.ndarray], shape: tuple[int, ...], sparsity: float, *, rows: int = 256) -> np.ndarray:
    """`magnitude_mask` of an array that is only read in row slices: ``read_rows(begin, end)``
    returns rows ``begin:end`` (along axis 0). Reads every row three times; holds one slice.

    >>> w = np.array([[1.0, -5.0], [0.5, 2.0]])
    >>> magnitude_mask_from_rows(lambda b, e: w[b:e], w.shape, 0.5, rows=1).tolist()
    [[False, True], [False, True]]
    """
    size = int(np.prod(shape, dtype=np.int64))

    def pieces():
        for begin in range(0, shape[0], rows):
            yield np.asarray(read_rows(begin, begin + rows)).reshape(-1)

    return _mask_from_pieces(pieces, size, sparsity).reshape(shape)


def _mask_from_pieces(pieces: Callable[[], Iterator[np.ndarray]], size: int, sparsity: float) -> np.ndarray:
    """Radix select over the flat array that ``pieces()`` yields in C order (once per pass)."""
    k = num_to_keep(sparsity, size)
    mask = np.zeros(size, bool)
    if k == 0:
        return mask
    if k == size:
        mask[:] = True
        return mask
    high = np.zeros(1 << 16, np.int64)
    for piece in pieces():
        high += np.bincount(_keys(piece) >> np.uint32(16), minlength=1 << 16)
    high_bin, above_high = _select_bin(high, k)
    low = np.zeros(1 << 16, np.int64)
    for piece in pieces():
        keys = _keys(piece)
        low += np.bincount(keys[(keys >> np.uint32(16)) == high_bin] & np.uint32(0xFFFF), minlength=1 << 16)
    low_bin, above_low = _select_bin(low, k - above_high)
    threshold = np.uint32((high_bin << 16) | low_bin)
    ties_left = k - above_high - above_low  # elements equal to the threshold that are kept
    offset = 0
    for piece in pieces():
        keys = _keys(piece)
        part = mask[offset : offset + keys.size]
        part[:] = keys > threshold
        if ties_left > 0:
            tied = np.flatnonzero(keys == threshold)[:ties_left]
            part[tied] = True
            ties_left -= tied.size
        offset += keys.size
    return mask
