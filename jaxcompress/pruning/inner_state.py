"""Find the param-shaped parts of ANY optax state (moments, traces, accumulated gradients).

An optimizer's state holds copies of the params tree (Adam's ``mu`` and ``nu``, momentum's
``trace``, `optax.MultiSteps`'s ``acc_grads``, ...). They are found structurally, with no list of
known state types: a subtree is param-shaped when it flattens to the params' tree structure and
every leaf has the matching param's shape (`optax.MaskedNode` leaves, as `optax.masked` leaves
them, are allowed anywhere). Scalars (step counts, learning rates) never match unless the params
are themselves a single scalar.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcompress.pruning.masktree import is_masked_node

__all__ = ["map_param_trees", "zero_outside"]


def map_param_trees(fn: Callable[[Any], Any], state: Any, params: Any) -> Any:
    """Replace every param-shaped subtree ``t`` of ``state`` by ``fn(t)``.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones(3)}
    >>> state = optax.adam(1e-3).init(params)
    >>> state = map_param_trees(lambda t: {"w": t["w"] + 1}, state, params)
    >>> state[0].mu["w"].tolist(), int(state[0].count)
    ([1.0, 1.0, 1.0], 0)
    """
    param_def = jax.tree_util.tree_structure(params, is_leaf=is_masked_node)
    shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_masked_node)]

    def is_param_tree(node: Any) -> bool:
        if node is None:
            return False
        leaves, treedef = jax.tree_util.tree_flatten(node, is_leaf=is_masked_node)
        if treedef != param_def:  # type: ignore[operator]  # jax ships PyTreeDef without a typed __ne__
            return False
        return all(
            is_masked_node(leaf) or (hasattr(leaf, "shape") and tuple(leaf.shape) == tuple(shape))
            for leaf, shape in zip(leaves, shapes)
        )

    return jax.tree_util.tree_map(
        lambda node: fn(node) if is_param_tree(node) else node, state, is_leaf=is_param_tree
    )


def zero_outside(state: Any, keep: Any, params: Any) -> Any:
    """Zero every param-shaped leaf of ``state`` where the mask tree ``keep`` is False.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones(2), "b": jnp.ones(1)}
    >>> state = optax.sgd(0.1, momentum=0.9).init(params)
    >>> state = jax.tree.map(lambda x: x + 1.0, state)
    >>> state = zero_outside(state, {"w": jnp.array([True, False]), "b": optax.MaskedNode()}, params)
    >>> state[0].trace["w"].tolist(), state[0].trace["b"].tolist()
    ([1.0, 0.0], [1.0])
    """

    def apply(tree: Any) -> Any:
        def one(mask, leaf):
            if is_masked_node(mask) or is_masked_node(leaf) or not hasattr(leaf, "shape"):
                return leaf
            return jnp.where(mask, leaf, jnp.zeros((), leaf.dtype))

        return jax.tree_util.tree_map(one, keep, tree, is_leaf=is_masked_node)

    return map_param_trees(apply, state, params)
