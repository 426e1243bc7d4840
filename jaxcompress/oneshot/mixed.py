"""Mixed precision: a bit-width per layer under a total-size budget, from calibration data.

For every selected weight and every candidate bit-width ``b`` the weight is quantized exactly as
`jaxcompress.quantize_params` would with the returned rule (same `QuantSpec`), giving

* its size, ``QArray.nbytes`` (packed values + scales; int3 lives in an int4 container so it
  costs as much as int4, and int2 is packed four per byte), and
* its sensitivity: with ``E = W_q - W`` in the matrix view and ``H = X^T X`` of the calibration
  inputs, the output error ``||E X^T||^2 / rows = tr(E H E^T) / rows`` (``sensitivity="output"``), or the Hessian-trace proxy ``tr(H) / (d_in * rows) * ||E||_F^2``
  (``sensitivity="trace"``, HAWQ-style: mean curvature times perturbation size; ignores the
  correlation between inputs), or the layer's relative output error
  ``tr(E H E^T) / tr(W H W^T)`` (``sensitivity="relative"``: a noise-to-signal ratio, comparable
  between layers whose outputs live on different scales), or
* ``sensitivity="model"``: the squared error of ``fn``'s OUTPUTS on the calibration batches when
  only this weight is quantized (one forward pass per weight and candidate; the local measures
  above cost none). In a transformer the local errors are in different units (a query error goes
  through a softmax, an attention-output error straight into the residual stream); measuring at
  the output puts every layer on the same scale.
* ``sensitivity="scaled"`` (the default): the local ``tr(E H E^T)`` of every candidate, put in the
  units of ``"model"`` by ONE end-to-end measurement per weight: each layer's local errors are
  multiplied by its ``model error / local error`` at one probe candidate (the one whose uniform
  use comes closest to the budget from below, `probe_candidate`). It costs one forward pass over
  the calibration batches per weight instead of one per weight and candidate, is exact at the
  probe, and keeps the local measure's ordering of a layer's candidates.

The choice minimises the SUM of the layers' errors subject to the sum of their sizes being at most
the budget: a multiple-choice knapsack, solved by dynamic programming over the byte budget. Sizes
are divided by their greatest common divisor first; if the budget still has more than
``max_states`` units, sizes are rounded UP to a coarser unit (so the answer always fits; it is
then near-optimal, and ``report.exact`` says so) and every uniform assignment that fits is checked
too, so the result is never worse than the best uniform choice within the budget.

Measured (``benchmarks/mixed_precision.py --validate``, session 8; default candidates, symmetric
absmax codes, float32 scales; budget = the bytes of uniform int4 g128). Validation: each
sensitivity's rank agreement with the END-TO-END cost of every (kernel, candidate) pair, the
held-out loss increase with only that kernel quantized (`spearman` over all pairs / averaged
across kernels within each candidate, the comparison the knapsack trades on):

* all-MiniLM-L6-v2 (36 kernels, 1 - mean cosine on 256 held-out sentences; uniform 0.9334):
  ``"scaled"`` 0.998 / 0.990 (36 passes, 44 s; its allocation 0.9423), ``"model"`` 1.000 / 0.998
  (180 passes, 167 s; 0.9412), ``"output"`` 0.543 / 0.022 (0.9196, worse than uniform),
  ``"relative"`` 0.523 / 0.049 (0.9257), ``"trace"`` 0.547 / 0.030 (0.9182): the local proxies
  do not rank the kernels against each other (in a transformer their errors are in different
  units); one end-to-end probe per kernel puts them on one scale.
* the tiny decoder LM of ``examples/tiny_lm.py`` (28 kernels, held-out NLL; fp32 perplexity
  49.351, uniform 49.464): ``"scaled"`` 0.244 / 0.168 (28 passes, 21-32 s; 49.406), ``"model"``
  0.248 / 0.158 (140 passes, 87-130 s; 49.456), ``"output"`` 0.104 / -0.090 (49.430),
  ``"relative"`` 0.172 / 0.084 (49.436), ``"trace"`` 0.111 / -0.066 (49.429). One int4 kernel
  moves this model's held-out NLL by about 1e-4 (50 of 140 pairs measured negative): the measure
  agrees with itself between the even and the odd held-out rows only at Spearman 0.590 (0.642
  across kernels), so this model cannot rank the proxies finely.

So ``"scaled"`` ranks with the ~5x dearer ``"model"`` and far above the free local proxies, and
its allocation is the best of the five on both models (on MiniLM only it and ``"model"`` beat uniform).

The result is a list of `jaxcompress.QuantRule` (one per weight, ``pattern=re.escape(path)``)
to pass to `quantize_params` (or a one-shot quantizer such as GPTQ) and a `MixedPrecisionReport`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.oneshot.capture import capture_statistics, make_selector, to_matrix
from jaxcompress.oneshot.knapsack import choose_bits
from jaxcompress.oneshot.ranks import average_ranks, kendall_tau, spearman
from jaxcompress.quant.arrays import quantize
from jaxcompress.quant.spec import QuantSpec
from jaxcompress.rules import QuantRule, path_to_keystr, path_to_str

__all__ = ["candidate_label", "LayerChoice", "MixedPrecisionReport", "choose_bits", "layer_sensitivity", "probe_candidate",
           "default_candidates", "mixed_precision", "average_ranks", "spearman", "kendall_tau"]

SENSITIVITIES = ("scaled", "output", "relative", "trace", "model")
Sensitivity = Literal["scaled", "output", "relative", "trace", "model"]


def candidate_label(bits: int, group_size: int | None) -> str:
    """``"int4 g128"`` or ``"int8 per-channel"``."""
    return f"int{bits} " + (f"g{group_size}" if group_size else "per-channel")


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """One weight: its candidates' errors and sizes and the chosen one.

    Attributes:
      path: the leaf's path.
      shape: the leaf's shape.
      size: number of elements.
      candidates: ``(bits, group_size)`` of each candidate (in the order of ``errors`` /
        ``nbytes``).
      errors: the sensitivity of each candidate (see the module docs; ``inf`` for a candidate
        whose group size does not fit this leaf).
      nbytes: ``QArray.nbytes`` of each candidate.
      chosen: the index of the chosen candidate.
    """

    path: str
    shape: tuple[int, ...]
    size: int
    candidates: tuple[tuple[int, int | None], ...]
    errors: tuple[float, ...]
    nbytes: tuple[int, ...]
    chosen: int

    @property
    def chosen_bits(self) -> int:
        return self.candidates[self.chosen][0]

    @property
    def chosen_group_size(self) -> int | None:
        return self.candidates[self.chosen][1]

    @property
    def chosen_bytes(self) -> int:
        return self.nbytes[self.chosen]

    @property
    def chosen_error(self) -> float:
        return self.errors[self.chosen]


@dataclasses.dataclass(frozen=True)
class MixedPrecisionReport:
    """What `mixed_precision` decided and what it costs.

    Attributes:
      layers: a `LayerChoice` per weight, in program order.
      budget_bytes: the size budget of the selected weights.
      total_bytes: their total ``QArray.nbytes`` with the chosen bit-widths (<= ``budget_bytes``).
      total_error: the sum of the chosen candidates' errors.
      uniform: per candidate (keyed ``"int4 g128"``, see `candidate_label`), ``{"bytes",
        "error"}`` of using it for every layer (``inf`` error where it does not fit a layer).
      exact: whether the knapsack was solved exactly (see the module docs).
      sensitivity: which error measure (see the module docs).
    """

    layers: tuple[LayerChoice, ...]
    budget_bytes: int
    total_bytes: int
    total_error: float
    uniform: dict
    exact: bool
    sensitivity: str

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per weight, scales included."""
        return 8.0 * self.total_bytes / max(1, sum(layer.size for layer in self.layers))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["bits_per_weight"] = self.bits_per_weight
        return out

    def table(self) -> str:
        """A plain-text table: one line per layer, then the totals and the uniform references."""
        lines = [f"{'path':<56} {'choice':>17} {'bytes':>9} {'error':>11}"]
        for layer in self.layers:
            label = candidate_label(layer.chosen_bits, layer.chosen_group_size)
            lines.append(f"{layer.path:<56} {label:>17} {layer.chosen_bytes:>9} {layer.chosen_error:>11.4g}")
        lines.append(f"{'total (budget ' + str(self.budget_bytes) + ')':<56} {'':>17} {self.total_bytes:>9} {self.total_error:>11.4g}")
        for label, entry in self.uniform.items():
            lines.append(f"{'uniform ' + label:<56} {'':>17} {entry['bytes']:>9} {entry['error']:>11.4g}")
        return "\n".join(lines)


def layer_sensitivity(
    delta: Any, hessian: Any, count: int, sensitivity: str = "output", weight: Any = None
) -> float:
    """The error of a matrix-view change ``delta`` ``(d_out, d_in)`` given ``hessian = X^T X`` over
    ``count`` rows: ``tr(E H E^T) / count`` (``"output"``), ``tr(H) / (d_in count) ||E||^2``
    (``"trace"``) or ``tr(E H E^T) / tr(W H W^T)`` (``"relative"``, needs the matrix-view
    ``weight``). Float64.

    >>> h = np.array([[2.0, 0.0], [0.0, 4.0]])
    >>> layer_sensitivity(np.array([[1.0, 1.0]]), h, 2), layer_sensitivity(np.array([[1.0, 1.0]]), h, 2, "trace")
    (3.0, 3.0)
    """
    e = np.asarray(delta, np.float64)
    h = np.asarray(hessian, np.float64)
    rows = max(int(count), 1)
    if sensitivity == "output":
        return float(np.sum((e @ h) * e) / rows)
    if sensitivity == "relative":
        if weight is None:
            raise ValueError("sensitivity='relative' needs the matrix-view weight")
        w = np.asarray(weight, np.float64)
        signal = float(np.sum((w @ h) * w))
        return float(np.sum((e @ h) * e) / max(signal, np.finfo(np.float64).tiny))
    if sensitivity == "trace":
        return float(np.trace(h) / (h.shape[0] * rows) * np.sum(e * e))
    raise ValueError(f"sensitivity must be one of {SENSITIVITIES[:3]}, got {sensitivity!r}")


def _model_error(fn: Callable, params_argnum: int) -> tuple[Callable, Callable]:
    """``(params, reference outputs, batch) -> sum of squared output differences`` (jitted)."""
    from jaxcompress.oneshot.capture import batch_args

    def error(params, reference, batch):
        rest = batch_args(batch)
        outputs = fn(*(rest[:params_argnum] + (params,) + rest[params_argnum:]))
        pairs = zip(jax.tree.leaves(outputs), jax.tree.leaves(reference))
        return sum(jnp.sum(jnp.square(o.astype(jnp.float32) - r.astype(jnp.float32))) for o, r in pairs)

    def reference(params, batch):
        rest = batch_args(batch)
        return fn(*(rest[:params_argnum] + (params,) + rest[params_argnum:]))

    return jax.jit(error), jax.jit(reference)


def probe_candidate(errors: np.ndarray, nbytes: np.ndarray, budget: int) -> int:
    """The candidate ``"scaled"`` measures end to end: the one whose uniform use comes closest to
    the budget from below (the knapsack's answer lies around it), else the smallest.

    >>> probe_candidate(np.array([[1.0, 0.1], [2.0, 0.2]]), np.array([[10, 20], [10, 20]]), 35)
    0
    """
    totals = np.where(np.isfinite(errors), nbytes, 0).sum(axis=0)
    fits = np.flatnonzero(totals <= budget)
    return int(fits[np.argmax(totals[fits])]) if fits.size else int(np.argmin(totals))


def _scale_by_probes(errors: np.ndarray, nbytes: np.ndarray, budget: int, measure: Callable) -> np.ndarray:
    """``"scaled"``: each layer's local errors times (its model error / its local error) at the
    probe candidate, ``measure(layer, candidate)``: one pass over the calibration batches per layer."""
    column = probe_candidate(errors, nbytes, budget)
    factors = np.full(errors.shape[0], np.nan)
    for row in range(errors.shape[0]):
        finite = np.flatnonzero(np.isfinite(errors[row]))
        c = column if np.isfinite(errors[row, column]) else int(finite[np.argmin(np.abs(nbytes[row, finite] - nbytes[row, column]))])
        if errors[row, c] > 0:
            factors[row] = measure(row, c) / errors[row, c]
    known = factors[np.isfinite(factors)]
    fallback = float(np.median(known)) if known.size else 1.0  # a layer its probe left exact
    factors = np.where(np.isfinite(factors), factors, fallback)
    return errors * factors[:, None]


def default_candidates(group_size: int | None) -> tuple[tuple[int, int | None], ...]:
    """`mixed_precision`'s default candidates: where to spend scale bytes at 4 bits, and int8.

    >>> default_candidates(128)
    ((4, None), (4, 128), (4, 64), (4, 32), (8, None))
    """
    if group_size is None:
        return ((4, None), (8, None))
    groups = sorted({g for g in (group_size, group_size // 2, group_size // 4) if g >= 1}, reverse=True)
    return ((4, None),) + tuple((4, g) for g in groups) + ((8, None),)


def _candidates(candidates: Sequence[Any], group_size: int | None) -> tuple[tuple[int, int | None], ...]:
    out = []
    for item in candidates:
        bits, group = (item, group_size) if isinstance(item, (int, np.integer)) else tuple(item)
        out.append((int(bits), None if group is None else int(group)))
    if not out:
        raise ValueError("candidates must name at least one bit-width")
    return tuple(sorted(set(out), key=lambda c: (c[0], -(c[1] or 1 << 30))))


def mixed_precision(
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    select: Any,
    *,
    candidates: Sequence[int | tuple[int, int | None]] | None = None,
    group_size: int | None = 128,
    budget_bytes: int | None = None,
    budget_bits_per_weight: float | None = None,
    channel_axes: tuple[int, ...] = (-1,),
    symmetric: bool | None = True,
    calibration: Any = "absmax",
    scale_dtype: str = "float32",
    sensitivity: Sensitivity = "scaled",
    row_mask: Callable[[Any], Any] | None = None,
    params_argnum: int = 0,
    max_states: int = 200_000,
) -> tuple[list[QuantRule], MixedPrecisionReport]:
    """Choose a bit-width per weight under a size budget; returns ``(rules, report)``.

    Args:
      fn: the unmodified function, called as ``fn(params, *batch)`` (tuple batches) or
        ``fn(params, batch)``.
      params: float params.
      batches: calibration batches.
      select: which weights (a callable on paths, a regex, or rules; see
        `jaxcompress.oneshot.capture.make_selector`). Each must meet a dot / conv in ``fn``.
      candidates: what to choose from: bit-widths (with ``group_size``) or ``(bits, group_size)``
        pairs (``None``: per channel only), e.g. ``((4, None), (4, 128), (4, 32), (8, 128))``:
        the group size is part of the size / accuracy trade-off. Default: `default_candidates`
        (int4 per channel and at ``group_size``, ``/2``, ``/4``; int8 per channel): measured
        better than uniform int4 at its size on MiniLM and the tiny LM, where int2/3/4/8 at one
        group size was not (int2 ruins the layers it is given). NOTE: 3-bit values are stored
        in int4 containers, so int3 costs what int4 costs and is never chosen over it.
      group_size, channel_axes, symmetric, calibration, scale_dtype: the rest of the
        `QuantSpec` every returned rule uses (defaults: int-b per output channel in groups of 128
        along the input axis of a Flax kernel, absmax, symmetric codes: what the measurements in the
        module docs used; ``symmetric=None`` takes `QuantSpec`'s by-bits default per candidate). A candidate whose group size does not
        divide a leaf's group axis is not offered for that leaf.
      budget_bytes: the total ``QArray.nbytes`` allowed for the selected weights; or
      budget_bits_per_weight: the same as average stored bits per weight, scales included
        (``budget_bytes = floor(bits * elements / 8)``); e.g. 4 + 32/128 = 4.25 is the size of
        uniform int4 g128 with float32 scales.
      sensitivity: ``"scaled"`` (``tr(E H E^T)`` scaled per weight to the error of ``fn``'s
        outputs measured at one probe candidate: one forward pass per weight; its Spearman rank
        correlation with the held-out end-to-end cost is 0.998 on MiniLM, where the local
        proxies reach 0.52-0.55, see the module docs), ``"output"``
        (``tr(E H E^T)``), ``"relative"`` (divided by
        ``tr(W H W^T)``), ``"trace"`` (Hessian-trace proxy) or ``"model"`` (error of ``fn``'s
        outputs with only that weight quantized); see the module docs.
      row_mask: ``row_mask(batch) -> array``: calibration rows where it is 0 (e.g. padding
        tokens) are left out of the input statistics (see `capture_statistics`); ``"model"`` / ``"scaled"``
        compares ``fn``'s whole outputs, so give it an ``fn`` whose outputs ignore padding (e.g.
        a masked mean-pooled embedding).
      params_argnum: where params go among ``fn``'s positional arguments.
      max_states: the knapsack's largest table (see the module docs).

    Returns:
      ``rules``: a `QuantRule` per weight (full-path ``re.escape`` patterns, program order), so
      ``quantize_params(params, rules)`` stores exactly ``report.total_bytes`` for these leaves;
      ``report``: a `MixedPrecisionReport` (per-layer errors, sizes and choices; uniform
      references).

    >>> import jax, jax.numpy as jnp
    >>> params = {"a": jax.random.normal(jax.random.key(0), (8, 8)), "b": jax.random.normal(jax.random.key(1), (8, 8))}
    >>> fn = lambda p, x: (x * 10.0) @ p["a"] + x @ p["b"]          # "a" sees 10x larger inputs
    >>> x = jax.random.normal(jax.random.key(2), (32, 8))
    >>> rules, report = mixed_precision(fn, params, [x], ".*", candidates=(2, 8), group_size=None,
    ...                                 budget_bits_per_weight=5.0 + 32 / 8)
    >>> [(r.pattern, r.bits) for r in rules]
    [('a', 8), ('b', 2)]
    >>> report.total_bytes <= report.budget_bytes
    True
    """
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
    if (budget_bytes is None) == (budget_bits_per_weight is None):
        raise ValueError("pass exactly one of budget_bytes or budget_bits_per_weight")
    candidates = _candidates(default_candidates(group_size) if candidates is None else candidates, group_size)
    options = dict(channel_axes=tuple(channel_axes), symmetric=symmetric, calibration=calibration, scale_dtype=scale_dtype)
    specs = [QuantSpec(bits=b, group_size=g, **options) for b, g in candidates]  # validates the options once
    batches = list(batches)
    if not batches:
        raise ValueError("mixed_precision needs at least one calibration batch")
    params = jax.device_put(params)  # NumPy leaves would be copied to the device at every call
    stats = capture_statistics(fn, params, batches, select, params_argnum=params_argnum, row_mask=row_mask,
                               hessian=sensitivity in ("scaled", "output", "relative"))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    predicate = make_selector(select)
    leaves, names = {}, {}
    for key_path, leaf in flat:
        path_str = path_to_str(key_path)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating) and predicate(path_str):
            leaves[path_str], names[path_str] = leaf, path_to_keystr(key_path)
    missing = [p for p in leaves if p not in stats]
    if missing:
        raise ValueError(
            f"{names[missing[0]]}: selected for mixed precision but it never meets a dot_general / "
            f"conv_general_dilated in fn on the calibration batches (no input statistics to rate it)"
        )
    if not stats:
        raise ValueError("select picked no float weight that meets a dot / conv in fn")

    probe: Callable[[str, Any], float] | None = None
    if sensitivity in ("model", "scaled"):
        model_error, model_reference = _model_error(fn, params_argnum)
        references = [model_reference(params, batch) for batch in batches]
        flat_paths = [path_to_str(key_path) for key_path, _ in flat]
        treedef = jax.tree_util.tree_structure(params)

        def probe(path: str, q: Any) -> float:
            """``fn``'s output error with only ``path`` replaced by ``q`` (one pass over the batches)."""
            position = flat_paths.index(path)
            replaced = [q.dequantize() if i == position else leaf_i for i, (_, leaf_i) in enumerate(flat)]
            trial = jax.tree_util.tree_unflatten(treedef, replaced)
            return float(sum(model_error(trial, ref, b) for ref, b in zip(references, batches)))

    errors, sizes, paths = [], [], list(stats)
    for path in paths:
        leaf, leaf_stats, name = jnp.asarray(leaves[path]), stats[path], names[path]
        matrix = to_matrix(leaf, leaf_stats)
        hessian = leaf_stats.hessian
        if hessian is None:  # "trace" only needs the diagonal
            hessian = np.diag(np.asarray(leaf_stats.sq_norms))
        row_errors, row_sizes, failures = [], [], []
        for spec in specs:
            try:
                q = quantize(leaf, spec, name=name)
            except ValueError as err:  # e.g. the group size does not divide this leaf
                failures.append(err)
                row_errors.append(np.inf)
                row_sizes.append(-1)
                continue
            if probe is not None and sensitivity == "model":
                row_errors.append(probe(path, q))
            else:
                delta = np.asarray(to_matrix(q.dequantize(jnp.float32), leaf_stats)) - np.asarray(matrix, np.float64)
                local = "output" if sensitivity == "scaled" else sensitivity
                row_errors.append(layer_sensitivity(delta, hessian, leaf_stats.count, local, matrix))
            row_sizes.append(int(q.nbytes))
        if len(failures) == len(specs):
            raise failures[0]
        largest = max(row_sizes)
        row_sizes = [largest if size < 0 else size for size in row_sizes]  # never chosen: inf error
        errors.append(row_errors)
        sizes.append(row_sizes)
    errors_arr, sizes_arr = np.asarray(errors), np.asarray(sizes, np.int64)
    elements = sum(int(np.prod(leaves[p].shape)) for p in paths)
    if budget_bytes is None:
        budget_bytes = int(math.floor(float(budget_bits_per_weight or 0.0) * elements / 8))
    if probe is not None and sensitivity == "scaled":
        measure = lambda row, c: probe(paths[row], quantize(jnp.asarray(leaves[paths[row]]), specs[c], name=names[paths[row]]))
        errors_arr = _scale_by_probes(errors_arr, sizes_arr, int(budget_bytes), measure)
    chosen, exact = choose_bits(errors_arr, sizes_arr, int(budget_bytes), max_states=max_states)

    layers, rules = [], []
    for row, path in enumerate(paths):
        choice = int(chosen[row])
        bits, group = candidates[choice]
        layers.append(
            LayerChoice(path, tuple(leaves[path].shape), int(np.prod(leaves[path].shape)), candidates,
                        tuple(float(e) for e in errors_arr[row]), tuple(int(s) for s in sizes_arr[row]), choice)
        )
        rules.append(QuantRule(pattern=re.escape(path), bits=bits, group_size=group, **options))
    uniform = {
        candidate_label(*candidate): {"bytes": int(sizes_arr[:, c].sum()), "error": float(errors_arr[:, c].sum())}
        for c, candidate in enumerate(candidates)
    }
    rows = np.arange(len(paths))
    report = MixedPrecisionReport(
        tuple(layers), int(budget_bytes), int(sizes_arr[rows, chosen].sum()), float(errors_arr[rows, chosen].sum()),
        uniform, bool(exact), sensitivity,
    )
    return rules, report
