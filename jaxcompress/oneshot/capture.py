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

The canonical matrix view of a weight at its site (`to_matrix` / `from_matrix`: ``W`` of shape
``(d_out, d_in)``, the layer computing ``rows @ W.T``) is defined in `jaxcompress.oneshot.matrix`.

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

from typing import Any, Callable, Iterable, Sequence

import jax

from jaxcompress._program import TraceCache
from jaxcompress.execute.hooks import (
    DotSite,
    call_with_dot_hook,
)
from jaxcompress.oneshot.matrix import (
    MatrixView,
    activation_rows,
    from_matrix,
    matrix_view,
    to_matrix,
)
from jaxcompress.oneshot.placement import like_leaf, place_like
from jaxcompress.oneshot.programs import _BatchCapture, _Programs
from jaxcompress.oneshot.segments import SegmentedCapture, _NotSegmentable
from jaxcompress.oneshot.selection import _call, _float_paths, batch_args, make_selector
from jaxcompress.oneshot.statistics import (
    LayerStatistics,
    _accumulate,
    _DenseRows,
    _Recorder,
    _statistics,
)

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

    def _batch(self, params, batch, mask, dense_params=None):
        dense = None
        if dense_params is not None:  # the dense model's rows of the same sites first (cross terms)
            dense = _DenseRows(self.shapes, mask)
            call_with_dot_hook(self.fn, _call(self.fn, dense_params, batch, self.params_argnum), None, dense.hook,
                               select=self.select, params_argnum=self.params_argnum, cache=self.cache)
        recorder = _Recorder(self.shapes, self.with_hessian, mask, dense)
        args = _call(self.fn, params, batch, self.params_argnum)
        _, observations = call_with_dot_hook(
            self.fn, args, None, recorder.hook, select=self.select, params_argnum=self.params_argnum, cache=self.cache, observations=True
        )
        self.sites = recorder.sites
        return recorder.results(observations)


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
      dense_params: the DENSE params (same tree): each group's statistics then also hold
        ``cross = sum_rows x x_d^T`` (`LayerStatistics.cross`), ``x_d`` the input the dense
        model gives the same site on the same row (the dense function runs alongside).
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
        dense_params: Any = None,
    ):
        self._init_batches(batches, row_mask)
        cache = TraceCache(size=max(32, 4 * len(self.first))) if trace_cache is None else trace_cache
        self.captures = [_Capture(fn, params, make_selector(group), params_argnum, hessian, cache) for group in groups]
        self._programs = _Programs(compile_ahead and len(self.captures) > 0)
        self._dense = () if dense_params is None else (dense_params,)
        if compile_ahead:
            for group_index, capture in enumerate(self.captures):
                for signature, index in self.first.items():
                    self._programs.lower((group_index, signature), capture.batch_fn, params, self.batches[index],
                                         self.masks[index], *self._dense)

    def __call__(self, index: int, params: Any) -> dict[str, "LayerStatistics"]:
        """The statistics of group ``index`` with ``params`` (see the class docs)."""
        capture = self.captures[index]
        totals: dict[str, list] = {}
        for batch, mask, signature in zip(self.batches, self.masks, self.signatures):
            result = self._programs.call((index, signature), capture.batch_fn, params, batch, mask, *self._dense)
            _accumulate(totals, jax.device_get(result))
        return _statistics(totals, capture.sites)



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
    dense_params: Any = None,
) -> "SegmentedCapture | GroupCapture":
    """The capture a sequential method should use for ``groups`` (called in order, once each):
    `SegmentedCapture` (one pass of ``fn`` over all groups) when the groups follow one another
    in program order, else `GroupCapture` (one pass up to each group; also for a single group).
    ``dense_params``: also capture the cross terms against the dense model (`GroupCapture`;
    `SegmentedCapture` then carries the dense model's values across the cuts too).

    >>> import jax.numpy as jnp
    >>> params = {"a": jnp.eye(2), "b": 2 * jnp.eye(2)}
    >>> fn = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]
    >>> with sequential_capture(fn, params, [["a"], ["b"]], [jnp.ones((3, 2))]) as capture:
    ...     first = capture(0, params)
    ...     second = capture(1, {"a": jnp.zeros((2, 2)), "b": params["b"]})  # "a" compressed to 0
    >>> type(capture).__name__, first["a"].hessian.tolist(), second["b"].hessian.tolist()
    ('SegmentedCapture', [[3.0, 3.0], [3.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]])
    """
    if len(groups) == 1:  # one program: nothing to cut, nothing to compile ahead
        return GroupCapture(fn, params, groups, batches, params_argnum=params_argnum, hessian=hessian,
                            row_mask=row_mask, compile_ahead=False, dense_params=dense_params)
    try:
        return SegmentedCapture(fn, params, groups, batches, params_argnum=params_argnum, hessian=hessian,
                                row_mask=row_mask, compile_ahead=compile_ahead, dense_params=dense_params)
    except _NotSegmentable:
        return GroupCapture(fn, params, groups, batches, params_argnum=params_argnum, hessian=hessian,
                            row_mask=row_mask, compile_ahead=compile_ahead, dense_params=dense_params)


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
