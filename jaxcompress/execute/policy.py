"""Per-site execution choice for `jaxcompress.compressed`: integer op or weight-only float op.

A weight quantized with ``activation="dynamic"`` / ``"static"`` asks for an int8 x int8 -> int32
dot or conv. On XLA's CPU backend that is not always the faster program: the integer matmul is
several times float32's speed for large dots whose weight contracts its minor (last) stored axis
(a matrix-vector product against a weight that contracts its major axis is slower than float32,
but still faster than converting the weight every call: store it with
`jaxcompress.execute.layout.store_for_integer_dots`), and slower than float32 for tiny
contractions (an MNIST conv with one input channel contracts 9 values: building its int8
patches costs more than the dot saves) and for grouped convs (an s32 batched dot). Where the
integer conv wins depends on XLA's float convolution for that shape, which a static rule cannot
know: ``"measure"`` times it (``benchmarks/cnn_speed.py``). `ExecutionPolicy` decides per site:

* ``"rule"`` (default): the mode the quantizer stored on the weight, everywhere;
* ``"auto"``: a cost model written from those measurements (`auto_choice`): the integer path
  where it is known to win, the weight-only path (float activation, the weight converted from its
  codes, float op) elsewhere: dots contracting at least `MIN_CONTRACTION` values into at least
  `MIN_OUTPUTS` features; ungrouped convs contracting at least `MIN_CONTRACTION` values that XLA
  runs as its native int8 convolution (channels-last, `jaxcompress.execute.native_conv`: 3-7x
  float32 on 3x3 convs); other ungrouped convs only where their int8 im2col patches are at most
  `MAX_PATCH_EXPANSION` times the input (a 3x3 window needs stride 2; 1x1 convs qualify).
  Depthwise convs run as a window sum either way (`jaxcompress.execute.depthwise`), which is
  faster than XLA's float convolution;
* ``"measure"``: each path timed once per site signature (shapes, dtypes, layout, op
  parameters) on this machine, the fastest one kept; timings are cached on disk
  (`jaxcompress.execute.measure`), so later processes decide without running anything;
* ``"tune"``: whole programs timed on this machine (`jaxcompress.execute.tune`): the site
  choices are searched by compiling and timing the entire program -- six starts (all
  weight-only, all integer, all ``"integer_bf16"`` at dots, all ``"integer_im2col"`` at native
  convs, ``"auto"``, ``"measure"``), then one
  pass trying each other path, one weight at a time, side by side -- because XLA fuses across
  sites and a site that wins alone can lose in the program; the float program (every weight
  dequantized) is timed beside them, and each site's ``reason`` says how the chosen program
  compares with it. Cached on disk per program signature;
* ``"integer"`` / ``"weight_only"`` / ``"integer_bf16"`` / ``"integer_im2col"``: that path
  everywhere it can run.

``"integer_bf16"`` is a third path for dot sites: the integer path's numbers (the same int8
activation and weight codes, the same scales) with the dot run as bfloat16 x bfloat16 -> float32,
bit for bit the integer result while the float32 partial sums stay below 2^24 in magnitude
(always for contractions of at most 1032 values, 1040 with symmetric weights;
`jaxcompress.execute.dot`). XLA's CPU backend keeps a bf16 dot inside a YNNPACK fusion with the float ops around it where an int32 result
leaves it; on CPUs with AVX-512 BF16 and no AMX it is the faster integer path for dots with many
rows. Matrix-vector products of a 2-D weight run the padded s8 dot either way (reported as
``"integer"``). Convs have no such path (XLA:CPU converts a bf16 conv to float32): at a conv site
``"integer_bf16"`` runs the integer conv, and the site's reason says so. ``"tune"`` and
``"measure"`` try it at every dot site that is not a matrix-vector product; ``"auto"``'s cost
model never picks it.

``"integer_im2col"`` is the conv sites' third path: a conv XLA would run as its native s8
convolution (channels-last, `jaxcompress.execute.native_conv`) runs as the s8 dot on int8 im2col
patches instead -- the same int32 sums, so the same result bit for bit. On a CPU where XLA's native
s8 convolution runs on one thread (a 2-core AMD EPYC, Zen 4: process CPU / wall time 1.1) the
patches' dot runs on all cores: the demo CNN's 256x14x14x32 -> 64 stride-2 conv took 3.3 ms on
patches against 5.3 ms native and 6.8 ms weight-only (``"measure"``'s fastest calls,
``benchmarks/cnn_speed.py``). Convs XLA does not run natively (channels-first, small channel
counts), depthwise convs (a window sum) and kernels whose scale does not flatten into the
patches' dot (ragged groups along the output axis) have no third program, and dots run their
integer op under it; the site's reason says so.
``"tune"`` and ``"measure"`` try it where it is a program of its own; ``"auto"`` never picks it.

The cost model was written from measurements on one machine (a 2-core Intel Sapphire Rapids
Xeon with AMX-int8, where int8 convs run 3-7x float32); on a 2-core AMD EPYC (Zen 4, AVX-512
VNNI, no AMX) the same XLA runs a float CNN as one YNNPACK fusion and its int8 convs lose to it,
and ``"auto"`` made an MNIST CNN at batch 256 0.54-0.57x float where ``"tune"`` made it 0.95-1.00x (two runs)
(``benchmarks/cnn_speed.py``). Use ``"tune"`` where speed matters on a machine the cost model
has not seen.

``overrides`` force a path for the weights whose leaf path matches a regex (first full match
wins), whatever the default: ``ExecutionPolicy("auto", overrides={r".*/Conv_0/kernel":
"integer"})``. A weight quantized ``"weight_only"`` has no activation scale and always stays
weight-only. The choices are inspectable: ``compressed(fn, policy=...).sites(*args)`` returns one
`SiteChoice` per dot / conv a quantized weight meets (path, primitive, shapes, chosen path, why).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, cast

__all__ = ["ExecutionPolicy", "SiteChoice", "resolve_policy", "auto_choice", "choose_mode", "site_choice", "PATHS"]

PATHS = ("integer", "weight_only", "integer_bf16", "integer_im2col")
CARRIER = "integer_bf16"  # the dot path whose integer codes travel as bfloat16
PATCHES = "integer_im2col"  # the conv path that runs XLA's s8 dot on int8 patches, not its s8 conv
DEFAULTS = ("rule", "auto", "measure", "tune") + PATHS

# Cost-model thresholds (benchmarks/cnn_speed.py, benchmarks/int8_matmul.py; 2-core Xeon).
MIN_CONTRACTION = 64  # integer dots contracting fewer values lose to float32
MIN_OUTPUTS = 16  # ... and so do dots with fewer output features per row
MIN_ROWS_MAJOR = 8  # a weight contracting its major stored axis needs this many rows
# An ungrouped conv on the im2col dot (one XLA cannot run natively, `runs_natively`): its int8
# patches hold window / prod(strides) values per input value; above
# this the patches cost more than the int8 dot saves. Measured per site ("measure", cnn_speed.py,
# 2-core Sapphire Rapids Xeon, shared): the MNIST CNN's second conv (3x3, stride 1, 32 -> 64, 9x)
# ran 1.25x / 1.25x / 1.55x slower than weight-only at batch 1 / 32 / 256; the demo CNN's stride-2
# conv of the same size (2.25x) 0.92x / 1.09x / 1.10x.
MAX_PATCH_EXPANSION = 4.0


@dataclasses.dataclass(frozen=True)
class SiteChoice:
    """One dot / conv site of a quantized weight and the path `compressed` runs it on.

    Attributes:
      path: the weight's leaf path (``params/Dense_0/kernel``).
      primitive: ``"dot_general"`` or ``"conv_general_dilated"``.
      activation_shape / weight_shape: the operand shapes at the site.
      requested: the weight's own activation mode.
      chosen: ``"integer"``, ``"integer_bf16"``, ``"integer_im2col"``, ``"integer_depthwise"``,
        ``"weight_only"`` or ``"weight_only_depthwise"``.
      reason: why.
    """

    path: str
    primitive: str
    activation_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    requested: str
    chosen: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
    """How `compressed` picks a path per site (see the module docs).

    Attributes:
      default: ``"rule"``, ``"auto"``, ``"measure"``, ``"tune"``, ``"integer"``, ``"weight_only"``,
        ``"integer_bf16"`` or ``"integer_im2col"``.
      overrides: ``{regex: a path of PATHS}`` (``"integer"``, ``"weight_only"``,
        ``"integer_bf16"``, ``"integer_im2col"``) on the leaf paths (first full match).
      cache_dir: where ``"measure"`` and ``"tune"`` keep their timings (default: see
        `jaxcompress.execute.measure`).
      rounds: timed calls per path when ``"measure"`` times a site; the least number of calls
        per program when ``"tune"`` times programs (short programs get more, see
        `jaxcompress.execute.tune`).

    >>> policy = ExecutionPolicy("auto", overrides={r".*/head/kernel": "weight_only"})
    >>> policy.forced("params/head/kernel"), policy.forced("params/body/kernel")
    ('weight_only', None)
    """

    default: str = "rule"
    overrides: Mapping[str, str] | tuple = ()
    cache_dir: str | None = None
    rounds: int = 7

    def __post_init__(self):
        if self.default not in DEFAULTS:
            raise ValueError(f"ExecutionPolicy: default must be one of {DEFAULTS}, got {self.default!r}")
        items = tuple(self.overrides.items()) if isinstance(self.overrides, Mapping) else tuple(self.overrides)
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"ExecutionPolicy: overrides must map a regex to a path, got {item!r}")
            pattern, path = item
            if path not in PATHS:
                raise ValueError(f"ExecutionPolicy: override {pattern!r} -> {path!r}: the path must be one of {PATHS}")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"ExecutionPolicy: override pattern {pattern!r} is not a regex: {error}") from None
        object.__setattr__(self, "overrides", items)
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"ExecutionPolicy: rounds must be a positive integer, got {self.rounds!r}")

    def forced(self, path: str) -> str | None:
        """The path an override forces for the leaf ``path`` (``None``: no override matches)."""
        pairs = cast("tuple[tuple[str, str], ...]", self.overrides)  # a tuple of pairs after __post_init__
        for pattern, chosen in pairs:
            if re.fullmatch(pattern, path):
                return chosen
        return None


def site_paths(primitive: str, third: bool = True) -> tuple[str, ...]:
    """The distinct programs a site of ``primitive`` can run: integer, weight-only and, where
    ``third`` (`has_third_path`), `CARRIER` at a dot or `PATCHES` at a conv."""
    if not third:
        return PATHS[:2]
    return PATHS[:2] + ((CARRIER,) if primitive == "dot_general" else (PATCHES,))


def has_third_path(primitive: str, x_shape, view, params: dict, weight_side: str = "rhs") -> bool:
    """Whether a site's third path is a program of its own: at a dot, `CARRIER` unless the dot
    is a matrix-vector product (the padded s8 dot either way); at a conv, `PATCHES` where the
    integer conv would otherwise be XLA's native s8 convolution and its kernel flattens into
    the patches' dot (elsewhere it is im2col already, or a depthwise window sum)."""
    if primitive == "dot_general":
        return not _matrix_vector(tuple(x_shape), view, params["dimension_numbers"], weight_side)
    return _native_conv(tuple(x_shape), view, params)


def _native_conv(x_shape, view, params: dict) -> bool:
    from jaxcompress.execute.conv import patches_kernel
    from jaxcompress.execute.depthwise import is_depthwise
    from jaxcompress.execute.native_conv import runs_natively

    if is_depthwise(view.shape, params) or not runs_natively(x_shape, view, params):
        return False
    return patches_kernel(view, params)[0] is not None


def resolve_policy(policy: Any) -> ExecutionPolicy:
    """An `ExecutionPolicy` from ``policy`` (a policy, or a default name)."""
    if isinstance(policy, ExecutionPolicy):
        return policy
    if isinstance(policy, str):
        return ExecutionPolicy(policy)
    raise TypeError(f"compressed: policy must be one of {DEFAULTS} or an ExecutionPolicy, got {policy!r}")


def _dot_sizes(x_shape, view, dimension_numbers, weight_side):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if weight_side == "lhs":
        lhs_contract, rhs_contract, lhs_batch, rhs_batch = rhs_contract, lhs_contract, rhs_batch, lhs_batch
    shape = view.shape
    contraction = math.prod(shape[a] for a in rhs_contract)
    outputs = math.prod(d for a, d in enumerate(shape) if a not in rhs_contract and a not in rhs_batch)
    rows = math.prod(d for a, d in enumerate(x_shape) if a not in lhs_contract and a not in lhs_batch)
    # the weight's stored axes (a pending transpose maps logical axis a to stored permutation[a])
    stored = [view.permutation[a] if view.permutation is not None else a for a in rhs_contract]
    minor = sorted(stored) == list(range(view.ndim - len(stored), view.ndim))
    return contraction, outputs, rows, minor


def _matrix_vector(x_shape, view, dimension_numbers, weight_side) -> bool:
    """Whether the integer dot of this site is the padded s8 matrix-vector dot
    (`jaxcompress.execute.dot.few_rows`, judged on the weight as `integer_dot` folds it)."""
    from jaxcompress.execute.dot import few_rows

    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if weight_side == "lhs":
        lhs_contract, rhs_contract, lhs_batch, rhs_batch = rhs_contract, lhs_contract, rhs_batch, lhs_batch
    stored, stored_contract, _, _ = view.fold(tuple(map(int, rhs_contract)), tuple(map(int, rhs_batch)))
    return few_rows(x_shape, stored, tuple(map(int, lhs_contract)), stored_contract, tuple(lhs_batch))


def auto_choice(primitive: str, x_shape, view, params: dict, weight_side: str = "rhs") -> tuple[str, str]:
    """The cost model: ``(path, reason)`` for a site (see the module docs)."""
    if primitive == "conv_general_dilated":
        from jaxcompress.execute.depthwise import is_depthwise

        if is_depthwise(view.shape, params):
            return "integer", "depthwise: int8 window sum, faster than XLA's float convolution"
        _, rhs_spec, _ = params["dimension_numbers"]
        groups = int(params.get("feature_group_count", 1))
        if groups > 1:
            return "weight_only", "grouped conv: XLA runs the grouped int8 im2col as an s32 batched dot"
        contraction = math.prod(view.shape[a] for a in rhs_spec[1:])
        if contraction < MIN_CONTRACTION:
            return "weight_only", (
                f"contracts {contraction} < {MIN_CONTRACTION} values (input channels x window): building int8 "
                f"patches costs more than the int8 dot saves"
            )
        from jaxcompress.execute.native_conv import runs_natively

        if runs_natively(x_shape, view, params):
            return "integer", f"XLA's native int8 convolution, contracting {contraction} values"
        window = math.prod(view.shape[a] for a in rhs_spec[2:])
        strides = math.prod(int(s) for s in params.get("window_strides", ()) or (1,))
        expansion = window / strides
        if expansion > MAX_PATCH_EXPANSION:
            return "weight_only", (
                f"int8 im2col patches hold {expansion:g}x the input's values (window {window}, strides {strides}) "
                f"> {MAX_PATCH_EXPANSION:g}x: building them costs more than the int8 dot saves"
            )
        return "integer", f"int8 im2col dot contracting {contraction} values ({expansion:g}x patches)"
    contraction, outputs, rows, minor = _dot_sizes(x_shape, view, params["dimension_numbers"], weight_side)
    if contraction < MIN_CONTRACTION:
        return "weight_only", f"contracts {contraction} < {MIN_CONTRACTION} values: the int8 dot loses to float32"
    if outputs < MIN_OUTPUTS:
        return "weight_only", f"{outputs} < {MIN_OUTPUTS} output features: the int8 dot loses to float32"
    if not minor and rows < MIN_ROWS_MAJOR:
        # XLA's int8 matrix-vector dot against a major-axis contraction is slower than float32,
        # but the weight-only path (the codes converted every call) is slower still.
        return "integer", (
            f"{rows} row(s) against a weight that contracts its major stored axis: the padded int8 dot beats "
            f"weight-only; jaxcompress.execute.layout.store_for_integer_dots makes it several times faster"
        )
    layout = "minor" if minor else "major"
    return "integer", f"{rows}x{contraction}x{outputs} int8 dot, weight contracts its {layout} stored axis"


def choose_mode(policy: ExecutionPolicy, primitive: str, x, view, params: dict, weight_side: str = "rhs", plan=None):
    """``(mode, carrier, reason)``: the activation mode a site runs in (``"weight_only"`` or the
    weight's own integer mode) under ``policy``, and ``carrier``: ``jnp.bfloat16`` where the
    integer dot runs on bfloat16 codes (`CARRIER`), `PATCHES` where the integer conv runs as an
    s8 dot on im2col patches, else ``None``; ``x`` is the
    activation (or anything with its shape and dtype); ``plan``: the tuned
    ``{weight path: (path, reason)}`` of a ``"tune"`` policy."""
    requested = view.activation
    if requested == "weight_only":
        return "weight_only", None, "quantized weight-only"
    forced = policy.forced(view.path or view.name)
    if forced is not None:
        path, reason = forced, "forced by an ExecutionPolicy override"
    elif policy.default == "rule":
        path, reason = "integer", "the weight's activation mode (policy 'rule')"
    elif policy.default in PATHS:
        path, reason = policy.default, f"policy {policy.default!r}"
    elif policy.default == "tune":
        tuned = None if plan is None else plan.get(view.path or view.name)
        if tuned is None:
            raise ValueError(
                f"ExecutionPolicy('tune'): no tuned path for {view.path or view.name!r}; the tuned policy runs "
                f"through jaxcompress.compressed, which times the whole program first"
            )
        path, reason = tuned
    elif policy.default == "measure":
        from jaxcompress.execute.measure import measured_choice

        path, reason = measured_choice(policy, primitive, x, view, params, weight_side)
    else:
        path, reason = auto_choice(primitive, tuple(x.shape), view, params, weight_side)
    if path == "weight_only":
        return "weight_only", None, reason
    if path == CARRIER:
        if primitive != "dot_general":
            return requested, None, f"{reason}; {CARRIER} runs dots only, so this conv runs its integer op"
        if not has_third_path(primitive, x.shape, view, params, weight_side):
            return requested, None, f"{reason}; a matrix-vector product runs the padded s8 dot either way"
        import jax.numpy as jnp

        return requested, jnp.bfloat16, reason
    if path == PATCHES:
        if primitive != "conv_general_dilated":
            return requested, None, f"{reason}; {PATCHES} runs convs only, so this dot runs its integer op"
        if not has_third_path(primitive, x.shape, view, params, weight_side):
            return requested, None, f"{reason}; no patches program of its own here (not a native int8 conv, or its kernel does not flatten into one): its integer op is the same program"
        return requested, PATCHES, reason
    return requested, None, reason


def site_choice(primitive: str, x_shape, view, params: dict, mode: str, reason: str, carrier=None) -> SiteChoice:
    """The `SiteChoice` record of a decided site."""
    from jaxcompress.execute.depthwise import is_depthwise

    chosen = "weight_only" if mode == "weight_only" else (PATCHES if isinstance(carrier, str) else CARRIER if carrier is not None else "integer")
    if primitive == "conv_general_dilated" and is_depthwise(view.shape, params):
        chosen += "_depthwise"
    return SiteChoice(view.path or view.name, primitive, tuple(x_shape), tuple(view.shape), view.activation, chosen, reason)
