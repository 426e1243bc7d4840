"""Calibration capture: per-weight input statistics from sample batches, no activations stored.

One-shot methods (GPTQ, SparseGPT, Wanda, AWQ, SmoothQuant, ...) need statistics of the input
each weight multiplies. `capture_statistics` runs an UNMODIFIED function on sample batches
through `jaxcompress.execute.hooks.call_with_dot_hook` and, at every ``dot_general`` /
``conv_general_dilated`` a selected float params leaf feeds, reduces the activation to

* ``hessian``: ``sum_rows x x^T`` (``d_in x d_in``; GPTQ's ``H = 2 X^T X`` up to the factor 2),
* ``sq_norms``: ``sum_rows x_j^2`` (Wanda's ``||X_j||^2``; equal to the diagonal of ``hessian``),
* ``abs_sums``: ``sum_rows |x_j|`` (mean ``|x_j|`` = ``abs_sums / count``, AWQ),
* ``absmax``: ``max_rows |x_j|`` (SmoothQuant),
* ``count``: the rows seen,

where a "row" is one input vector of the weight's canonical matrix view (below). The per-batch
reduction is one jitted function (compiled once per batch shape, float32 on the device, the
Gram matrix at ``Precision.HIGHEST``); across batches the sums are accumulated on the host in
float64, so 10k+ rows lose nothing to float32 summation order.

The canonical matrix view (`to_matrix` / `from_matrix`): a weight reads as ``W`` of shape
``(d_out, d_in)`` whose columns are in the order of the statistics' input dimension, so the
layer computes ``rows @ W.T``:

* a ``dot_general`` weight (Flax ``Dense`` ``(in, out)`` gives ``W = kernel.T``;
  ``DenseGeneral`` / einsum kernels): the contracted axes, in the order the dot pairs them with
  the activation's, flattened to ``d_in``; the other axes, in order, flattened to ``d_out``.
  Layout ops between the leaf and the dot (``transpose``, ``reshape``, ...) are replayed, so the
  view is of the operand the dot really sees. Weights with dot batch dimensions have no single
  matrix view (an error naming the path).
* a ``conv_general_dilated`` kernel: ``d_out`` = output features, ``d_in`` = the im2col patch
  vector ordered (input feature, then the spatial axes in kernel order), the order of
  ``lax.conv_general_dilated_patches`` which produces the rows. Grouped / depthwise convs
  (``feature_group_count > 1``) are not supported (an error naming the path).

A leaf used by several sites (tied weights) pools the rows of all of them; the sites must agree
on the matrix view. A selected leaf that reaches no dot / conv is absent from the result.

Sequential (layer-by-layer) methods use `sequential_groups`: the selected leaves in program
order, grouped by the activation they multiply (attention's query / key / value share one), so
a method can compress group by group, each group's statistics captured with the
already-compressed predecessors in place. `sequential_capture` does that in ONE pass of the
function (`SegmentedCapture`: the flattened program is cut before each group, the values live
across a cut are carried on the device), or, where groups interleave in the program, with one
pass up to each group (`GroupCapture`: XLA drops the part of the network after the group's
sites). Either compiles every group's programs ahead in a background thread.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Literal

from jaxcompress.execute.hooks import DotSite, call_with_dot_hook, flatten_call, retag, run_steps, tag_inputs, untag
from jaxcompress._program import TraceCache
from jaxcompress.rules import path_to_str

__all__ = [
    "LayerStatistics",
    "MatrixView",
    "matrix_view",
    "to_matrix",
    "from_matrix",
    "activation_rows",
    "capture_statistics",
    "GroupCapture",
    "SegmentedCapture",
    "sequential_capture",
    "like_leaf",
    "place_like",
    "sequential_groups",
    "make_selector",
    "batch_args",
]


# ---------------------------------------------------------------------------------------------
# The matrix view
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """How a weight leaf reads as a ``(d_out, d_in)`` matrix at one site (static data).

    Attributes:
      path: the leaf's path.
      kind: ``"dot"`` or ``"conv"``.
      leaf_shape: the leaf's shape.
      operand_shape: the shape the contraction sees (after the layout ops).
      permutation: operand axes in matrix order: the ``d_out`` axes, then the ``d_in`` axes.
      d_out, d_in: the matrix shape.
      layout: the layout ops from the leaf to the operand (`DotSite.layout`).
    """

    path: str
    kind: str
    leaf_shape: tuple[int, ...]
    operand_shape: tuple[int, ...]
    permutation: tuple[int, ...]
    d_out: int
    d_in: int
    layout: tuple = ()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in)


def _apply_layout(leaf: jax.Array, layout: tuple, path: str) -> jax.Array:
    x = leaf
    for name, params in layout:
        if name == "transpose":
            x = lax.transpose(x, tuple(params["permutation"]))
        elif name == "reshape":
            x = lax.reshape(x, tuple(params["new_sizes"]))
        elif name == "squeeze":
            x = lax.squeeze(x, tuple(params["dimensions"]))
        elif name == "broadcast_in_dim" and math.prod(params["shape"]) == math.prod(x.shape):
            x = lax.broadcast_in_dim(x, tuple(params["shape"]), tuple(params["broadcast_dimensions"]))
        elif name in ("convert_element_type", "copy", "copy_p"):
            continue
        else:
            raise ValueError(
                f"{path}: the weight reaches its contraction through {name!r}, which is not a "
                f"one-to-one relayout; no matrix view (expected transpose / reshape / squeeze / dtype casts)"
            )
    return x


def matrix_view(site: DotSite, leaf_shape: Sequence[int]) -> MatrixView:
    """The `MatrixView` of a leaf of shape ``leaf_shape`` at ``site``.

    >>> import jax.numpy as jnp
    >>> from jaxcompress.execute.hooks import call_with_dot_hook
    >>> sites = []
    >>> _ = call_with_dot_hook(lambda p, x: x @ p["w"], ({"w": jnp.ones((3, 2))}, jnp.ones((4, 3))), None,
    ...                        lambda s, x, w: sites.append(s) or x, select=lambda p: True)
    >>> matrix_view(sites[0], (3, 2)).shape
    (2, 3)
    """
    leaf_shape = tuple(int(d) for d in leaf_shape)
    operand = jax.eval_shape(lambda l: _apply_layout(l, site.layout, site.path), jax.ShapeDtypeStruct(leaf_shape, jnp.float32))
    operand_shape = tuple(operand.shape)
    if site.primitive == "dot_general":
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = site.params["dimension_numbers"]
        contract, batch = (rhs_contract, rhs_batch) if site.weight_side == "rhs" else (lhs_contract, lhs_batch)
        if batch:
            raise ValueError(
                f"{site.path}: the weight has dot_general batch dimensions {tuple(batch)}; a batched "
                f"weight has no single (d_out, d_in) matrix view"
            )
        contract = tuple(int(a) for a in contract)
        out_axes = tuple(a for a in range(len(operand_shape)) if a not in contract)
        kind = "dot"
    else:
        params = site.params
        if params.get("feature_group_count", 1) != 1 or params.get("batch_group_count", 1) != 1:
            raise ValueError(
                f"{site.path}: grouped convolutions (feature_group_count="
                f"{params.get('feature_group_count')}, batch_group_count={params.get('batch_group_count')}) "
                f"have no single (d_out, d_in) matrix view; expected feature_group_count=1"
            )
        rhs_spec = tuple(params["dimension_numbers"].rhs_spec)
        out_axes, contract = (rhs_spec[0],), tuple(rhs_spec[1:])
        kind = "conv"
    d_out = math.prod(operand_shape[a] for a in out_axes)
    d_in = math.prod(operand_shape[a] for a in contract)
    return MatrixView(site.path, kind, leaf_shape, operand_shape, out_axes + contract, d_out, d_in, site.layout)


def _view(site_or_view, leaf_shape) -> MatrixView:
    if isinstance(site_or_view, MatrixView):
        return site_or_view
    if isinstance(site_or_view, LayerStatistics):
        return site_or_view.view
    return matrix_view(site_or_view, leaf_shape)


def to_matrix(leaf: jax.Array, site: DotSite | MatrixView | "LayerStatistics") -> jax.Array:
    """The ``(d_out, d_in)`` float32 matrix view of ``leaf`` (see the module docs).

    ``site`` is a `DotSite`, a `MatrixView` or the `LayerStatistics` captured for the leaf.

    >>> import jax.numpy as jnp, numpy as np
    >>> params = {"w": jnp.arange(6.0).reshape(3, 2)}
    >>> stats = capture_statistics(lambda p, x: x @ p["w"], params, [jnp.ones((4, 3))], lambda p: True)
    >>> W = to_matrix(params["w"], stats["w"])      # Dense (in, out) -> (out, in)
    >>> bool(np.array_equal(W, params["w"].T)), bool(np.array_equal(from_matrix(W, params["w"], stats["w"]), params["w"]))
    (True, True)
    """
    view = _view(site, leaf.shape)
    if tuple(leaf.shape) != view.leaf_shape:
        raise ValueError(f"{view.path}: leaf shape {tuple(leaf.shape)} is not the captured {view.leaf_shape}")
    operand = _apply_layout(jnp.asarray(leaf, jnp.float32), view.layout, view.path)
    return jnp.transpose(operand, view.permutation).reshape(view.d_out, view.d_in)


def from_matrix(matrix: jax.Array, leaf: Any, site: DotSite | MatrixView | "LayerStatistics") -> jax.Array:
    """Inverse of `to_matrix`: a ``(d_out, d_in)`` matrix back to ``leaf``'s shape and dtype.

    ``leaf`` only supplies the shape and dtype (an array or a ``jax.ShapeDtypeStruct``).
    """
    view = _view(site, leaf.shape)
    if tuple(matrix.shape) != view.shape:
        raise ValueError(f"{view.path}: matrix shape {tuple(matrix.shape)} is not the view's {view.shape}")
    permuted_shape = tuple(view.operand_shape[a] for a in view.permutation)
    operand = jnp.transpose(jnp.reshape(matrix.astype(jnp.float32), permuted_shape), np.argsort(view.permutation))
    forward = lambda l: _apply_layout(l, view.layout, view.path)
    (restored,) = jax.linear_transpose(forward, jax.ShapeDtypeStruct(view.leaf_shape, jnp.float32))(operand)
    return restored.astype(leaf.dtype)


def activation_rows(site: DotSite, x: jax.Array, view: MatrixView) -> jax.Array:
    """The activation at ``site`` as ``(rows, d_in)`` float32, columns in the view's order
    (the dot's contracted axes flattened; a conv's im2col patches)."""
    x = x.astype(jnp.float32)
    if site.primitive == "dot_general":
        contract = tuple(site.activation_contracting_axes)
        others = tuple(a for a in range(x.ndim) if a not in contract)
        return jnp.transpose(x, others + contract).reshape(-1, view.d_in)
    params = site.params
    numbers = params["dimension_numbers"]
    rhs_spec = tuple(numbers.rhs_spec)
    filter_shape = [view.operand_shape[a] for a in rhs_spec[2:]]
    patches = lax.conv_general_dilated_patches(
        x,
        filter_shape,
        params["window_strides"],
        params["padding"],
        lhs_dilation=params["lhs_dilation"],
        rhs_dilation=params["rhs_dilation"],
        dimension_numbers=numbers,
        precision=lax.Precision.HIGHEST,
    )
    return jnp.moveaxis(patches, numbers.out_spec[1], -1).reshape(-1, view.d_in)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


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
    """

    hessian: np.ndarray | None
    sq_norms: np.ndarray
    abs_sums: np.ndarray
    absmax: np.ndarray
    count: int
    site: DotSite
    view: MatrixView
    num_sites: int = 1


def make_selector(select: Any) -> Callable[[str], bool]:
    """``select`` as a predicate on path strings: a callable as is; a regex string, a rule
    (anything with a regex ``.pattern``), or a sequence of them: the first that fully matches
    decides, and a rule with ``skip=True`` deselects.

    >>> make_selector([".*kernel"])("Dense_0/kernel"), make_selector("a")("ab")
    (True, False)
    """
    if callable(select) and not hasattr(select, "pattern"):
        return select
    if isinstance(select, str) or hasattr(select, "pattern"):
        select = [select]
    compiled = []
    for i, item in enumerate(select):
        pattern = item if isinstance(item, str) else getattr(item, "pattern", None)
        if not isinstance(pattern, str):
            raise TypeError(f"select[{i}] is {item!r}: expected a regex string, a rule with a regex .pattern, or a callable")
        compiled.append((re.compile(pattern), bool(getattr(item, "skip", False))))

    def selector(path: str) -> bool:
        for pattern, skip in compiled:
            if pattern.fullmatch(path):
                return not skip
        return False

    return selector


def batch_args(batch: Any) -> tuple:
    """A batch as the positional arguments after params: a tuple is spread, anything else is one."""
    return tuple(batch) if isinstance(batch, tuple) else (batch,)


def _float_paths(params: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {}
    for path, leaf in flat:
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape") and jnp.issubdtype(leaf.dtype, jnp.floating):
            out[path_to_str(path)] = tuple(leaf.shape)
    return out


def _call(fn, params, batch, params_argnum):
    rest = batch_args(batch)
    return rest[:params_argnum] + (params,) + rest[params_argnum:]


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


class _Recorder:
    """The statistics hook of one traced capture: reduces the activation at each site of a
    selected leaf (sites reading the same activation share one reduction)."""

    def __init__(self, shapes: dict, with_hessian: bool, mask):
        self.shapes = shapes
        self.with_hessian = with_hessian
        self.mask = mask
        self.recorded: dict[str, list] = {}
        self.sites: dict[str, list[tuple[DotSite, MatrixView]]] = {}
        self.computed: list = []  # (activation, site signature, statistics): q / k / v share one

    def hook(self, site: DotSite, x: jax.Array, weight: jax.Array) -> jax.Array:
        view = matrix_view(site, self.shapes[site.path])
        known = self.sites.setdefault(site.path, [])
        if known and (known[0][1].d_in, known[0][1].kind) != (view.d_in, view.kind):
            raise ValueError(
                f"{site.path}: the weight feeds contractions with different matrix views "
                f"({known[0][1].kind} d_in={known[0][1].d_in} and {view.kind} d_in={view.d_in}); tied "
                f"weights must share their input dimension to pool statistics"
            )
        known.append((site, view))
        signature = (site.primitive, site.activation_contracting_axes, repr(site.params) if view.kind == "conv" else "")
        for activation, known_signature, statistics in self.computed:
            if activation is x and known_signature == signature:
                break
        else:
            rows = activation_rows(site, x, view)
            count = rows.shape[0]
            if self.mask is not None:
                rows, count = _masked_rows(site, x, rows, self.mask)
            statistics = _row_statistics(rows, self.with_hessian) + (count,)
            self.computed.append((x, signature, statistics))
        self.recorded.setdefault(site.path, []).append(statistics)
        return x

    def results(self) -> dict:
        out = {}
        for path, uses in self.recorded.items():
            hessian = None if not self.with_hessian else sum(u[0] for u in uses)
            out[path] = (
                hessian,
                sum(u[1] for u in uses),
                sum(u[2] for u in uses),
                jnp.max(jnp.stack([u[3] for u in uses]), axis=0),
                jnp.asarray(sum(u[4] for u in uses), jnp.int32),
            )
        return out


def _accumulate(totals: dict, result: dict) -> None:
    """Add one batch's (device-fetched) statistics to the float64 host totals."""
    for path, (gram, sq, abs_sum, absmax, rows) in result.items():
        rows = int(rows)
        entry = totals.get(path)
        if entry is None:
            totals[path] = [None if gram is None else np.asarray(gram, np.float64), np.asarray(sq, np.float64),
                            np.asarray(abs_sum, np.float64), np.asarray(absmax, np.float64), rows]
        else:
            if gram is not None:
                entry[0] += gram
            entry[1] += sq
            entry[2] += abs_sum
            entry[3] = np.maximum(entry[3], absmax)
            entry[4] += rows


def _statistics(totals: dict, sites: dict) -> dict[str, "LayerStatistics"]:
    out = {}
    for path in sites:  # program order (a jitted result's dict is key-sorted)
        gram, sq, abs_sum, absmax, rows = totals[path]
        site, view = sites[path][0]
        out[path] = LayerStatistics(gram, sq, abs_sum, absmax, int(rows), site, view, len(sites[path]))
    return out


class _Capture:
    """The jitted per-batch reduction for one selection (kept to reuse its compilation)."""

    def __init__(self, fn, params, select, params_argnum, with_hessian, cache=None):
        self.shapes = _float_paths(params)
        self.select = lambda path: path in self.shapes and select(path)
        self.params_argnum = params_argnum
        self.with_hessian = with_hessian
        self.sites: dict[str, list[tuple[DotSite, MatrixView]]] = {}
        self.cache = TraceCache() if cache is None else cache
        self.fn = fn
        self.batch_fn = jax.jit(self._batch)

    def _batch(self, params, batch, mask):
        recorder = _Recorder(self.shapes, self.with_hessian, mask)
        args = _call(self.fn, params, batch, self.params_argnum)
        call_with_dot_hook(self.fn, args, None, recorder.hook, select=self.select, params_argnum=self.params_argnum, cache=self.cache)
        self.sites = recorder.sites
        return recorder.results()


def capture_statistics(
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    select: Any,
    *,
    params_argnum: int = 0,
    hessian: bool = True,
    row_mask: Callable[[Any], Any] | None = None,
    trace_cache: TraceCache | None = None,
) -> dict[str, LayerStatistics]:
    """Input statistics of the selected weights over sample batches (see the module docs).

    Args:
      fn: the unmodified function, called as ``fn(params, *batch)`` (a tuple batch) or
        ``fn(params, batch)``.
      params: its params (float leaves; `QArray` leaves are not selected).
      batches: an iterable of sample batches (at least one).
      select: which leaves: a callable on path strings, a path string, or a sequence of path
        strings / rules (see `make_selector`).
      params_argnum: where params go among ``fn``'s positional arguments.
      hessian: also accumulate the ``d_in x d_in`` Gram matrix (skip it for Wanda-style methods
        on wide layers).
      row_mask: optional ``row_mask(batch) -> array``: rows where it is 0 are left out of every
        statistic (e.g. padding tokens: ``lambda batch: batch[1]`` for an attention mask). Its
        shape must be a prefix of each site's row axes (the activation without its contracted
        axes, e.g. ``(batch, tokens)``); a conv takes a per-example mask.
      trace_cache: a `jaxcompress._program.TraceCache` shared by repeated captures of the
        same function (sequential methods), so ``fn`` is traced once per batch shape.

    Returns:
      ``{path: LayerStatistics}`` for the selected leaves that feed a dot / conv, in program order.

    >>> import jax.numpy as jnp, numpy as np
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> fn = lambda p, x: x @ p["w"] + p["b"]
    >>> stats = capture_statistics(fn, params, [jnp.array([[1.0, 2, 0]]), jnp.array([[0.0, -1, 3]])], [".*w"])
    >>> list(stats), stats["w"].count, stats["w"].absmax.tolist()
    (['w'], 2, [1.0, 2.0, 3.0])
    >>> stats["w"].hessian.tolist()[1]
    [2.0, 5.0, -3.0]
    """
    with GroupCapture(fn, params, [make_selector(select)], batches, params_argnum=params_argnum, hessian=hessian,
                      row_mask=row_mask, trace_cache=trace_cache, compile_ahead=False) as capture:
        return capture(0, params)


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


def _compile_workers() -> int:
    """Background compile threads: half the cores (compilation is mostly single-threaded; the
    other half keeps running the capture programs), at least one. Two threads on two cores
    measured slower than one on the MiniLM GPTQ benchmark."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _batch_signature(batch: Any, mask: Any):
    leaves, treedef = jax.tree_util.tree_flatten((batch, mask))
    return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)


class _Programs:
    """Jitted capture programs, optionally compiled ahead by background threads.

    `lower` traces and lowers a program for example arguments and (with ``compile_ahead``)
    queues its compilation; `call` runs it with the compiled executable when one was prepared
    for that key, else (or when the arguments' avals / shardings differ from the lowered ones,
    so the executable refuses them) through ``jax.jit``, which compiles for the new arguments.
    """

    def __init__(self, compile_ahead: bool):
        self._executor = ThreadPoolExecutor(_compile_workers(), thread_name_prefix="jaxcompress-compile") if compile_ahead else None
        self._pending: dict = {}

    def lower(self, key, jitted, *args):
        lowered = jitted.lower(*args)
        if self._executor is not None:
            self._pending[key] = self._executor.submit(lowered.compile)
        return lowered

    def call(self, key, jitted, *args):
        future = self._pending.get(key)
        if future is not None:
            compiled = future.result()
            try:
                return compiled(*args)
            except (TypeError, ValueError):
                # Other avals / shardings than lowered: jit compiles for these (or raises the real error).
                self._pending.pop(key, None)
        return jitted(*args)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._pending.clear()


class _BatchCapture:
    """What the captures share: the batches, their row masks and shape signatures, closing."""

    def _init_batches(self, batches: Iterable[Any], row_mask: Callable[[Any], Any] | None) -> None:
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("capture_statistics needs at least one batch")
        self.masks = [None if row_mask is None else jnp.asarray(row_mask(batch)) for batch in self.batches]
        self.signatures = [_batch_signature(b, m) for b, m in zip(self.batches, self.masks)]
        self.first: dict = {}  # signature -> index of its first batch
        for index, signature in enumerate(self.signatures):
            self.first.setdefault(signature, index)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the compilations not started yet (running ones finish in the background)."""
        self._programs.close()


class GroupCapture(_BatchCapture):
    """`capture_statistics` for a sequence of selections (the groups of a sequential method),
    each captured with the params the caller passes at that point, its programs compiled ahead.

    ``capture(i, params)`` returns the statistics of group ``i`` computed with ``params`` (e.g.
    with groups ``0 .. i-1`` already compressed), each group's program running the function
    from its start up to the group's sites (XLA drops the rest), so ``n`` groups cost about
    ``n / 2`` passes of the function; `sequential_capture` prefers `SegmentedCapture`, which
    runs it once. With ``compile_ahead``, every group's program is traced and lowered here, for
    every distinct batch shape, and compiled by background threads while earlier groups run.
    Lowering uses the ``params`` given here: later params must keep each leaf's shape, dtype
    and sharding (`like_leaf`), else the program is compiled again for them. Use as a context
    manager (or call `close`) to stop pending compilations.

    Args:
      fn, params, batches, params_argnum, hessian, row_mask, trace_cache: as for
        `capture_statistics` (``batches`` is iterated once per group).
      groups: one selection per group (see `make_selector`: a callable on path strings, a path,
        or a sequence of paths / rules).
      compile_ahead: compile every group's programs in background threads up front.
    """

    def __init__(
        self,
        fn: Callable,
        params: Any,
        groups: Sequence[Any],
        batches: Iterable[Any],
        *,
        params_argnum: int = 0,
        hessian: bool = True,
        row_mask: Callable[[Any], Any] | None = None,
        trace_cache: TraceCache | None = None,
        compile_ahead: bool = True,
    ):
        self._init_batches(batches, row_mask)
        cache = TraceCache(size=max(32, 4 * len(self.first))) if trace_cache is None else trace_cache
        self.captures = [_Capture(fn, params, make_selector(group), params_argnum, hessian, cache) for group in groups]
        self._programs = _Programs(compile_ahead and len(self.captures) > 0)
        if compile_ahead:
            for group_index, capture in enumerate(self.captures):
                for signature, index in self.first.items():
                    self._programs.lower((group_index, signature), capture.batch_fn, params, self.batches[index], self.masks[index])

    def __call__(self, index: int, params: Any) -> dict[str, "LayerStatistics"]:
        """The statistics of group ``index`` with ``params`` (see the class docs)."""
        capture = self.captures[index]
        totals: dict[str, list] = {}
        for batch, mask, signature in zip(self.batches, self.masks, self.signatures):
            result = self._programs.call((index, signature), capture.batch_fn, params, batch, mask)
            _accumulate(totals, jax.device_get(result))
        return _statistics(totals, capture.sites)


class _NotSegmentable(Exception):
    pass


class _SegmentPlan:
    """One batch signature's flat program, cut before each group's first site.

    Keys computed from params and constants alone ("static": a weight's transpose, cast, ...)
    are never carried across a cut: each segment replays the static steps it needs from the
    params it is given, so a weight compressed after a cut is seen compressed. Every other
    value is carried; it must not depend on a weight whose group starts after the step that
    computes it (it would go stale when that group is compressed), else `_NotSegmentable`.
    """

    def __init__(self, program, cuts, lasts, group_of_path: Callable[[str], int | None], params_argnum: int):
        self.program = program
        self.cuts = cuts  # step index of each group's first site
        self.lasts = lasts  # step index of each group's last site
        end = lasts[-1] + 1
        param_keys = program.param_keys(params_argnum)
        static = set(program.consts) | set(param_keys)
        groups_of: dict = {}  # key -> groups whose weights it depends on
        for key, path in param_keys.items():
            group = group_of_path(path)
            if group is not None:
                groups_of[key] = frozenset([group])
        self.static_steps: list[int] = []
        for index, (_, ins, outs) in enumerate(program.steps[:end]):
            refs = [ref for ref in ins if not isinstance(ref, Literal)]
            depends = frozenset().union(*(groups_of.get(ref, frozenset()) for ref in refs))
            if all(ref in static for ref in refs):
                static.update(outs)
                self.static_steps.append(index)
            else:
                late = [g for g in depends if cuts[g] > index]
                if late:
                    raise _NotSegmentable(f"step {index} uses a weight of group {late[0]} before that group's first site")
            if depends:
                groups_of.update((key, depends) for key in outs)
        self.static = static
        last_uses = program.last_uses(end)
        self.carried = [tuple(k for k in program.carried(cut, end, last_uses) if k not in static) for cut in cuts]
        self.tags: dict = {}  # carried key -> tag of a (transformed) weight crossing a cut

    def replay(self, start: int, stop: int) -> list[int]:
        """The static steps before ``start`` whose results the steps ``[start, stop)`` need."""
        steps = self.program.steps
        needed = {ref for _, ins, _ in steps[start:stop] for ref in ins if not isinstance(ref, Literal) and ref in self.static}
        chosen = []
        for index in reversed([i for i in self.static_steps if i < start]):
            _, ins, outs = steps[index]
            if needed.intersection(outs):
                chosen.append(index)
                needed.update(ref for ref in ins if not isinstance(ref, Literal))
        return chosen[::-1]


class SegmentedCapture(_BatchCapture):
    """`GroupCapture` that runs the function ONCE per batch over all groups, layer by layer.

    The traced function is flattened (`jaxcompress.execute.hooks.flatten_call`) and cut before
    each group's first site. Group ``i``'s statistics come from a program that starts from the
    values live at cut ``i`` (computed with the params of the previous call, i.e. with groups
    ``< i`` compressed) and runs to the group's last site; a second program advances those values
    to cut ``i + 1`` with the params of the NEXT call (group ``i`` compressed). The values live
    across a cut (e.g. a transformer's hidden state) are kept on the device between calls. So
    ``n`` groups cost one pass of the function instead of ``n / 2``, and each program is one
    segment (cheap to compile; all compiled ahead in background threads). Same statistics as
    `GroupCapture` up to float rounding.

    Groups must be called in order, ``0, 1, 2, ...``, each once, with params that differ from
    the previous call's only in already-captured groups. Raises `_NotSegmentable` (caught by
    `sequential_capture`) when the groups do not follow one another in program order (a group
    with a site after the next group's first site, e.g. a tied weight used again later).
    """

    def __init__(
        self,
        fn: Callable,
        params: Any,
        groups: Sequence[Any],
        batches: Iterable[Any],
        *,
        params_argnum: int = 0,
        hessian: bool = True,
        row_mask: Callable[[Any], Any] | None = None,
        compile_ahead: bool = True,
    ):
        self.fn = fn
        self.params_argnum = params_argnum
        self.hessian = hessian
        self._init_batches(batches, row_mask)
        self.shapes = _float_paths(params)
        self.groups = [make_selector(group) for group in groups]
        self.select = lambda path: path in self.shapes and any(group(path) for group in self.groups)
        self.sites: list[dict] = [{} for _ in self.groups]
        self.plans = {signature: self._plan(params, self.batches[index]) for signature, index in self.first.items()}
        self.jitted = {
            signature: (
                [jax.jit(self._segment(plan, k, stats=True)) for k in range(len(self.groups))],
                [jax.jit(self._segment(plan, k, stats=False)) for k in range(len(self.groups))],
            )
            for signature, plan in self.plans.items()
        }
        self._programs = _Programs(compile_ahead)
        self._carried: list = [None] * len(self.batches)
        self._next = 0
        if compile_ahead:
            shapes = {signature: {} for signature in self.first}
            for k in range(len(self.groups)):
                for signature, index in self.first.items():
                    stats_fns, advance_fns = self.jitted[signature]
                    batch, mask = self.batches[index], self.masks[index]
                    lowered = self._programs.lower(("advance", k, signature), advance_fns[k], params, batch, shapes[signature])
                    shapes[signature] = lowered.out_info
                    self._programs.lower(("stats", k, signature), stats_fns[k], params, batch, mask, shapes[signature])

    def _plan(self, params, batch) -> _SegmentPlan:
        program = flatten_call(self.fn, _call(self.fn, params, batch, self.params_argnum))
        found: dict[str, list[int]] = {}

        def dry(params, batch):
            env = dict(program.consts)
            env.update(tag_inputs(program, _call(self.fn, params, batch, self.params_argnum), None, select=self.select,
                                      params_argnum=self.params_argnum))

            def hook(index, site, x, weight):
                found.setdefault(site.path, []).append(index)
                return x

            run_steps(program, range(len(program.steps)), env, hook)

        jax.eval_shape(dry, params, batch)
        cuts, lasts = [], []
        for group in self.groups:
            steps = [index for path, indices in found.items() if group(path) for index in indices]
            if not steps:
                raise _NotSegmentable("a group reaches no dot / conv")
            cuts.append(min(steps))
            lasts.append(max(steps))
        for k in range(len(cuts) - 1):
            if not cuts[k] <= lasts[k] < cuts[k + 1]:
                raise _NotSegmentable(f"group {k}'s sites are not all before group {k + 1}'s first site")

        def group_of(path):
            return next((g for g, group in enumerate(self.groups) if group(path)), None)

        return _SegmentPlan(program, cuts, lasts, group_of, self.params_argnum)

    def _segment(self, plan: _SegmentPlan, k: int, *, stats: bool):
        """Group ``k``'s statistics program (``stats``: cut ``k`` to its last site) or its advance
        program (cut ``k - 1`` to cut ``k``; from the start for ``k == 0``)."""
        if stats:
            start, stop, carry_out = plan.cuts[k], plan.lasts[k] + 1, None
        else:
            start, stop, carry_out = (plan.cuts[k - 1] if k else 0), plan.cuts[k], plan.carried[k]
        group = self.groups[k]
        replay = plan.replay(start, stop)

        def segment(params, batch, *rest):
            mask, carried = rest if stats else (None, rest[0])
            args = _call(self.fn, params, batch, self.params_argnum)
            env = dict(plan.program.consts)
            env.update(tag_inputs(plan.program, args, None, select=self.select, params_argnum=self.params_argnum))
            env.update((key, retag(value, plan.tags.get(key))) for key, value in carried.items())
            recorder = _Recorder(self.shapes, self.hessian, mask) if stats else None

            def hook(index, site, x, weight):
                return recorder.hook(site, x, weight) if stats and group(site.path) else x

            run_steps(plan.program, replay, env, hook)
            run_steps(plan.program, range(start, stop), env, hook)
            if stats:
                self.sites[k] = recorder.sites
                return recorder.results()
            out = {}
            for key in carry_out:
                out[key], tag = untag(env[key])
                if tag is not None:
                    plan.tags[key] = tag
            return out

        return segment

    def close(self) -> None:
        """Cancel the compilations not started yet and drop the carried values."""
        super().close()
        self._carried = [None] * len(self.batches)

    def __call__(self, index: int, params: Any) -> dict[str, "LayerStatistics"]:
        """The statistics of group ``index`` (the next in order) with ``params``."""
        if index != self._next:
            raise ValueError(f"SegmentedCapture captures its groups in order: expected group {self._next}, got {index}")
        totals: dict[str, list] = {}
        for b, (batch, mask, signature) in enumerate(zip(self.batches, self.masks, self.signatures)):
            stats_fns, advance_fns = self.jitted[signature]
            carried = {} if index == 0 else self._carried[b]
            carried = self._programs.call(("advance", index, signature), advance_fns[index], params, batch, carried)
            self._carried[b] = carried
            result = self._programs.call(("stats", index, signature), stats_fns[index], params, batch, mask, carried)
            _accumulate(totals, jax.device_get(result))
        self._next += 1
        if self._next == len(self.groups):
            self._carried = [None] * len(self.batches)
        return _statistics(totals, self.sites[index])


def sequential_capture(
    fn: Callable,
    params: Any,
    groups: Sequence[Any],
    batches: Iterable[Any],
    *,
    params_argnum: int = 0,
    hessian: bool = True,
    row_mask: Callable[[Any], Any] | None = None,
    compile_ahead: bool = True,
) -> "SegmentedCapture | GroupCapture":
    """The capture a sequential method should use for ``groups`` (called in order, once each):
    `SegmentedCapture` (one pass of ``fn`` over all groups) when the groups follow one another
    in program order, else `GroupCapture` (one pass up to each group; also for a single group).

    >>> import jax.numpy as jnp
    >>> params = {"a": jnp.eye(2), "b": 2 * jnp.eye(2)}
    >>> fn = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
    >>> with sequential_capture(fn, params, [["a"], ["b"]], [jnp.ones((3, 2))]) as capture:
    ...     first = capture(0, params)
    ...     second = capture(1, {"a": jnp.zeros((2, 2)), "b": params["b"]})  # "a" compressed to 0
    >>> type(capture).__name__, first["a"].hessian.tolist(), second["b"].hessian.tolist()
    ('SegmentedCapture', [[3.0, 3.0], [3.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]])
    """
    kwargs = dict(params_argnum=params_argnum, hessian=hessian, row_mask=row_mask, compile_ahead=compile_ahead)
    if len(groups) == 1:  # one program: nothing to cut, nothing to compile ahead
        return GroupCapture(fn, params, groups, batches, **dict(kwargs, compile_ahead=False))
    try:
        return SegmentedCapture(fn, params, groups, batches, **kwargs)
    except _NotSegmentable:
        return GroupCapture(fn, params, groups, batches, **kwargs)


def sequential_groups(fn: Callable, params: Any, sample_batch: Any, select: Any, *, params_argnum: int = 0) -> list[tuple[str, ...]]:
    """The selected leaves in program order, grouped by the activation they multiply.

    Leaves that read the same activation (attention's query / key / value) form one group; a
    leaf used at several sites belongs to the group of its first one. Tracing only (nothing
    runs).

    >>> import jax.numpy as jnp
    >>> params = {"q": jnp.ones((4, 4)), "k": jnp.ones((4, 4)), "o": jnp.ones((4, 4))}
    >>> fn = lambda p, x: (x @ p["q"] * (x @ p["k"])) @ p["o"]
    >>> sequential_groups(fn, params, jnp.ones((2, 4)), lambda path: True)
    [('q', 'k'), ('o',)]
    """
    shapes = _float_paths(params)
    predicate = make_selector(select)
    order: list[tuple[Any, list[str]]] = []
    placed: set[str] = set()

    def run(params, batch):
        def hook(site, x, weight):
            if site.path not in placed:
                placed.add(site.path)
                for activation, paths in order:
                    if activation is x:
                        paths.append(site.path)
                        break
                else:
                    order.append((x, [site.path]))
            return x

        args = _call(fn, params, batch, params_argnum)
        return call_with_dot_hook(fn, args, None, hook, select=lambda p: p in shapes and predicate(p), params_argnum=params_argnum)

    jax.eval_shape(run, params, sample_batch)
    return [tuple(paths) for _, paths in order]
