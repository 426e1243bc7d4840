"""float64 NumPy references for the pruning math, written independently of the package (sorts,
loops), to check the sort-free bisection implementation against."""

from __future__ import annotations

import numpy as np


def keep_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest; ties to the lowest flat index (a stable sort on -score)."""
    flat = np.asarray(scores, np.float64).ravel()
    order = np.lexsort((np.arange(flat.size), -flat))
    keep = np.zeros(flat.size, bool)
    keep[order[:k]] = True
    return keep.reshape(np.shape(scores))


def n_pruned(sparsity: float, units: int) -> int:
    # float32 product, as the library documents round(sparsity * units) in float32
    return int(np.round(np.float32(sparsity) * np.float32(units)))


def unstructured(scores, sparsity):
    return keep_top_k(scores, scores.size - n_pruned(sparsity, scores.size))


def structured(scores, sparsity, axis, norm):
    scores = np.moveaxis(np.asarray(scores, np.float64), axis, 0).reshape(scores.shape[axis], -1)
    units = np.abs(scores).sum(1) if norm == "l1" else np.sqrt((scores**2).sum(1))
    return unstructured(units, sparsity)  # per-unit keep vector


def n_m(scores, n, m, axis):
    moved = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    keep = np.zeros(moved.shape, bool)
    for index in np.ndindex(moved.shape[:-1]):
        row = moved[index]
        for start in range(0, row.size, m):
            group = row[start : start + m]
            order = sorted(range(m), key=lambda j: (-group[j], j))
            for j in order[:n]:
                keep[index + (start + j,)] = True
    return np.moveaxis(keep, -1, axis)


def global_keep(score_list, sparsity, normalize=None):
    arrays = []
    for s in score_list:
        s = np.asarray(s, np.float64)
        if normalize == "max":
            s = s / np.abs(s).max()
        elif normalize == "l2":
            s = s / np.sqrt((s**2).sum())
        elif normalize == "l1":
            s = s / np.abs(s).sum()
        elif normalize == "mean":
            s = s / np.abs(s).mean()
        arrays.append(s)
    flat = np.concatenate([a.ravel() for a in arrays])
    keep = keep_top_k(flat, flat.size - n_pruned(sparsity, flat.size))
    out, start = [], 0
    for a in arrays:
        out.append(keep[start : start + a.size].reshape(a.shape))
        start += a.size
    return out


def erk_densities(shapes, sparsity):
    sizes = np.array([np.prod(s) for s in shapes], np.float64)
    raw = np.array([sum(s) / np.prod(s) for s in shapes], np.float64)
    budget = (1 - sparsity) * sizes.sum()
    dense = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        eps = (budget - sizes[list(dense)].sum()) / (raw[free] * sizes[free]).sum()
        over = [i for i in free if eps * raw[i] > 1]
        if not over:
            break
        dense.add(max(over, key=lambda i: raw[i]))
    return np.array([1.0 if i in dense else eps * raw[i] for i in range(len(shapes))])


def zhu_gupta(step, final, begin, end, initial=0.0, power=3, frequency=1):
    if step >= end:
        return final
    if step < begin:
        return initial
    since = ((step - begin) // frequency) * frequency
    return final + (initial - final) * (1 - since / (end - begin)) ** power
