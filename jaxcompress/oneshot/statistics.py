"""Per-site input statistics (XᵀX, norms, absmax, row counts), recorded as observations of the program layer.

* ``hessian``: ``sum_rows x x^T`` (``d_in x d_in``; GPTQ's ``H = 2 X^T X`` up to the factor 2),
* ``sq_norms``: ``sum_rows x_j^2`` (Wanda's ``||X_j||^2``; equal to the diagonal of ``hessian``),
* ``abs_sums``: ``sum_rows |x_j|`` (mean ``|x_j|`` = ``abs_sums / count``, AWQ),
* ``absmax``: ``max_rows |x_j|`` (SmoothQuant),
* ``count``: the rows seen,
* ``cross`` (only when a capture is given the dense model too): ``sum_rows x x_d^T``, the
  compressed model's input ``x`` against the DENSE model's input ``x_d`` on the same row (the
  cross term of input-drift-aware targets: ``min_V sum ||V x - W x_d||^2``),

where a "row" is one input vector of the weight's canonical matrix view (below). The per-batch
reduction is one jitted function (compiled once per batch shape, float32 on the device, the
Gram matrix at ``Precision.HIGHEST``); across batches the sums are accumulated on the host in
float64, so 10k+ rows lose nothing to float32 summation order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcompress.execute.hooks import (
    DotSite,
)
from jaxcompress.oneshot.matrix import MatrixView, activation_rows, matrix_view


class LayerStatistics(NamedTuple):
    """Input statistics of one weight leaf (NumPy float64, host).

    Attributes:
      hessian: ``(d_in, d_in)`` ``sum_rows x x^T`` (``None`` if captured with ``hessian=False``).
      sq_norms: ``(d_in,)`` ``sum_rows x_j^2``.
      abs_sums: ``(d_in,)`` ``sum_rows |x_j|``.
      absmax: ``(d_in,)`` ``max_rows |x_j|``.
      count: rows seen.
      site: the first `DotSite` the leaf feeds.
      view: its `MatrixView` (``to_matrix(leaf, stats)`` uses it).
      num_sites: how many contractions pooled their rows here (> 1 for tied weights).
      cross: ``(d_in, d_in)`` ``sum_rows x x_d^T`` with ``x_d`` the dense model's input on the
        same row (``None`` unless the capture ran the dense model alongside; see
        `dense_target_weight`).
    """

    hessian: np.ndarray | None
    sq_norms: np.ndarray
    abs_sums: np.ndarray
    absmax: np.ndarray
    count: Any  # int; an int array (one per layer) for a scanned weight
    site: DotSite
    view: MatrixView
    num_sites: int = 1
    cross: np.ndarray | None = None



def _row_statistics(rows: jax.Array, with_hessian: bool):
    magnitude = jnp.abs(rows)
    hessian = jnp.matmul(rows.T, rows, precision=lax.Precision.HIGHEST) if with_hessian else None
    return hessian, jnp.sum(rows * rows, axis=0), jnp.sum(magnitude, axis=0), jnp.max(magnitude, axis=0, initial=0.0)


def _masked_rows(site: DotSite, x: jax.Array, rows: jax.Array, mask: jax.Array):
    """Zero the rows ``mask`` drops; ``mask``'s shape is a prefix of the activation's row axes."""
    if site.primitive == "dot_general":
        contract = tuple(site.activation_contracting_axes)
        row_shape = tuple(d for a, d in enumerate(x.shape) if a not in contract)
    else:
        spec = site.params["dimension_numbers"].lhs_spec
        row_shape = (x.shape[spec[0]],)  # a conv: one mask entry per example
    if tuple(mask.shape) != row_shape[: mask.ndim]:
        raise ValueError(
            f"{site.path}: row_mask of shape {tuple(mask.shape)} does not fit this site, whose rows are "
            f"{row_shape} (the activation without its contracted axes; a conv takes a per-example mask)"
        )
    keep = (mask != 0).reshape(mask.shape + (1,) * (len(row_shape) - mask.ndim))
    keep = jnp.broadcast_to(keep, row_shape).reshape(-1) if site.primitive == "dot_general" else jnp.repeat(keep.reshape(-1), rows.shape[0] // row_shape[0])
    return jnp.where(keep[:, None], rows, 0.0), jnp.sum(keep, dtype=jnp.int32)


def _site_rows(site: DotSite, x: jax.Array, shapes: dict, mask) -> tuple[jax.Array, jax.Array]:
    """The (masked) rows of the activation ``x`` at ``site`` and how many count."""
    view = matrix_view(site, shapes[site.path][site.stacked :])
    rows = activation_rows(site, x, view)
    if mask is None:
        return rows, jnp.asarray(rows.shape[0], jnp.int32)
    return _masked_rows(site, x, rows, mask)


class _DenseRows:
    """The hook of the DENSE model's run in a cross capture: keeps the (masked) activation rows of
    every selected site, keyed by ``(path, occurrence)``, for `_Recorder` to pair with the
    compressed model's rows of the same site (the same program, so the same order). Weights a
    ``scan`` slices (``site.stacked``) and sites inside any control-flow body (``site.in_body``:
    their rows belong to the dense run's body trace, which the compressed run cannot use) are
    left out: no cross term for them, so their layers keep the plain target."""

    def __init__(self, shapes: dict, mask):
        self.shapes = shapes
        self.mask = mask
        self.rows: dict[tuple[str, int], jax.Array] = {}
        self._seen: dict[str, int] = {}

    def hook(self, site: DotSite, x: jax.Array, weight: jax.Array, observe=None) -> jax.Array:
        occurrence = self._seen.get(site.path, 0)
        self._seen[site.path] = occurrence + 1
        if not site.stacked and not site.in_body:
            self.rows[(site.path, occurrence)] = _site_rows(site, x, self.shapes, self.mask)[0]
        return x


class _Recorder:
    """The statistics hook of one traced capture: reduces the activation at each site of a
    selected leaf (sites reading the same activation share one reduction) and records the
    reductions as observations of the program layer (summed over tied uses, carried out of
    loop bodies, stacked per layer for a weight a ``scan`` slices from its ``xs``)."""

    def __init__(self, shapes: dict, with_hessian: bool, mask, dense: _DenseRows | None = None):
        self.shapes = shapes
        self.with_hessian = with_hessian
        self.mask = mask
        self.dense = dense  # the dense model's rows of the same sites: also record `cross`
        self._seen: dict[str, int] = {}
        self.sites: dict[str, list[tuple[DotSite, MatrixView]]] = {}
        self.computed: list = []  # (activation, site signature, statistics): q / k / v share one

    def hook(self, site: DotSite, x: jax.Array, weight: jax.Array, observe) -> jax.Array:
        view = matrix_view(site, self.shapes[site.path][site.stacked :])
        known = self.sites.setdefault(site.path, [])
        if known and (known[0][1].d_in, known[0][1].kind) != (view.d_in, view.kind):
            raise ValueError(
                f"{site.path}: the weight feeds contractions with different matrix views "
                f"({known[0][1].kind} d_in={known[0][1].d_in} and {view.kind} d_in={view.d_in}); tied "
                f"weights must share their input dimension to pool statistics"
            )
        known.append((site, view))
        occurrence = self._seen.get(site.path, 0)
        self._seen[site.path] = occurrence + 1
        signature = (site.primitive, site.activation_contracting_axes, repr(site.params) if view.kind == "conv" else "")
        for activation, known_signature, statistics in self.computed:
            if activation is x and known_signature == signature:
                break
        else:
            rows = activation_rows(site, x, view)
            count = rows.shape[0]
            if self.mask is not None:
                rows, count = _masked_rows(site, x, rows, self.mask)
            dense = None if self.dense is None or site.in_body else self.dense.rows.get((site.path, occurrence))
            cross = None if dense is None else jnp.matmul(rows.T, dense, precision=lax.Precision.HIGHEST)
            statistics = _row_statistics(rows, self.with_hessian) + (jnp.asarray(count, jnp.int32), cross)
            self.computed.append((x, signature, statistics))
        hessian, sq_norms, abs_sums, absmax, count, cross = statistics
        if hessian is not None:
            observe((site.path, "hessian"), hessian, "stack")
        if cross is not None:
            observe((site.path, "cross"), cross, "stack")
        observe((site.path, "sq_norms"), sq_norms, "stack")
        observe((site.path, "abs_sums"), abs_sums, "stack")
        observe((site.path, "absmax"), absmax, "stack" if site.stacked else "max")
        observe((site.path, "count"), count, "stack")
        return x

    def results(self, observations: dict) -> dict:
        out = {}
        for path in self.sites:
            get = lambda name: observations.get((path, name))
            if get("count") is None:
                continue
            # a cross term summed over only some uses of a weight (others in a body) would not
            # match its Hessian: such a weight gets none
            partial = any(site.stacked or site.in_body for site, _ in self.sites[path])
            out[path] = (get("hessian") if self.with_hessian else None, get("sq_norms"), get("abs_sums"), get("absmax"),
                         get("count"), None if partial else get("cross"))
        return out


def _accumulate(totals: dict, result: dict) -> None:
    """Add one batch's (device-fetched) statistics to the float64 host totals."""
    for path, (gram, sq, abs_sum, absmax, rows, cross) in result.items():
        rows = np.asarray(rows, np.int64)
        entry = totals.get(path)
        if entry is None:
            totals[path] = [None if gram is None else np.asarray(gram, np.float64), np.asarray(sq, np.float64),
                            np.asarray(abs_sum, np.float64), np.asarray(absmax, np.float64), rows,
                            None if cross is None else np.asarray(cross, np.float64)]
        else:
            if gram is not None:
                entry[0] += gram
            entry[1] += sq
            entry[2] += abs_sum
            entry[3] = np.maximum(entry[3], absmax)
            entry[4] += rows
            if cross is not None and entry[5] is not None:
                entry[5] += cross


def _statistics(totals: dict, sites: dict) -> dict[str, "LayerStatistics"]:
    out = {}
    for path in sites:  # program order (a jitted result's dict is key-sorted)
        gram, sq, abs_sum, absmax, rows, cross = totals[path]
        site, view = sites[path][0]
        count = int(rows) if np.ndim(rows) == 0 else np.asarray(rows)  # per layer for a scanned weight
        out[path] = LayerStatistics(gram, sq, abs_sum, absmax, count, site, view, len(sites[path]), cross)
    return out
