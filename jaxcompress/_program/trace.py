"""Trace an unmodified function once, with float stand-ins for its `QArray`\\ s (the program layer's input).

`trace_call` flattens ``(args, kwargs)`` (a `QArray` counts as one leaf) and traces ``fn`` to a
jaxpr with a float ``ShapeDtypeStruct`` of each `QArray`'s shape and original dtype in its place
(plus the shapes of the other array leaves; non-array leaves such as ``deterministic=True`` stay
Python values, as they were in the call). Every feature then evaluates that jaxpr with the one
`Evaluator` and its own rule set. Under an outer ``jax.jit`` / ``jax.vmap`` the arrays are
tracers and the whole thing is just more tracing.

Jaxprs are cached per call signature (tree structure, shapes, dtypes, static leaves) on the
`TraceCache` the caller passes, so repeated eager calls do not re-trace ``fn``.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from jaxcompress.qarray import QArray
from jaxcompress.rules import path_to_str

__all__ = ["ProgramTraceError", "trace_call", "TracedCall", "TraceCache", "is_qarray", "leaf_name", "params_path"]


class ProgramTraceError(TypeError):
    """The function cannot be traced once with abstract arguments (it reads an argument's value)."""


def is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)


def leaf_name(path) -> str:
    """``args[0]['params']['Dense_0']['kernel']`` for error messages."""
    head, rest = path[0], path[1:]
    if getattr(head, "idx", None) == 0 and rest:
        return f"args[{rest[0].idx}]" + jax.tree_util.keystr(tuple(rest[1:]))
    return "kwargs" + jax.tree_util.keystr(tuple(rest))


class TraceCache:
    """A small bounded cache of traced jaxprs, keyed by call signature."""

    def __init__(self, size: int = 32):
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        if key is None or key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key, value):
        if key is None:
            return
        self._entries[key] = value
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def _signature(treedef, stand_ins, statics):
    try:
        key = (treedef, tuple((s.shape, str(s.dtype), s.weak_type) for s in stand_ins), tuple(statics))
        hash(key)
        return key
    except TypeError:
        return None


class TracedCall(NamedTuple):
    """A traced call: the jaxpr, the output tree, and where each jaxpr input came from."""

    closed: Any
    out_tree: Any
    paths: list  # key paths of all flattened leaves of ``(args, kwargs)``
    leaves: list  # the leaves themselves
    dynamic_positions: list  # positions (in ``leaves``) of the jaxpr's inputs, in order
    treedef: Any  # the structure of ``(args, kwargs)``, a `QArray` one leaf

    def call_args(self, dynamic) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the call with ``dynamic`` in place of its array leaves (in
        ``dynamic_positions`` order); Python values stay as they were."""
        return _fill(self.treedef, self.leaves, self.dynamic_positions, dynamic)


def _fill(treedef, leaves: list, positions: list, dynamic) -> Any:
    filled = list(leaves)
    for position, value in zip(positions, dynamic):
        filled[position] = value
    return jax.tree_util.tree_unflatten(treedef, filled)


def trace_call(fn: Callable, args: tuple, kwargs: dict, cache: TraceCache | None = None) -> TracedCall:
    """Trace ``fn(*args, **kwargs)`` to a jaxpr whose inputs are the array leaves of the call
    (a `QArray` counts as one leaf and is traced as a float array of its shape and dtype); other
    leaves stay Python values. Cached per call signature on ``cache``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path((tuple(args), dict(kwargs)), is_leaf=is_qarray)
    paths = [p for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    dynamic_positions, stand_ins, statics = [], [], []
    for position, leaf in enumerate(leaves):
        if isinstance(leaf, QArray):
            stand_ins.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        elif _is_array(leaf):
            aval = jax.typeof(leaf)
            stand_ins.append(jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type))
        else:
            statics.append((position, leaf))
            continue
        dynamic_positions.append(position)

    key = _signature(treedef, stand_ins, statics)
    traced = cache.get(key) if cache is not None else None
    if traced is None:

        def flat_fn(*dynamic):
            call_args, call_kwargs = _fill(treedef, leaves, dynamic_positions, dynamic)
            return fn(*call_args, **call_kwargs)

        try:
            closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*stand_ins)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, jax.errors.TracerIntegerConversionError) as error:
            name = getattr(fn, "__qualname__", type(fn).__name__)
            raise ProgramTraceError(
                f"{name}: the function reads the VALUE of an argument while it is traced (Python control flow "
                f"or a NumPy conversion on an array, e.g. `if params[...].sum() > 0:`). jaxcompress traces the "
                f"function once with abstract stand-ins for its arrays (QArray weights included), so branch "
                f"with jax.lax.cond / jnp.where, or mark the argument static. JAX said: {error}"
            ) from error
        traced = (closed, jax.tree_util.tree_structure(out_shape))
        if cache is not None:
            cache.put(key, traced)
    closed, out_tree = traced
    return TracedCall(closed, out_tree, paths, leaves, dynamic_positions, treedef)


def params_path(path, params_argnum: int) -> str | None:
    """The ``/``-joined path (as rules see it) of a flattened call leaf inside positional argument
    ``params_argnum``, or ``None`` for a leaf of another argument."""
    if len(path) >= 2 and getattr(path[0], "idx", None) == 0 and getattr(path[1], "idx", None) == params_argnum:
        return path_to_str(tuple(path[2:]))
    return None
