"""GPTQ's per-matrix algorithm (`gptq_matrix`): the matrix math, separate from the tree driver.

`jaxcompress.oneshot.gptq` explains the algorithm and applies it over a params tree; this module
holds one jitted function over a ``(d_out, d_in)`` matrix and its ``H = 2 X^T X``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.qarray import INT_QTYPE
from jaxcompress.quant.calibrate import calibrate_range
from jaxcompress.quant.codec import int_range, scale_from_range
from jaxcompress.quant.spec import Calibration, QuantSpec, ResolvedSpec, as_calibration

__all__ = ["GPTQResult", "gptq_matrix"]


class GPTQResult(NamedTuple):
    """What `gptq_matrix` returns (float32 jnp arrays).

    Attributes:
      weights: ``(d_out, d_in)`` the quantized weights, dequantized: ``(codes - zero) * scale``.
      codes: ``(d_out, d_in)`` the integer codes (float32 holding integers).
      scale: ``(n_groups, d_out)`` the scale of each (column group, row); rows share one value
        for per-tensor scales.
      zero_point: ``(n_groups, d_out)`` zero points (zeros when symmetric).
      damp: the damping actually used (after retries).
    """

    weights: jax.Array
    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    damp: float


def _matrix_spec(bits: int, symmetric: bool | None, calibration: Any, scale_dtype: str) -> ResolvedSpec:
    spec = QuantSpec(bits=bits, symmetric=symmetric, calibration=calibration, scale_dtype=scale_dtype)
    return ResolvedSpec(
        bits=spec.bits, qtype=INT_QTYPE, symmetric=bool(spec.symmetric), channel_axes=(0,), group_axis=None,
        group_size=None, calibration=as_calibration(spec.calibration), allow_nonfinite=False, scale_dtype=spec.scale_dtype,
    )


def _group_scale(values: jax.Array, valid: jax.Array, importance: jax.Array, spec: ResolvedSpec,
                 per_channel: bool, clip_ratios: jax.Array | None):
    """Scale and zero point, each ``(d_out,)``, of one column group's ``(d_out, span)`` values.

    ``valid`` (``(span,)``) marks the group's columns (a ragged group is padded to the common
    span); padded columns are zero, which no range rule is changed by (an asymmetric range
    always contains 0; absmax and the MSE search are unaffected by exact zeros). Percentile
    ranges see the padding as copies of the group's first column. ``clip_ratios``: the clipping
    search -- every ratio ``r`` shrinks the range to ``r * [lo, hi]`` and the ratio with the
    least ``sum_j importance_j (w_j - q(w_j))^2`` (per row, or over the group when scales are
    per tensor) wins; 1.0 (no clipping) is always on the grid.
    """
    reduce_axes = (1,) if per_channel else (0, 1)
    if spec.calibration.method == "percentile":
        values = jnp.where(valid[None, :], values, values[:, :1])
    else:
        values = jnp.where(valid[None, :], values, 0.0)
    lo, hi = calibrate_range(values, spec, reduce_axes)
    scale, zero = scale_from_range(lo, hi, spec)
    zero = jnp.zeros_like(scale) if zero is None else zero
    if clip_ratios is not None:
        qmin, qmax = int_range(spec.bits, spec.symmetric)
        weight = jnp.where(valid, importance, 0.0)[None, :]

        def error(scale, zero):
            _, q = _round(values, scale, zero, qmin, qmax)
            return jnp.sum(weight * (q - values) ** 2, axis=reduce_axes, keepdims=True)

        def body(i, carry):
            best, best_scale, best_zero = carry
            s, z = scale_from_range(lo * clip_ratios[i], hi * clip_ratios[i], spec)
            z = jnp.zeros_like(s) if z is None else z
            err = error(s, z)
            better = err < best
            return jnp.where(better, err, best), jnp.where(better, s, best_scale), jnp.where(better, z, best_zero)

        _, scale, zero = jax.lax.fori_loop(0, clip_ratios.shape[0], body, (error(scale, zero), scale, zero))
    d_out = values.shape[0]
    return jnp.broadcast_to(scale.reshape(-1), (d_out,)), jnp.broadcast_to(zero.reshape(-1), (d_out,))


def _round(w, scale, zero, qmin, qmax):
    codes = jnp.clip(jnp.round(w / scale) + zero, qmin, qmax)
    return codes, (codes - zero) * scale


def _largest_divisor(n: int, limit: int) -> int:
    for b in range(min(n, limit), 0, -1):
        if n % b == 0:
            return b
    return 1


def _core(W, U, perm, importance, group_of, group_positions, first_in_group, scales, zeros, clip_ratios, *,
          spec, per_channel, block, static_groups):
    d_out, d_in = W.shape
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    n_blocks = d_in // block

    def block_body(b, carry):
        W, codes, scales, zeros = carry
        start = b * block
        W1 = jax.lax.dynamic_slice(W, (0, start), (d_out, block))
        U_rows = jax.lax.dynamic_slice(U, (start, 0), (block, d_in))  # (block, d_in)
        U_block = jax.lax.dynamic_slice(U_rows, (0, start), (block, block))
        Err1 = jnp.zeros((d_out, block), W.dtype)
        C1 = jnp.zeros((d_out, block), W.dtype)

        def column_body(i, inner):
            W1, Err1, C1, scales, zeros = inner
            j = start + i
            g = group_of[j]
            if not static_groups:

                def new_scale(operands):
                    scales, zeros = operands
                    # Permuted positions of the group's columns, all >= j; -1 pads a short group.
                    valid = group_positions[g] >= 0
                    positions = jnp.where(valid, group_positions[g], j)
                    in_block = positions < start + block
                    from_block = jnp.take(W1, jnp.clip(positions - start, 0, block - 1), axis=1)
                    later = jnp.take(W, positions, axis=1) - Err1 @ jnp.take(U_rows, positions, axis=1)
                    current = jnp.where(in_block[None, :], from_block, later)
                    scale, zero = _group_scale(current, valid, importance[positions], spec, per_channel, clip_ratios)
                    return scales.at[g].set(scale), zeros.at[g].set(zero)

                scales, zeros = jax.lax.cond(first_in_group[j], new_scale, lambda o: o, (scales, zeros))
            w = W1[:, i]
            c, q = _round(w, scales[g], zeros[g], qmin, qmax)
            err = (w - q) / U_block[i, i]
            W1 = W1 - err[:, None] * U_block[i][None, :]
            return W1, Err1.at[:, i].set(err), C1.at[:, i].set(c), scales, zeros

        W1, Err1, C1, scales, zeros = jax.lax.fori_loop(0, block, column_body, (W1, Err1, C1, scales, zeros))
        codes = jax.lax.dynamic_update_slice(codes, C1, (0, start))
        W = W - Err1 @ U_rows  # lazy update of every later column (earlier ones: U is upper triangular)
        return W, codes, scales, zeros

    codes = jnp.zeros_like(W)
    _, codes, scales, zeros = jax.lax.fori_loop(0, n_blocks, block_body, (W, codes, scales, zeros))
    inverse = jnp.argsort(perm)
    codes = codes[:, inverse]
    return codes, scales, zeros


def _padded_members(counts: tuple[int, ...]) -> np.ndarray:
    """``(n_groups, max count)`` indices into a list of columns sorted by group, ``-1`` padding
    the shorter (ragged) groups."""
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    span = max(counts)
    k = np.arange(span)[None, :]
    return np.where(k < np.asarray(counts)[:, None], offsets[:, None] + k, -1)


def _upper_cholesky_of_inverse(H: jax.Array) -> jax.Array:
    """Upper ``U`` with ``H^-1 = U^T U`` from ONE Cholesky and one triangular inverse: with
    ``J`` the reversal, ``chol(J H J) = L`` gives ``H = R R^T``, ``R = J L J`` upper, so
    ``H^-1 = R^-T R^-1`` and ``U = R^-1`` (4-5x cheaper than inverting ``H`` and factorizing)."""
    R = jnp.linalg.cholesky(H[::-1, ::-1])[::-1, ::-1]
    return jax.scipy.linalg.solve_triangular(R, jnp.eye(H.shape[0], dtype=H.dtype), lower=False)


@functools.partial(
    jax.jit, static_argnames=("spec", "per_channel", "block", "act_order", "static_groups", "zero_dead", "counts")
)
def _gptq_all(W, H, col_group, damp, clip_ratios, *, spec, per_channel, block, act_order, static_groups, zero_dead,
              counts):
    d_out, d_in = W.shape
    n_groups = len(counts)
    W = W.astype(jnp.float32)
    H = H.astype(jnp.float32)
    diag = jnp.diag(H)
    dead = diag == 0
    H = H + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(H.dtype))
    if zero_dead:
        W = jnp.where(dead[None, :], 0.0, W)
    H = H + damp * jnp.mean(jnp.diag(H)) * jnp.eye(d_in, dtype=H.dtype)
    importance = jnp.diag(H)  # the clipping search's per-column weight: x_j's energy
    perm = jnp.argsort(-importance, stable=True) if act_order else jnp.arange(d_in)
    # Group bookkeeping in the processing order; groups may differ in size (a ragged last one).
    members = jnp.asarray(_padded_members(counts))
    valid = members >= 0
    group_of = col_group[perm]
    by_group = jnp.argsort(group_of, stable=True)  # permuted positions, ascending within a group
    positions = jnp.where(valid, by_group[jnp.maximum(members, 0)], -1)
    first = jnp.zeros(d_in, bool).at[positions[:, 0]].set(True)
    # Static groups: every scale from the original weights now; otherwise each group's scale is
    # set in the loop when its first column (in processing order) is reached.
    scales = jnp.ones((n_groups, d_out), jnp.float32)
    zeros = jnp.zeros((n_groups, d_out), jnp.float32)
    if static_groups:
        original = jnp.where(valid, jnp.argsort(col_group, stable=True)[jnp.maximum(members, 0)], 0)

        def static_scale(cols, ok):
            return _group_scale(jnp.take(W, cols, axis=1), ok, importance[cols], spec, per_channel, clip_ratios)

        scales, zeros = jax.vmap(static_scale)(original, valid)
    Wp = W[:, perm]
    Hp = H[perm][:, perm]
    U = _upper_cholesky_of_inverse(Hp)
    codes, scales, zeros = _core(
        Wp, U, perm, importance[perm], group_of, positions, first, scales, zeros, clip_ratios,
        spec=spec, per_channel=per_channel, block=block, static_groups=static_groups,
    )
    scale_cols = scales[col_group].T  # (d_out, d_in)
    zero_cols = zeros[col_group].T
    weights = (codes - zero_cols) * scale_cols
    return weights, codes, scales, zeros, jnp.all(jnp.isfinite(U))


def gptq_matrix(
    W: Any,
    H: Any,
    bits: int = 4,
    group_size: int | None = None,
    *,
    symmetric: bool | None = None,
    per_channel: bool = True,
    column_groups: Any = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    zero_dead: bool = True,
    clip_search: bool = False,
    clip_grid: int = 20,
    clip_min_ratio: float = 0.5,
    calibration: str | Calibration = "absmax",
    scale_dtype: str = "float32",
    name: str = "matrix",
) -> GPTQResult:
    """GPTQ of one ``(d_out, d_in)`` matrix given ``H`` (``2 X^T X`` or any positive multiple).

    Args:
      W: ``(d_out, d_in)`` weights (rows = outputs, columns = inputs).
      H: ``(d_in, d_in)`` input Gram matrix.
      bits: 2..8.
      group_size: consecutive input columns sharing one scale (``None``: all of them); when it
        does not divide ``d_in`` the last group is shorter.
      symmetric: symmetric codes (no zero point) or asymmetric; ``None``: by ``bits``, as
        `jaxcompress.QuantSpec` (asymmetric at 4 bits and below).
      per_channel: one scale per output row (else one per column group, shared by all rows).
      column_groups: ``(d_in,)`` int group index of every column (``0 .. n_groups - 1``, each
        used), overriding ``group_size`` (used for matrix views whose groups are not contiguous
        columns; groups may differ in size).
      damp: relative damping, ``damp * mean(diag H)`` is added to the diagonal.
      block_size: columns per lazy-update block (the largest divisor of ``d_in`` not above it).
      act_order: process columns by decreasing ``H_ii``.
      static_groups: group scales from the original weights (see the module docs).
      zero_dead: zero the weights of inputs never active in calibration (``H_ii = 0``).
      clip_search: choose each group's clipping range by search: ``clip_grid`` ratios ``r`` evenly
        in ``[clip_min_ratio, 1]`` shrink the calibrated range to ``r * [lo, hi]``, and the one with
        the least ``sum_j H_jj (w_j - q(w_j))^2`` (the group's rounding error weighted by each
        input's energy) is kept; done where the group's scale is set (its first column, or
        before the column loop with ``static_groups``).
      calibration, scale_dtype: as in `jaxcompress.QuantSpec`.
      name: what warnings and errors call the matrix.

    Returns:
      A `GPTQResult`.

    >>> import numpy as np, jax.numpy as jnp
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(256, 16)) * np.linspace(0.1, 3, 16); W = rng.normal(size=(8, 16))
    >>> result = gptq_matrix(W, 2 * X.T @ X, bits=3, group_size=8)
    >>> rtn = gptq_matrix(W, np.eye(16), bits=3, group_size=8).weights   # H = I: round to nearest
    >>> err = lambda Wq: float(np.sum(((np.asarray(Wq) - W) @ X.T) ** 2))
    >>> err(result.weights) < err(rtn), result.scale.shape
    (True, (2, 8))
    """
    W = jnp.asarray(W, jnp.float32)
    H = jnp.asarray(H, jnp.float32)
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"{name}: expected W (d_out, d_in) and H (d_in, d_in), got {W.shape} and {H.shape}")
    d_out, d_in = W.shape
    if column_groups is None:
        if group_size is None:
            group_size = d_in
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
            raise ValueError(f"{name}: group_size must be a positive int, got {group_size!r}")
        column_groups = np.arange(d_in) // group_size
    column_groups = np.asarray(column_groups)
    if column_groups.shape != (d_in,) or not np.issubdtype(column_groups.dtype, np.integer) or column_groups.min() < 0:
        raise ValueError(f"{name}: column_groups must give every one of {d_in} columns a group index >= 0")
    counts = np.bincount(column_groups)
    if not np.all(counts > 0):
        raise ValueError(f"{name}: column_groups must use every group index 0..{len(counts) - 1}")
    if isinstance(clip_grid, bool) or not isinstance(clip_grid, int) or clip_grid < 1 or not 0 < clip_min_ratio <= 1:
        raise ValueError(f"{name}: expected clip_grid >= 1 and 0 < clip_min_ratio <= 1, got {clip_grid!r}, "
                         f"{clip_min_ratio!r}")
    clip_ratios = jnp.linspace(1.0, clip_min_ratio, clip_grid + 1)[1:] if clip_search else None
    spec = _matrix_spec(bits, symmetric, calibration, scale_dtype)
    block = _largest_divisor(d_in, block_size)
    diag = np.asarray(jnp.diag(H))
    if not np.all(np.isfinite(np.asarray(H))):
        raise ValueError(f"{name}: the Hessian contains NaN or Inf")
    dead = int(np.sum(diag == 0))
    if dead:
        what = "set to 0" if zero_dead else "rounded to nearest"
        warnings.warn(
            f"{name}: {dead} of {d_in} inputs are zero on all calibration rows (H_ii = 0); their weights are "
            f"{what}. Calibrate with more / more varied data if this is unexpected.",
            UserWarning,
            stacklevel=2,
        )
    used = float(damp)
    for _ in range(6):
        weights, codes, scales, zeros, finite = _gptq_all(
            W, H, jnp.asarray(column_groups, jnp.int32), jnp.float32(used), clip_ratios,
            spec=spec, per_channel=per_channel, block=block, act_order=act_order,
            static_groups=static_groups, zero_dead=zero_dead, counts=tuple(int(c) for c in counts),
        )
        if bool(finite) and bool(jnp.all(jnp.isfinite(weights))):
            break
        next_damp = max(used * 10, 1e-4)
        warnings.warn(
            f"{name}: the damped Hessian is not positive definite in float32 (damp={used:g}); retrying "
            f"with damp={next_damp:g}. Too few calibration samples for {d_in} inputs?",
            UserWarning,
            stacklevel=2,
        )
        used = next_damp
    else:  # pragma: no cover - H = I after enough damping is always factorizable
        raise FloatingPointError(f"{name}: GPTQ did not produce finite weights")
    return GPTQResult(weights, codes, scales, zeros, used)


# ---------------------------------------------------------------------------------------------
# Tree level
# ---------------------------------------------------------------------------------------------
