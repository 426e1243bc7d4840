"""Which params leaves a one-shot method captures, and how a batch becomes ``fn``'s arguments."""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcompress.rules import path_to_str


def make_selector(select: Any) -> Callable[[str], bool]:
    """``select`` as a predicate on path strings: a callable as is; a regex string, a rule
    (anything with a regex ``.pattern``), or a sequence of them: the first that fully matches
    decides, and a rule with ``skip=True`` deselects.

    >>> make_selector([".*kernel"])("Dense_0/kernel"), make_selector("a")("ab")
    (True, False)
    """
    if callable(select) and not hasattr(select, "pattern"):
        return select
    if isinstance(select, str) or hasattr(select, "pattern"):
        select = [select]
    compiled = []
    for i, item in enumerate(select):
        pattern = item if isinstance(item, str) else getattr(item, "pattern", None)
        if not isinstance(pattern, str):
            raise TypeError(f"select[{i}] is {item!r}: expected a regex string, a rule with a regex .pattern, or a callable")
        compiled.append((re.compile(pattern), bool(getattr(item, "skip", False))))

    def selector(path: str) -> bool:
        for pattern, skip in compiled:
            if pattern.fullmatch(path):
                return not skip
        return False

    return selector


def batch_args(batch: Any) -> tuple:
    """A batch as the positional arguments after params: a tuple is spread, anything else is one."""
    return tuple(batch) if isinstance(batch, tuple) else (batch,)


def _float_paths(params: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {}
    for path, leaf in flat:
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape") and jnp.issubdtype(leaf.dtype, jnp.floating):
            out[path_to_str(path)] = tuple(leaf.shape)
    return out


def _call(fn, params, batch, params_argnum):
    rest = batch_args(batch)
    return rest[:params_argnum] + (params,) + rest[params_argnum:]
