"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot").

For a matrix-view weight ``W`` ``(d_out, d_in)`` and ``H = X^T X`` of its calibration inputs,
SparseGPT minimises the output error ``||(W_s - W) X^T||^2 = tr(E H E^T)`` over sparse ``W_s``
column by column with Optimal Brain Surgeon updates: when column ``j`` is pruned, the error
``(w_j - q_j) / [H^-1]_jj`` is spread over the columns not yet visited with the rows of the upper
Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), which is the same as re-solving the
least-squares problem for the remaining columns. Columns are processed in blocks of
``block_size`` (128, as the paper): inside a block the updates are applied one column at a time,
the rest of the matrix receives the block's accumulated error in one matmul ("lazy batch").

Adaptive mask selection: the mask of each block is chosen when the block is reached (so it sees
the updates of the earlier blocks) by the OBS saliency ``w^2 / [U]_jj^2``: for unstructured
sparsity the lowest scores of the whole block ``(d_out x block)`` are pruned, with per-block counts
that add up to exactly ``round(sparsity * W.size)`` for the matrix; for N:M the ``n`` best of each
``m`` consecutive columns of every row are kept, chosen when the group's first column is reached.

Damping and degenerate statistics: an input that is always zero (``H_jj == 0``) gets ``H_jj`` set
to the mean of the other diagonal entries (its weight is free for the calibration data; this makes
it a magnitude decision), then ``damp * mean(diag(H))`` is added to the diagonal, which makes
``H`` positive definite even with fewer calibration rows than inputs. The factor 2 of the paper's
``H = 2 X^T X`` cancels in every step and is left out.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxcompress.oneshot.allocation import Allocation, resolve_allocation
from jaxcompress.oneshot.wanda import check_pattern, n_m_keep_mask, pruned_count

__all__ = ["damped_hessian", "inverse_cholesky_upper", "sparsegpt_matrix", "output_error", "sparsegpt"]


def damped_hessian(hessian: jax.Array, damp: float = 0.01) -> jax.Array:
    """``H`` with dead inputs repaired and ``damp * mean(diag(H))`` added to the diagonal (float32).

    >>> damped_hessian(jnp.array([[2.0, 0.0], [0.0, 0.0]]), damp=0.5).tolist()
    [[3.0, 0.0], [0.0, 3.0]]
    """
    h = jnp.asarray(hessian, jnp.float32)
    h = 0.5 * (h + h.T)
    diag = jnp.diagonal(h)
    live = diag > 0
    count = jnp.sum(live)
    mean_live = jnp.where(count > 0, jnp.sum(jnp.where(live, diag, 0.0)) / jnp.maximum(count, 1), 1.0)
    diag = jnp.where(live, diag, mean_live)
    diag = diag + damp * jnp.mean(diag)
    return h - jnp.diag(jnp.diagonal(h)) + jnp.diag(diag)


def inverse_cholesky_upper(hessian: jax.Array) -> jax.Array:
    """Upper-triangular ``U`` with ``U^T U = H^-1`` for a positive definite ``H`` (NaN if it is not).

    >>> u = inverse_cholesky_upper(jnp.array([[4.0, 0.0], [0.0, 0.25]]))
    >>> u.tolist()
    [[0.5, 0.0], [0.0, 2.0]]
    """
    h = jnp.asarray(hessian, jnp.float32)
    lower = jnp.linalg.cholesky(h)
    identity = jnp.eye(h.shape[0], dtype=h.dtype)
    inverse = jax.scipy.linalg.cho_solve((lower, True), identity)
    inverse = 0.5 * (inverse + inverse.T)
    return jnp.triu(jnp.linalg.cholesky(inverse).T)


def output_error(delta: jax.Array, hessian: jax.Array) -> jax.Array:
    """``tr(E H E^T) = ||E X^T||^2`` for a matrix-view change ``E`` ``(d_out, d_in)`` and ``H = X^T X``.

    >>> float(output_error(jnp.array([[1.0, 2.0]]), jnp.array([[1.0, 0.0], [0.0, 3.0]])))
    13.0
    """
    delta = jnp.asarray(delta, jnp.float32)
    return jnp.sum((delta @ jnp.asarray(hessian, jnp.float32)) * delta)


def _block_columns(w1, keep1, u1, columns):
    """OBS-update ``columns`` (a static range) of the block ``w1``; returns (w1, err1)."""
    err1 = jnp.zeros_like(w1)

    def body(i, carry):
        w1, err1 = carry
        column = lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
        kept = lax.dynamic_index_in_dim(keep1, i, axis=1, keepdims=False)
        row = lax.dynamic_index_in_dim(u1, i, axis=0, keepdims=False)
        error = jnp.where(kept, 0.0, column) / row[i]
        w1 = w1 - error[:, None] * row[None, :]
        err1 = lax.dynamic_update_index_in_dim(err1, error, i, axis=1)
        return w1, err1

    return lax.fori_loop(columns.start, columns.stop, body, (w1, err1))


def _nm_block(w1, u1, n, m):
    """N:M inside one block: choose each group's mask when reached, then update its columns."""
    d_out, count = w1.shape
    diag = jnp.diagonal(u1)
    keep1 = jnp.ones(w1.shape, bool)
    err1 = jnp.zeros_like(w1)

    def group(g, carry):
        w1, keep1, err1 = carry
        start = g * m
        cols = lax.dynamic_slice_in_dim(w1, start, m, axis=1)
        d = lax.dynamic_slice_in_dim(diag, start, m)
        keep_g = n_m_keep_mask(cols**2 / (d**2)[None, :], n, m)
        keep1 = lax.dynamic_update_slice_in_dim(keep1, keep_g, start, axis=1)
        for j in range(m):
            i = start + j
            column = lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
            row = lax.dynamic_index_in_dim(u1, i, axis=0, keepdims=False)
            error = jnp.where(keep_g[:, j], 0.0, column) / d[j]
            w1 = w1 - error[:, None] * row[None, :]
            err1 = lax.dynamic_update_index_in_dim(err1, error, i, axis=1)
        return w1, keep1, err1

    return lax.fori_loop(0, count // m, group, (w1, keep1, err1))


@jax.jit
def _prepare(hessian, damp):
    return inverse_cholesky_upper(damped_hessian(hessian, damp))


@functools.partial(jax.jit, static_argnames=("sparsity", "n", "m", "block_size"))
def _sparsegpt(weight, hinv_upper, *, sparsity, n, m, block_size):
    d_out, d_in = weight.shape
    w = weight.astype(jnp.float32)
    out_blocks, keep_blocks = [], []
    for start in range(0, d_in, block_size):
        end = min(start + block_size, d_in)
        w1 = w[:, start:end]
        u1 = hinv_upper[start:end, start:end]
        if n is None:
            prune = pruned_count(sparsity, d_out * end) - pruned_count(sparsity, d_out * start)
            scores = (w1**2 / (jnp.diagonal(u1) ** 2)[None, :]).ravel()
            ranks = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)  # 0 = least salient
            keep1 = (ranks >= prune).reshape(w1.shape)
            w1, err1 = _block_columns(w1, keep1, u1, range(0, end - start))
        else:
            w1, keep1, err1 = _nm_block(w1, u1, n, m)
        out_blocks.append(jnp.where(keep1, w1, 0.0))
        keep_blocks.append(keep1)
        if end < d_in:
            w = w.at[:, end:].add(-err1 @ hinv_upper[start:end, end:])
    pruned = jnp.concatenate(out_blocks, axis=1).astype(weight.dtype)
    return pruned, jnp.concatenate(keep_blocks, axis=1)


def sparsegpt_matrix(
    weight: jax.Array,
    hessian: jax.Array,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    name: str = "weight",
) -> tuple[jax.Array, jax.Array]:
    """Prune a matrix-view weight ``(d_out, d_in)`` with SparseGPT: ``(pruned weight, keep mask)``.

    Args:
      weight: ``(d_out, d_in)``, columns in the order of ``hessian``.
      hessian: ``(d_in, d_in)`` ``X^T X`` of the calibration inputs (`LayerStatistics.hessian`).
      sparsity: fraction of the matrix pruned (static float; exact count over the matrix); or
      n, m: keep ``n`` of every ``m`` consecutive inputs of every row (``m`` must divide
        ``block_size`` and ``d_in``).
      damp: relative damping, ``damp * mean(diag(H))`` is added to the diagonal (see
        `damped_hessian`). Must be > 0 when ``H`` is singular, or the result is NaN.
      block_size: columns per lazy-update block.
      name: used in error messages (a params path).

    The kept weights are UPDATED to compensate for the pruned ones; pruned ones are exactly 0.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    >>> w = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    >>> pruned, mask = sparsegpt_matrix(w, x.T @ x, sparsity=0.5, block_size=4)
    >>> int(mask.sum()), bool(jnp.all(jnp.where(mask, True, pruned == 0)))
    (16, True)
    """
    weight = jnp.asarray(weight)
    hessian = jnp.asarray(hessian)
    if weight.ndim != 2:
        raise ValueError(f"{name}: expected a (d_out, d_in) matrix view, got shape {tuple(weight.shape)}")
    d_in = weight.shape[1]
    if tuple(hessian.shape) != (d_in, d_in):
        raise ValueError(f"{name}: Hessian of shape {tuple(hessian.shape)} does not match d_in={d_in} of the weight {tuple(weight.shape)}")
    check_pattern(sparsity, n, m, d_in, name)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: block_size must be a positive integer, got {block_size!r}")
    if n is not None and m is not None and block_size % m:
        raise ValueError(f"{name}: N:M with M={m} needs block_size divisible by M, got block_size={block_size}")
    if damp < 0:
        raise ValueError(f"{name}: damp must be >= 0, got {damp}")
    upper = _prepare(hessian, jnp.float32(damp))
    sparsity = None if sparsity is None else float(sparsity)
    return _sparsegpt(weight, upper, sparsity=sparsity, n=n, m=m, block_size=block_size)


def _sparsegpt_from_statistics(matrix, stats, *, sparsity, n, m, name, damp, block_size, count=None):
    import warnings

    import numpy as np

    from jaxcompress.oneshot.prune_driver import check_statistics

    if count is not None and pruned_count(sparsity, matrix.size) != count:  # count / size round-trips
        raise AssertionError(f"{name}: sparsity {sparsity!r} does not give the allocated count {count}")

    check_statistics(stats, name, "SparseGPT", uses_hessian=True)
    hessian = np.asarray(stats.hessian, np.float32)
    attempt = damp
    for _ in range(6):
        pruned, keep = sparsegpt_matrix(
            matrix, hessian, sparsity=sparsity, n=n, m=m, damp=attempt, block_size=block_size, name=name
        )
        if bool(jnp.all(jnp.isfinite(pruned))):
            if attempt != damp:
                warnings.warn(
                    f"{name}: the damped Hessian was not positive definite in float32 with damp={damp}; "
                    f"SparseGPT used damp={attempt:g}",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return pruned, keep
        attempt = max(attempt * 10.0, 1e-3)
    raise FloatingPointError(f"{name}: SparseGPT produced non-finite weights even with damp={attempt / 10:g}")


def sparsegpt(
    fn: Callable,
    params: Any,
    batches: Iterable[Any],
    rules: Any,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    sequential: bool = True,
    allocation: Allocation = "uniform",
    reconstruct: bool = True,
    dense_target: bool = True,
    target_damp: float = 1.0,
    step: int | None = None,
    row_mask: Callable[[Any], Any] | None = None,
    params_argnum: int = 0,
    on_unused: Literal["warn", "error", "ignore"] = "warn",
) -> tuple[Any, Any]:
    """Prune ``params`` with SparseGPT from calibration batches; returns ``(pruned_params, masks)``.

    Args:
      fn: the unmodified function, called as ``fn(params, *batch)`` (tuple batches) or
        ``fn(params, batch)``.
      params: float params.
      batches: calibration batches (each segment of a sequential pass runs over all of them).
      rules: `jaxcompress.PruneRule`\\ s (or a ``{pattern: sparsity}`` mapping), first full match
        wins. Supported: ``structure="unstructured"`` (exactly ``round(sparsity * size)`` zeros per
        leaf, chosen block by block; ``distribution="erk"`` works) and ``structure="n:m"`` (along
        the contracting axis, e.g. 2:4). The rule's ``score`` is replaced by SparseGPT's.
      damp: relative Hessian damping (see `damped_hessian`); raised tenfold, with a warning, if
        float32 Cholesky still fails.
      block_size: columns per lazy-update block (128 as the paper).
      sequential: prune group by group in program order with the earlier groups already pruned
        (as the paper); ``False``: all statistics from the dense model in one pass.
      allocation: ``"uniform"`` (every leaf at its rule's sparsity) or ``"owl"`` / an
        `jaxcompress.oneshot.allocation.OWL` (outlier-weighted per-leaf sparsities within
        ``+-spread`` of the rule's, exactly the rule's total count; unstructured rules only, N:M
        stays exact). Costs one extra calibration pass of the dense model.
      reconstruct: ``True`` (default): after each leaf's OBS sweep, re-fit its kept weights
        jointly by masked least squares on the same ``X^T X`` (`jaxcompress.oneshot.reconstruct`).
      dense_target: ``True`` (default): prune (and re-fit) each leaf towards the DENSE model's outputs on the
        calibration rows, ``min ||W_s x - W x_d||`` with ``x_d`` the dense model's input there
        (the dense model runs alongside the sequential capture, which then also records ``X^T X``;
        `jaxcompress.oneshot.targets`). Only changes anything when ``sequential``.
      target_damp: the dense target's ridge towards the leaf's own weight, relative to
        ``mean(diag(X^T X))`` (measured: 1.0 beat 0.1 and 0.01 on all-MiniLM-L6-v2).
      step: where a rule's sparsity schedule is evaluated (required if a rule has a schedule).
      row_mask: ``row_mask(batch) -> array``: calibration rows where it is 0 are ignored (e.g.
        padding tokens: ``lambda batch: batch[1]``); see
        `jaxcompress.oneshot.capture.capture_statistics`.
      params_argnum: where params go among ``fn``'s positional arguments.
      on_unused: ``"warn"``, ``"error"`` or ``"ignore"`` for rules that matched nothing.

    Measured defaults (``benchmarks/oneshot_prune.py``, all-MiniLM-L6-v2, 36 encoder kernels,
    256 calibration / 256 held-out sentences, mean cosine to the fp32 embeddings): 50%
    unstructured 0.9433 with the re-fit alone, 0.9508 with the dense target too; 2:4 0.9119
    with both. ``reconstruct=False, dense_target=False`` is the paper's SparseGPT.

    Unlike magnitude pruning or Wanda, the KEPT weights change (they absorb the pruned ones'
    contribution on the calibration data). ``masks`` is like `jaxcompress.prune_params`'.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    >>> fn = lambda p, x: x @ p["w"]
    >>> batches = [jax.random.normal(jax.random.key(1), (32, 8))]
    >>> pruned, masks = sparsegpt(fn, params, batches, [jc.PruneRule(pattern="w", structure="n:m", n=2, m=4)])
    >>> masks["w"].reshape(2, 4, 4).sum(axis=1).tolist()   # 2 of every 4 inputs, per output
    [[2, 2, 2, 2], [2, 2, 2, 2]]
    """
    from jaxcompress.oneshot.prune_driver import prune_with_statistics

    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    prune_matrix = functools.partial(_sparsegpt_from_statistics, damp=damp, block_size=block_size)
    return prune_with_statistics(
        fn,
        params,
        batches,
        rules,
        prune_matrix,
        method="SparseGPT",
        hessian=True,
        sequential=sequential,
        step=step,
        params_argnum=params_argnum,
        on_unused=on_unused,
        row_mask=row_mask,
        allocation=resolve_allocation(allocation),
        reconstruct=reconstruct,
        reconstruct_damp=max(damp, 1e-3),
        dense_target=dense_target,
        target_damp=target_damp,
    )
