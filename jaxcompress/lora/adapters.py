"""LoRA adapters: which kernels get one (`LoraRule`), the adapter pytree (`LoraAdapter`), `lora_init`, `merge_lora`.

A kernel leaf of shape ``(*stacked, *inputs, *outputs)`` gets the low-rank update
``W + (alpha / rank) * reshape(A @ B)`` with ``A`` of shape ``(*stacked, prod(inputs), rank)``
(small random, he-uniform over the fan-in) and ``B`` of shape ``(*stacked, rank, prod(outputs))``
(zeros, so an untrained adapter leaves the function unchanged). ``stacked`` leading axes hold
layers stacked for a ``scan`` (``nn.scan``): each layer gets its own adapter. ``outputs`` are the
kernel's trailing ``output_axes`` axes (1 for Flax ``Dense`` ``(in, out)`` and ``Conv``
``(*window, in, out)`` kernels; 2 for a ``DenseGeneral`` ``(in, heads, head_dim)`` kernel).

The adapters tree mirrors the params tree, holding a `LoraAdapter` at each adapted kernel's path
(nested dicts keyed by the path's parts), so it is an ordinary pytree of float arrays:
`optax` optimizers, ``optax.masked`` and checkpoints see only the adapters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxcompress._errors import RuleMismatchError
from jaxcompress.qarray import QArray
from jaxcompress.rules import Rule, check_unused_rules, match_rules, normalize_rules, path_to_str

__all__ = ["LoraRule", "LoraAdapter", "LoraTargetError", "lora_init", "merge_lora", "adapter_items", "kernel_split", "lora_delta"]


class LoraTargetError(RuleMismatchError):
    """A LoRA rule matched a leaf that is not a kernel (too few axes, an integer array), an
    adapter does not fit its base leaf, or an adapted weight reaches an op that is not a
    ``dot_general`` / ``conv_general_dilated`` (e.g. an embedding ``gather``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraRule(Rule):
    """Give the kernels whose path matches ``pattern`` a LoRA adapter.

    Attributes:
      rank: the adapter's rank ``r`` (``None``: `lora_init`'s ``rank``).
      alpha: the update is scaled by ``alpha / rank`` (``None``: `lora_init`'s ``alpha``).
      output_axes: how many trailing axes of the kernel are its outputs (the rest, after the
        stacked axes, are contracted with the input).
      stacked_axes: how many leading axes stack layers (each slice gets its own adapter).
      skip: claim the matched leaves and leave them without an adapter (first match wins).

    >>> LoraRule(pattern=r".*(q|v)_proj/kernel", rank=4).rank
    4
    """

    rank: int | None = None
    alpha: float | None = None
    output_axes: int = 1
    stacked_axes: int = 0
    skip: bool = False

    def __post_init__(self) -> None:
        Rule.__post_init__(self)
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"LoraRule({self.pattern!r}): rank must be a positive int, got {self.rank!r}")
        if self.output_axes < 1 or self.stacked_axes < 0:
            raise ValueError(f"LoraRule({self.pattern!r}): output_axes must be >= 1 and stacked_axes >= 0, got {self.output_axes}, {self.stacked_axes}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """The low-rank update of one kernel: ``a`` ``(*stacked, in, rank)``, ``b`` ``(*stacked, rank,
    out)``, scaled by ``alpha / rank``; ``output_axes`` / ``stacked_axes`` as in `LoraRule`.

    >>> import jax.numpy as jnp
    >>> adapter = LoraAdapter(jnp.ones((6, 2)), jnp.zeros((2, 3)), alpha=4.0)
    >>> adapter.rank, adapter.scale
    (2, 2.0)
    """

    a: jax.Array
    b: jax.Array
    alpha: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    output_axes: int = dataclasses.field(default=1, metadata=dict(static=True))
    stacked_axes: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


def kernel_split(shape: Sequence[int], output_axes: int, stacked_axes: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(stacked, inputs, outputs)`` parts of a kernel shape."""
    shape = tuple(int(d) for d in shape)
    return shape[:stacked_axes], shape[stacked_axes : len(shape) - output_axes], shape[len(shape) - output_axes :]


def check_fits(adapter: LoraAdapter, shape: Sequence[int], where: str) -> None:
    """Raise `LoraTargetError` unless ``adapter`` fits a base leaf of ``shape``."""
    if len(shape) < adapter.stacked_axes + adapter.output_axes + 1:
        raise LoraTargetError(f"{where}: a base leaf of shape {tuple(shape)} has no input axes for an adapter with {adapter.stacked_axes} stacked and {adapter.output_axes} output axes")
    stacked, inputs, outputs = kernel_split(shape, adapter.output_axes, adapter.stacked_axes)
    rank = adapter.rank
    want_a, want_b = stacked + (math.prod(inputs), rank), stacked + (rank, math.prod(outputs))
    if tuple(adapter.a.shape) != want_a or tuple(adapter.b.shape) != want_b:
        raise LoraTargetError(
            f"{where}: adapter shapes a {tuple(adapter.a.shape)}, b {tuple(adapter.b.shape)} do not fit the base leaf of shape "
            f"{tuple(shape)} (expected a {want_a}, b {want_b})"
        )


def lora_delta(adapter: LoraAdapter, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """The dense update ``(alpha / rank) * A @ B`` in the kernel's ``shape`` (for `merge_lora`
    and the few sites where the factorised product cannot be used)."""
    delta = jnp.matmul(adapter.a.astype(jnp.float32), adapter.b.astype(jnp.float32)) * adapter.scale
    return delta.reshape(tuple(shape)).astype(dtype)


def _is_node(x: Any) -> bool:
    return isinstance(x, (QArray, LoraAdapter))


def adapter_items(adapters: Any) -> dict[str, LoraAdapter]:
    """``{path string: adapter}`` of an adapters tree (paths as rules see them)."""
    flat = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: isinstance(x, LoraAdapter))[0]
    items = {}
    for path, leaf in flat:
        if not isinstance(leaf, LoraAdapter):
            raise TypeError(f"adapters{jax.tree_util.keystr(path)}: expected a LoraAdapter (an adapters tree from lora_init), got {type(leaf).__name__}")
        items[path_to_str(path)] = leaf
    return items


def _nest(items: dict[str, LoraAdapter]) -> dict:
    tree: dict = {}
    for path, adapter in items.items():
        node = tree
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = adapter
    return tree


def _he_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: Any) -> jax.Array:
    limit = math.sqrt(6.0 / fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -limit, limit).astype(dtype)


def lora_init(
    key: jax.Array,
    params: Any,
    rules: LoraRule | Sequence[LoraRule],
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dtype: Any = jnp.float32,
    on_unused: str = "warn",
) -> dict:
    """Adapters for the kernels of ``params`` the ``rules`` match (float or `QArray` leaves).

    Args:
      key: PRNG key for the ``A`` factors (``B`` starts at zero).
      params: the base params tree (float arrays and / or `QArray`\\ s).
      rules: `LoraRule`\\ s, first full match wins.
      rank, alpha: defaults for rules that do not set their own.
      dtype: the adapters' dtype.
      on_unused: ``"warn"``, ``"error"`` or ``"ignore"`` for a rule that matched no leaf.

    Returns:
      The adapters tree: nested dicts (one key per part of the kernel's path) ending in
      `LoraAdapter`\\ s. A matched leaf that is not a kernel raises `LoraTargetError` naming it.

    >>> import jax, jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((6, 3)), "bias": jnp.zeros(3)}}
    >>> adapters = lora_init(jax.random.key(0), params, LoraRule(pattern=r".*kernel"), rank=2)
    >>> adapters["dense"]["kernel"].a.shape, adapters["dense"]["kernel"].b.shape
    ((6, 2), (2, 3))
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_init: rank must be a positive int, got {rank!r}")
    rule_list = normalize_rules(rules)
    for i, rule in enumerate(rule_list):
        if not isinstance(rule, LoraRule):
            raise TypeError(f"lora_init: rules[{i}] must be a LoraRule, got {type(rule).__name__}")
    match = match_rules(params, rule_list)
    check_unused_rules(rule_list, match.unused_rules, on_unused)
    items: dict[str, LoraAdapter] = {}
    for index, (path, leaf, rule_index) in enumerate(zip(match.path_strs, match.leaves, match.rule_indices)):
        if rule_index is None:
            continue
        rule = rule_list[rule_index]
        if rule.skip:
            continue
        shape = tuple(leaf.shape) if hasattr(leaf, "shape") else ()
        leaf_dtype = leaf.dtype if isinstance(leaf, QArray) else getattr(leaf, "dtype", None)
        where = f"lora_init: params/{path} (rules[{rule_index}], pattern {rule.pattern!r})"
        if leaf_dtype is None or not jnp.issubdtype(leaf_dtype, jnp.floating):
            raise LoraTargetError(f"{where}: not a float kernel (dtype {leaf_dtype}); narrow the pattern")
        if len(shape) < rule.stacked_axes + rule.output_axes + 1:
            raise LoraTargetError(
                f"{where}: shape {shape} is not a kernel with {rule.stacked_axes} stacked axes, input axes and "
                f"{rule.output_axes} output axes (a bias or norm scale?); narrow the pattern"
            )
        leaf_rank = rule.rank if rule.rank is not None else rank
        stacked, inputs, outputs = kernel_split(shape, rule.output_axes, rule.stacked_axes)
        fan_in = math.prod(inputs)
        a = _he_uniform(jax.random.fold_in(key, index), stacked + (fan_in, leaf_rank), fan_in, dtype)
        b = jnp.zeros(stacked + (leaf_rank, math.prod(outputs)), dtype)
        items[path] = LoraAdapter(a, b, float(rule.alpha if rule.alpha is not None else alpha), rule.output_axes, rule.stacked_axes)
    return _nest(items)


def merge_lora(base: Any, adapters: Any, dtype: Any = None) -> Any:
    """The float params tree with every adapter merged in: ``W + (alpha / rank) A @ B``.

    `QArray` leaves are dequantized (adapted or not), so the result is a plain float tree ready
    to be quantized again for deployment (`jaxcompress.quantize_params`).

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> params = {"w": jnp.ones((4, 2))}
    >>> qbase, _ = jc.quantize_params(params, [jc.QuantRule(pattern="w", bits=8, channel_axes=(-1,))])
    >>> adapters = lora_init(jax.random.key(0), qbase, LoraRule(pattern="w"), rank=1)
    >>> merged = merge_lora(qbase, adapters)
    >>> bool(jnp.allclose(merged["w"], 1.0, atol=1e-2))
    True
    """
    items = adapter_items(adapters)
    flat, treedef = jax.tree_util.tree_flatten_with_path(base, is_leaf=_is_node)
    out = []
    for path, leaf in flat:
        name = path_to_str(path)
        value = leaf.dequantize(dtype) if isinstance(leaf, QArray) else leaf
        adapter = items.pop(name, None)
        if adapter is not None:
            check_fits(adapter, value.shape, f"merge_lora: params/{name}")
            value = (value.astype(jnp.float32) + lora_delta(adapter, value.shape)).astype(dtype or value.dtype)
        out.append(value)
    if items:
        raise LoraTargetError(f"merge_lora: adapters for paths the base does not have: {sorted(items)[:5]}")
    return jax.tree_util.tree_unflatten(treedef, out)
