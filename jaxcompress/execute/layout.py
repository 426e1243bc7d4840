"""Integer weight layout: store a quantized kernel's codes with its contracted axes last.

XLA's CPU backend runs an ``s8 x s8 -> s32`` dot several times faster when the weight's
contracted axis is its MINOR (last) axis: a Flax ``Dense`` kernel is ``(in, out)`` and contracts
its major axis, so the same int8 codes stored ``(out, in)`` run the 32x4096x4096 W8A8 dot about
twice as fast and a batch-1 dot about four times as fast (``benchmarks/int8_matmul.py``, rows
``w8a8`` vs ``w8a8_out_in``). Transposing the codes inside the program costs more than the dot
gains (a 16 MB int8 transpose per call), and XLA:CPU's layout assignment copies a parameter with a
column-major device layout back to row-major before the matmul, so the layout has to be chosen
when the weight is quantized.

A `QArray` can store its codes transposed (``stored_permutation``: ``values ==
transpose(codes, stored_permutation)``) while its shape, scale layout and `dequantize` stay those
of the original array; `jaxcompress.compressed` then sees the weight as a lazily transposed
`WeightView` and the dot folds the transpose into its dimension numbers, so nothing moves at run
time. `integer_layout` says which permutation a kernel wants; `store_for_integer_dots` applies it
to every integer-mode `QArray` of a params tree.

The default (`default_layout`, what `jaxcompress.quantize_params` applies unless
``layout="logical"``): an integer-mode (``activation`` ``"dynamic"`` / ``"static"``, int codes)
2-D leaf named ``kernel`` (a Flax ``Dense`` / nnx ``Linear`` kernel, ``(in, out)``) is stored
``(out, in)``. Convolution and ``DenseGeneral`` kernels and weight-only leaves keep the logical
layout (nothing measured says their integer op is faster transposed: weight-only dots convert the
codes to float, which XLA folds into the float dot either way, and a 2-D conv's ``HWIO`` kernel is
the layout XLA's native integer convolution wants); `store_for_integer_dots` stores 3-D conv
kernels for their im2col dot too when asked.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from jaxcompress.execute.weight_view import stored_permutation
from jaxcompress.qarray import QArray

__all__ = [
    "integer_layout",
    "default_contracting_axes",
    "default_layout",
    "with_default_layout",
    "store_for_integer_dots",
    "supports_stored_layout",
]


def default_contracting_axes(shape: Sequence[int]) -> tuple[int, ...] | None:
    """The axes a Flax kernel of this rank contracts, in the order the integer op flattens them:
    ``(in, out)`` Dense -> ``(0,)``; a 3-D conv's ``(*window, in, out)`` -> ``(in, *window)`` (its
    im2col dot). ``None`` for a rank whose integer op wants the logical layout or that does not
    say: a 2-D conv kernel (``HWIO``) is what XLA's native integer convolution takes
    (`jaxcompress.execute.native_conv`), and a 3-D kernel is a ``DenseGeneral`` or a 1-D conv.

    >>> default_contracting_axes((512, 256)), default_contracting_axes((2, 3, 3, 16, 32))
    ((0,), (3, 0, 1, 2))
    >>> default_contracting_axes((3, 3, 16, 32)) is None, default_contracting_axes((3, 16, 32)) is None
    (True, True)
    """
    ndim = len(shape)
    if ndim == 2:
        return (0,)
    if ndim == 5:  # 3-D conv kernels (DHWIO)
        return (ndim - 2,) + tuple(range(ndim - 2))
    return None


def integer_layout(ndim: int, contracting_axes: Sequence[int]) -> tuple[int, ...] | None:
    """The stored axis order that puts ``contracting_axes`` last (in the given order) after the
    other axes (in their order); ``None`` when that is the array's own order.

    >>> integer_layout(2, (0,))            # Dense (in, out) -> stored (out, in)
    (1, 0)
    >>> integer_layout(4, (2, 0, 1))       # HWIO -> stored (O, I, H, W)
    (3, 2, 0, 1)
    >>> integer_layout(2, (1,)) is None    # already (out, in)
    True
    """
    contracting = tuple(int(a) % ndim for a in contracting_axes)
    if len(set(contracting)) != len(contracting):
        raise ValueError(f"integer_layout: contracting_axes {tuple(contracting_axes)} repeat an axis")
    order = tuple(a for a in range(ndim) if a not in contracting) + contracting
    return None if order == tuple(range(ndim)) else order


def _integer_mode(leaf: Any) -> bool:
    return isinstance(leaf, QArray) and leaf.activation != "weight_only" and leaf.qtype == "int"


def default_layout(path: str, q: QArray) -> tuple[int, ...] | None:
    """The stored axis order `jaxcompress.quantize_params` gives ``q`` at leaf ``path`` (a
    ``/``-joined path string) by default: ``(1, 0)`` for an integer-mode 2-D Flax kernel (last
    path key ``kernel``), else ``None`` (logical order). See the module docs.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> q = jc.quantize(jnp.ones((8, 4)), channel_axes=(-1,), activation="dynamic")
    >>> default_layout("params/Dense_0/kernel", q), default_layout("embedding", q)
    ((1, 0), None)
    >>> default_layout("params/Dense_0/kernel", jc.quantize(jnp.ones((8, 4)), channel_axes=(-1,))) is None
    True
    """
    if not _integer_mode(q) or len(q.shape) != 2 or path.rsplit("/", 1)[-1] != "kernel":
        return None
    return integer_layout(2, (0,))


def with_default_layout(params: Any) -> Any:
    """``params`` with every `QArray` re-stored in its `default_layout` (by its path string); the
    one-shot quantizers (GPTQ, SmoothQuant, AWQ) give their results the layout
    `jaxcompress.quantize_params` gives. Other leaves are returned unchanged.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> q = jc.quantize(jnp.ones((8, 4)), channel_axes=(-1,), activation="dynamic")
    >>> with_default_layout({"Dense_0": {"kernel": q}})["Dense_0"]["kernel"].stored_permutation
    (1, 0)
    """
    from jaxcompress.rules import path_to_str

    def convert(path, leaf):
        if not isinstance(leaf, QArray):
            return leaf
        return leaf.with_layout(default_layout(path_to_str(path), leaf))

    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=lambda x: isinstance(x, QArray))


def supports_stored_layout() -> bool:
    """Whether this `QArray` has the ``stored_permutation`` field (see the module docs)."""
    return any(field.name == "stored_permutation" for field in dataclasses.fields(QArray))


def store_for_integer_dots(params: Any, *, contracting_axes: Sequence[int] | None = None) -> Any:
    """``params`` with every integer-mode `QArray` (``activation`` ``"dynamic"`` / ``"static"``,
    int codes) stored in `integer_layout`: the same values, shapes and `dequantize` results, a
    faster `jaxcompress.compressed`. Leaves that are not such `QArray`\\ s, already stored so, or
    of a rank whose contracted axes `default_contracting_axes` cannot tell (pass
    ``contracting_axes`` for those) are returned unchanged.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> q = jc.quantize(jnp.ones((8, 4)), channel_axes=(-1,), activation="dynamic")
    >>> stored = store_for_integer_dots({"kernel": q})["kernel"]
    >>> stored.shape, stored.values.shape
    ((8, 4), (4, 8))
    """
    def convert(leaf):
        if not _integer_mode(leaf):
            return leaf
        if stored_permutation(leaf) is not None:
            return leaf
        axes = default_contracting_axes(leaf.shape) if contracting_axes is None else tuple(contracting_axes)
        if axes is None:
            return leaf
        order = integer_layout(leaf.ndim, axes)
        if order is None:
            return leaf
        return leaf.with_layout(order)

    return jax.tree_util.tree_map(convert, params, is_leaf=lambda x: isinstance(x, QArray))
