"""Rules: which leaves of a params pytree to transform, and how.

A rule is a frozen, keyword-only dataclass whose ``pattern`` is a regular expression matched in
full (`re.fullmatch`) against the leaf's path string: the tree's keys joined by ``/``, e.g.
``"params/Conv_0/kernel"`` for a linen params dict, ``"layers/0/kernel"`` for an nnx ``State``
(the ``.value`` of an nnx ``Variable`` is dropped from the path), ``"2/w"`` for a list, field
names for NamedTuples and dataclasses. For every leaf the FIRST rule that matches wins; leaves no
rule matches pass through untouched. Which rule matched which leaf, and which rules matched
nothing, is returned as data (`RuleMatch`) so the caller can report it.

This module holds the generic machinery (`path_to_str`, `match_rules`) used by quantization and
pruning alike, and the quantization rule `QuantRule`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable, Iterable, Protocol, Sequence

import jax

from jaxcompress.qarray import QArray
from jaxcompress.quant.spec import QuantSpec

__all__ = [
    "Rule",
    "QuantRule",
    "RuleMatch",
    "LeafDecisions",
    "path_to_str",
    "path_to_keystr",
    "match_rules",
    "check_unused_rules",
]


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _strip_variable_value(path: tuple) -> tuple:
    # nnx Variables flatten to their `.value`; users name the variable, not its field.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in ("value", "raw_value"):
        return path[:-1]
    return path


def path_to_str(path: Sequence[Any]) -> str:
    """A key path as the ``/``-joined string rules are matched against.

    >>> import jax
    >>> leaves = jax.tree_util.tree_flatten_with_path({"Dense_0": {"kernel": 1}, "layers": [2]})[0]
    >>> [path_to_str(p) for p, _ in leaves]
    ['Dense_0/kernel', 'layers/0']
    """
    return "/".join(_key_name(k) for k in _strip_variable_value(tuple(path)))


def path_to_keystr(path: Sequence[Any], root: str = "params") -> str:
    """A key path as Python indexing, for error messages: ``params['conv_1']['kernel']``."""
    return root + jax.tree_util.keystr(_strip_variable_value(tuple(path)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Base of all rules: a regex ``pattern`` matched in full against a leaf's path string.

    >>> Rule(pattern=r".*/kernel").matches("Dense_0/kernel")
    True
    """

    pattern: str

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"rule pattern must be a string, got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"rule pattern {self.pattern!r} is not a valid regex: {err}") from None

    def matches(self, path: str) -> bool:
        return _compiled(self.pattern).fullmatch(path) is not None


_REGEX_CACHE: dict[str, re.Pattern] = {}


def _compiled(pattern: str) -> re.Pattern:
    compiled = _REGEX_CACHE.get(pattern)
    if compiled is None:
        compiled = _REGEX_CACHE[pattern] = re.compile(pattern)
    return compiled


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule(Rule, QuantSpec):
    """Quantize the leaves whose path matches ``pattern`` with the `QuantSpec` fields given here.

    ``skip=True`` makes a rule that claims leaves and leaves them alone (first match wins, so an
    early skip rule excludes e.g. the embedding from a later catch-all rule).

    >>> QuantRule(pattern=r".*kernel", bits=4, channel_axes=(-1,), group_size=128).spec.bits
    4
    """

    skip: bool = False

    def __post_init__(self):
        Rule.__post_init__(self)
        QuantSpec.__post_init__(self)

    @property
    def spec(self) -> QuantSpec:
        """The plain `QuantSpec` part of this rule."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(QuantSpec)}
        return QuantSpec(**fields)


class _Decision(Protocol):
    @property
    def path(self) -> str: ...

    @property
    def action(self) -> str: ...


class LeafDecisions:
    """Mixin for reports whose ``leaves`` carry ``.path`` and ``.action`` (what a transform did
    with each leaf): the paths of each kind of decision."""

    leaves: Sequence[_Decision]  # declared by the report dataclass that mixes this in

    def paths_with(self, action: str) -> tuple[str, ...]:
        """The paths of the leaves whose decision is ``action``, in flattening order."""
        return tuple(d.path for d in self.leaves if d.action == action)

    @property
    def skipped(self) -> tuple[str, ...]:
        return self.paths_with("skipped")

    @property
    def unmatched(self) -> tuple[str, ...]:
        return self.paths_with("unmatched")


@dataclasses.dataclass(frozen=True)
class RuleMatch:
    """The result of matching rules against a tree's leaves.

    Attributes:
      paths: each leaf's key path (tuple of jax keys), in flattening order.
      path_strs: each leaf's ``/``-joined path string.
      leaves: the leaves themselves.
      rule_indices: per leaf, the index of the first matching rule, or ``None``.
      unused_rules: indices of rules that matched no leaf.
      treedef: the tree structure, to rebuild the tree with `unflatten`.
    """

    paths: tuple
    path_strs: tuple[str, ...]
    leaves: tuple
    rule_indices: tuple[int | None, ...]
    unused_rules: tuple[int, ...]
    treedef: Any

    def unflatten(self, leaves: Iterable[Any]) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))


def _is_leaf_default(x: Any) -> bool:
    return isinstance(x, QArray)


def match_rules(
    tree: Any,
    rules: Sequence[Rule] | Rule,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
) -> RuleMatch:
    """Match ``rules`` against every leaf of ``tree`` (first full match wins).

    `QArray` nodes count as leaves. ``is_leaf`` can mark more node types as leaves.

    >>> m = match_rules({"a": {"kernel": 1, "bias": 2}}, [Rule(pattern=".*kernel"), Rule(pattern="x")])
    >>> m.path_strs, m.rule_indices, m.unused_rules
    (('a/bias', 'a/kernel'), (None, 0), (1,))
    """
    rules = normalize_rules(rules)
    leaf_test = _is_leaf_default if is_leaf is None else (lambda x: _is_leaf_default(x) or is_leaf(x))
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf_test)
    paths = tuple(p for p, _ in flat)
    leaves = tuple(leaf for _, leaf in flat)
    path_strs = tuple(path_to_str(p) for p in paths)
    indices: list[int | None] = []
    used = set()
    for path in path_strs:
        index = next((i for i, rule in enumerate(rules) if rule.matches(path)), None)
        indices.append(index)
        if index is not None:
            used.add(index)
    unused = tuple(i for i in range(len(rules)) if i not in used)
    return RuleMatch(paths, path_strs, leaves, tuple(indices), unused, treedef)


def normalize_rules(rules: Sequence[Rule] | Rule) -> tuple:
    if isinstance(rules, Rule):
        return (rules,)
    rules = tuple(rules)
    for i, rule in enumerate(rules):
        if not isinstance(rule, Rule):
            raise TypeError(f"rules[{i}] is not a rule (a dataclass with a regex `pattern`): {rule!r}")
    return rules


def check_unused_rules(rules: Sequence[Any], unused: Sequence[int], on_unused: str) -> None:
    """Warn about (or raise for) rules that matched no leaf, per ``on_unused``."""
    if on_unused not in ("warn", "error", "ignore"):
        raise ValueError(f"on_unused must be 'warn', 'error' or 'ignore', got {on_unused!r}")
    if not unused or on_unused == "ignore":
        return
    listing = ", ".join(f"rules[{i}] (pattern {rules[i].pattern!r})" for i in unused)
    message = f"{len(unused)} rule(s) matched no leaf: {listing}"
    if on_unused == "error":
        raise ValueError(message)
    warnings.warn(message, UserWarning, stacklevel=3)
