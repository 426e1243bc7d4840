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
a method can compress group by group, re-capturing each group's statistics with the
already-compressed predecessors in place (``capture_statistics(..., select=group)``). Only the
statistics are returned from the jitted capture, so XLA drops the part of the network after the
group's sites.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcompress.execute.hooks import DotSite, call_with_dot_hook
from jaxcompress.execute.trace import TraceCache
from jaxcompress.rules import path_to_str

__all__ = [
    "LayerStatistics",
    "MatrixView",
    "matrix_view",
    "to_matrix",
    "from_matrix",
    "activation_rows",
    "capture_statistics",
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


class _Capture:
    """The jitted per-batch reduction for one selection (kept to reuse its compilation)."""

    def __init__(self, fn, params, select, params_argnum, with_hessian, row_mask=None, cache=None):
        self.shapes = _float_paths(params)
        self.select = lambda path: path in self.shapes and select(path)
        self.params_argnum = params_argnum
        self.with_hessian = with_hessian
        self.sites: dict[str, list[tuple[DotSite, MatrixView]]] = {}
        self.cache = TraceCache() if cache is None else cache
        self.fn = fn
        self.row_mask = row_mask
        self.batch_fn = jax.jit(self._batch)

    def __call__(self, params, batch):
        mask = None if self.row_mask is None else jnp.asarray(self.row_mask(batch))
        return self.batch_fn(params, batch, mask)

    def _batch(self, params, batch, mask):
        recorded: dict[str, list] = {}
        sites: dict[str, list] = {}
        computed: list = []  # (activation, site signature, statistics): q / k / v share one

        def hook(site, x, weight):
            view = matrix_view(site, self.shapes[site.path])
            known = sites.setdefault(site.path, [])
            if known and (known[0][1].d_in, known[0][1].kind) != (view.d_in, view.kind):
                raise ValueError(
                    f"{site.path}: the weight feeds contractions with different matrix views "
                    f"({known[0][1].kind} d_in={known[0][1].d_in} and {view.kind} d_in={view.d_in}); tied "
                    f"weights must share their input dimension to pool statistics"
                )
            known.append((site, view))
            signature = (site.primitive, site.activation_contracting_axes, repr(site.params) if view.kind == "conv" else "")
            for activation, known_signature, statistics in computed:
                if activation is x and known_signature == signature:
                    break
            else:
                rows = activation_rows(site, x, view)
                count = rows.shape[0]
                if mask is not None:
                    rows, count = _masked_rows(site, x, rows, mask)
                statistics = _row_statistics(rows, self.with_hessian) + (count,)
                computed.append((x, signature, statistics))
            recorded.setdefault(site.path, []).append(statistics)
            return x

        args = _call(self.fn, params, batch, self.params_argnum)
        call_with_dot_hook(self.fn, args, None, hook, select=self.select, params_argnum=self.params_argnum, cache=self.cache)
        self.sites = sites
        out = {}
        for path, uses in recorded.items():
            hessian = None if not self.with_hessian else sum(u[0] for u in uses)
            out[path] = (
                hessian,
                sum(u[1] for u in uses),
                sum(u[2] for u in uses),
                jnp.max(jnp.stack([u[3] for u in uses]), axis=0),
                jnp.asarray(sum(u[4] for u in uses), jnp.int32),
            )
        return out


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
      trace_cache: a `jaxcompress.execute.trace.TraceCache` shared by repeated captures of the
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
    capture = _Capture(fn, params, make_selector(select), params_argnum, hessian, row_mask, trace_cache)
    totals: dict[str, list] = {}
    seen = 0
    for batch in batches:
        seen += 1
        result = jax.device_get(capture(params, batch))
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
    if seen == 0:
        raise ValueError("capture_statistics needs at least one batch")
    out = {}
    for path in capture.sites:  # program order (the jitted result's dict is key-sorted)
        gram, sq, abs_sum, absmax, rows = totals[path]
        site, view = capture.sites[path][0]
        out[path] = LayerStatistics(gram, sq, abs_sum, absmax, int(rows), site, view, len(capture.sites[path]))
    return out


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
