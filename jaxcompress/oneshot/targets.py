"""Input-drift-aware layer targets: fit each compressed layer to the DENSE model's outputs.

A sequential one-shot method (GPTQ, SparseGPT, Wanda) compresses layer after layer; the inputs
``x`` a layer sees are those of the partly compressed model, not the dense model's ``x_d``.
Fitting the layer to its own dense weight on those inputs (``min ||V x - W x||``) leaves the
drift of its inputs uncorrected; fitting it to the dense model's output on the same row
(``min ||V x - W x_d||``, the "asymmetric calibration" of GPTAQ / GPTQv2) lets the layer undo
part of what the earlier layers lost. With ``H = sum x x^T`` and the cross term
``C = sum x x_d^T`` (`LayerStatistics.cross`, captured with the dense model alongside), and a
ridge ``lam ||V - W||^2`` with ``lam = damp * mean(diag H)`` that keeps the fit near ``W`` along
directions the data does not see::

    sum ||V x - W x_d||^2 + lam ||V - W||^2 = tr((V - W*) (H + lam I) (V - W*)^T) + const,
    W* = (W C^T + lam W) (H + lam I)^-1,

so every method runs unchanged on ``W*`` (the unconstrained optimum) with the same ``H``: the
compressed ``V`` then minimises the drift-aware error under the method's constraint (a code
grid, a sparsity mask). Where the inputs did not drift (``x = x_d``: the first layers, or a
one-pass capture) ``C = H`` and ``W* = W``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["dense_target_weight"]


def dense_target_weight(weight: Any, hessian: Any, cross: Any, *, damp: float = 0.01, name: str = "weight") -> np.ndarray:
    """``W* = (W C^T + lam W) (H + lam I)^-1`` (float64; see the module docs).

    Args:
      weight: ``(d_out, d_in)`` the dense matrix-view weight ``W``.
      hessian: ``(d_in, d_in)`` ``H = sum x x^T`` of the compressed model's inputs.
      cross: ``(d_in, d_in)`` ``C = sum x x_d^T`` (`LayerStatistics.cross`).
      damp: ``lam = damp * mean(diag H)`` (> 0).
      name: used in error messages.

    >>> rng = np.random.default_rng(0)
    >>> x_d = rng.normal(size=(500, 4)); x = x_d + 0.1 * rng.normal(size=(500, 4))   # drifted inputs
    >>> W = rng.normal(size=(2, 4))
    >>> target = dense_target_weight(W, x.T @ x, x.T @ x_d, damp=1e-6)
    >>> err = lambda V: float(np.sum((x @ V.T - x_d @ W.T) ** 2))
    >>> err(target) < err(W)
    True
    >>> bool(np.allclose(dense_target_weight(W, x.T @ x, x.T @ x), W))   # no drift: W itself
    True
    """
    W = np.asarray(weight, np.float64)
    H = np.asarray(hessian, np.float64)
    C = np.asarray(cross, np.float64)
    if W.ndim != 2 or H.shape != (W.shape[1],) * 2 or C.shape != H.shape:
        raise ValueError(
            f"{name}: expected weight (d_out, d_in) with hessian and cross (d_in, d_in); got {W.shape}, {H.shape}, {C.shape}"
        )
    if not damp > 0:
        raise ValueError(f"{name}: the dense target needs damp > 0, got {damp!r}")
    diag = np.diag(H)
    lam = damp * (float(np.mean(diag)) if np.any(diag > 0) else 1.0)
    system = 0.5 * (H + H.T) + lam * np.eye(H.shape[0])
    rhs = C @ W.T + lam * W.T  # (W C^T + lam W)^T = C W^T + lam W^T
    if not (np.all(np.isfinite(system)) and np.all(np.isfinite(rhs))):
        raise ValueError(f"{name}: the calibration statistics contain NaN or Inf")
    return np.asarray(np.linalg.solve(system, rhs).T)
