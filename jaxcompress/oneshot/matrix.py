"""The canonical matrix view of a weight at a dot / conv site (what one-shot methods work on).

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
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcompress.execute.hooks import (
    DotSite,
)

if TYPE_CHECKING:
    from jaxcompress.oneshot.statistics import LayerStatistics


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
    if isinstance(getattr(site_or_view, "view", None), MatrixView):  # a LayerStatistics
        return site_or_view.view
    return matrix_view(site_or_view, leaf_shape)


def to_matrix(leaf: jax.Array, site: DotSite | MatrixView | "LayerStatistics") -> jax.Array:
    """The ``(d_out, d_in)`` float32 matrix view of ``leaf`` (see the module docs).

    ``site`` is a `DotSite`, a `MatrixView` or the `LayerStatistics` captured for the leaf.

    >>> import jax.numpy as jnp, numpy as np
    >>> from jaxcompress.oneshot.capture import capture_statistics
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
    operand = jnp.transpose(jnp.reshape(matrix.astype(jnp.float32), permuted_shape), tuple(int(a) for a in np.argsort(view.permutation)))
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
