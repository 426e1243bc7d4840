"""`lora_apply(fn)`: run an unmodified function with LoRA adapters over a (quantized) base: a rule set on the program layer.

``fn`` is traced once (`jaxcompress._program.trace_call`) and evaluated by the program layer's
`Evaluator` with the integer-execution rule set (`jaxcompress.execute.rules`) extended by one
value kind, ``"adapted"``: an adapted kernel (`_Adapted`: its base, seen as a quantized
`WeightView` for a `QArray` or as the float array, plus its `LoraAdapter`). The rules:

* a layout op applies to the base (a `WeightView` follows it without dequantizing) and is
  recorded; transposes keep track of which kernel axis each axis is;
* ``dot_general``: the base's dot (for a `QArray`: the weight-only dot, the codes converted
  inside the op, never stored as float) plus the factorised low-rank term
  ``scale * (x @ A) @ B`` contracted over the dot's own axes, where the dot contracts exactly the
  kernel's input axes (every Dense / DenseGeneral / einsum / attention kernel seen through
  transposes); elsewhere the term is ``x`` against the dense update seen through the same layout
  ops (correct; the update, not the base, is materialised);
* ``conv_general_dilated``: the base's conv plus ``conv(x, A) @ B`` (ungrouped convs; a grouped
  conv uses the dense update);
* call-like bodies are inlined and ``scan`` / ``cond`` / ``while`` rebuilt by the program layer;
  layers stacked along a scan's ``xs`` are sliced together with their adapters;
* an adapted kernel reaching any other op (e.g. an embedding ``gather``) raises
  `LoraTargetError` naming the leaf and the op: LoRA adapts contraction kernels. A kernel in a
  loop carry is materialised (base + update).

Every `QArray` of the base, adapted or not, runs weight-only (float activations), so the
function is differentiable in the adapters: gradients flow into ``A`` and ``B`` only (the base
is an argument nobody differentiates). It composes with ``jax.jit``, ``jax.grad``, ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcompress._program import PLAIN, Evaluator, RuleSet, TraceCache, bind, leaf_name, params_path, trace_call
from jaxcompress.execute.rules import ExecutionOptions, unstack_view, weight_rules
from jaxcompress.execute.weight_view import WeightView
from jaxcompress.lora.adapters import LoraAdapter, LoraTargetError, adapter_items, check_fits, kernel_split, lora_delta
from jaxcompress.qarray import InvalidQArrayError, QArray, check_qarray

__all__ = ["lora_apply", "lora_rules"]

_FOLLOWED = ("copy", "copy_p", "transpose", "reshape", "broadcast_in_dim", "squeeze", "convert_element_type", "slice")


@dataclasses.dataclass(frozen=True)
class _Adapted:
    """An adapted kernel on its way to a contraction (kind ``"adapted"``).

    ``axes[i]`` is the kernel axis (of the leaf, stacked axes first) axis ``i`` of ``base`` is,
    while only transposes were applied (``None`` after any other layout op); ``ops`` are the
    layout equations applied since the leaf (replayed on the dense update where needed)."""

    base: Any  # WeightView or a float array
    adapter: LoraAdapter
    shape: tuple[int, ...]  # the (possibly sliced) leaf's shape
    name: str
    axes: tuple[int, ...] | None
    ops: tuple = ()

    @property
    def delta(self) -> jax.Array:
        return lora_delta(self.adapter, self.shape)


def _classify(value: Any) -> str:
    if isinstance(value, _Adapted):
        return "adapted"
    return "weight" if isinstance(value, WeightView) else PLAIN


def _base_plain(base: Any, aval: Any = None) -> Any:
    return base.dequantize(getattr(aval, "dtype", None)) if isinstance(base, WeightView) else base


def _replay(value: jax.Array, ops: tuple) -> jax.Array:
    for eqn in ops:
        value = bind(eqn, [value])[0]
    return value


def _dense(value: _Adapted, aval: Any = None) -> jax.Array:
    """Base + update, seen through the recorded layout ops (a plain float array)."""
    base = _base_plain(value.base, aval)
    update = _replay(value.delta.astype(jnp.result_type(base.dtype, jnp.float32)), value.ops)
    return (base + update).astype(base.dtype)


def _materialize(value: Any, aval: Any) -> jax.Array:
    if isinstance(value, _Adapted):
        return _dense(value, aval)
    return _base_plain(value, aval)


def _unstack(value: Any) -> tuple[Any, Callable[[Any], Any]]:
    if isinstance(value, WeightView):
        return unstack_view(value)
    adapter = value.adapter
    if adapter.stacked_axes == 0 or value.ops or value.axes != tuple(range(len(value.shape))):
        dense = _dense(value)  # not the stored stacked layout: the scan slices plain layers
        return dense, lambda sliced: sliced
    if isinstance(value.base, WeightView):
        base_arrays, rebuild_base = unstack_view(value.base)
    else:
        base_arrays, rebuild_base = value.base, (lambda sliced: sliced)
    axes = tuple(range(len(value.shape) - 1))

    def rebuild(sliced):
        base, a, b = sliced
        layer = dataclasses.replace(adapter, a=a, b=b, stacked_axes=adapter.stacked_axes - 1)
        return dataclasses.replace(value, base=rebuild_base(base), adapter=layer, shape=value.shape[1:], axes=axes)

    return (base_arrays, adapter.a, adapter.b), rebuild


def _layout(ev: Evaluator, eqn, invals: list) -> list:
    value = invals[0]
    if len(invals) != 1:
        return bind(eqn, ev.plain_inputs(eqn, invals))
    base = ev.equation(eqn, [value.base])[0]
    axes = value.axes
    name = eqn.primitive.name
    if axes is not None and name == "transpose":
        axes = tuple(axes[p] for p in eqn.params["permutation"])
    elif name not in ("copy", "copy_p", "convert_element_type"):
        axes = None
    return [dataclasses.replace(value, base=base, axes=axes, ops=value.ops + (eqn,))]


def _low_rank_dot(x: jax.Array, value: _Adapted, x_contract, w_contract, side: str, out_dtype) -> jax.Array | None:
    """``scale * (x @ A) @ B`` laid out as the dot's output, or ``None`` where the dot does not
    contract exactly the kernel's (unstacked) input axes."""
    adapter, axes = value.adapter, value.axes
    if axes is None or adapter.stacked_axes:
        return None
    _, inputs, outputs = kernel_split(value.shape, adapter.output_axes, 0)
    kernel_contract = [axes[a] for a in w_contract]
    if sorted(kernel_contract) != list(range(len(inputs))):
        return None
    compute = jnp.result_type(x.dtype, adapter.a.dtype)
    a = adapter.a.astype(compute).reshape(inputs + (adapter.rank,))
    projected = jax.lax.dot_general(x.astype(compute), a, ((tuple(x_contract), tuple(kernel_contract)), ((), ())))
    low = jnp.matmul(projected, adapter.b.astype(compute)) * adapter.scale
    x_free = projected.ndim - 1
    low = low.reshape(low.shape[:x_free] + outputs)
    w_free = [axes[a] - len(inputs) for a in range(len(axes)) if a not in w_contract]
    order = [x_free + k for k in w_free]
    permutation = list(range(x_free)) + order if side == "rhs" else order + list(range(x_free))
    return jnp.transpose(low, permutation).astype(out_dtype)


def _dot(ev: Evaluator, eqn, invals: list) -> list:
    lhs, rhs = invals
    if isinstance(lhs, _Adapted) and isinstance(rhs, _Adapted):
        return bind(eqn, ev.plain_inputs(eqn, invals))
    side = "lhs" if isinstance(lhs, _Adapted) else "rhs"
    value, x = (lhs, rhs) if side == "lhs" else (rhs, lhs)
    x = ev.plain(x)
    out_dtype = eqn.outvars[0].aval.dtype
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    base_out = ev.equation(eqn, [x, value.base] if side == "rhs" else [value.base, x])[0]
    x_contract, w_contract = (lhs_contract, rhs_contract) if side == "rhs" else (rhs_contract, lhs_contract)
    low = None if (lhs_batch or rhs_batch) else _low_rank_dot(x, value, x_contract, w_contract, side, out_dtype)
    if low is None:
        update = _replay(value.delta.astype(jnp.result_type(x.dtype, jnp.float32)), value.ops)
        low = bind(eqn, [x, update] if side == "rhs" else [update, x])[0]
    return [(base_out + low).astype(out_dtype)]


def _conv(ev: Evaluator, eqn, invals: list) -> list:
    x, value = invals
    if isinstance(x, _Adapted) or not isinstance(value, _Adapted):
        raise LoraTargetError(f"{(x if isinstance(x, _Adapted) else value).name}: an adapted kernel is a conv's input, not its kernel")
    params = eqn.params
    out_dtype = eqn.outvars[0].aval.dtype
    base_out = ev.equation(eqn, [x, value.base])[0]
    adapter, axes = value.adapter, value.axes
    rhs_spec, out_spec = params["dimension_numbers"].rhs_spec, params["dimension_numbers"].out_spec
    _, inputs, outputs = kernel_split(value.shape, adapter.output_axes, adapter.stacked_axes)
    factorised = (
        axes is not None
        and adapter.stacked_axes == 0
        and adapter.output_axes == 1
        and params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
        and axes[rhs_spec[0]] == len(inputs)
    )
    if not factorised or axes is None:
        update = _replay(value.delta.astype(jnp.result_type(x.dtype, jnp.float32)), value.ops)
        return [(base_out + bind(eqn, [x, update])[0]).astype(out_dtype)]
    compute = jnp.result_type(x.dtype, adapter.a.dtype)
    a = adapter.a.astype(compute).reshape(inputs + (adapter.rank,))  # kernel order, rank last
    a = jnp.transpose(a, axes)  # the conv's own kernel layout
    projected = bind(eqn, [x.astype(compute), a])[0]
    feature = out_spec[1]
    low = jnp.moveaxis(jnp.tensordot(projected, adapter.b.astype(compute), axes=([feature], [0])), -1, feature)
    return [(base_out + low * adapter.scale).astype(out_dtype)]


def _default(ev: Evaluator, eqn, invals: list) -> list:
    for value in invals:
        if isinstance(value, _Adapted):
            raise LoraTargetError(
                f"{value.name}: an adapted kernel reaches `{eqn.primitive.name}`; LoRA adapts the kernels of "
                f"dot_general / conv_general_dilated (narrow the LoraRule pattern)"
            )
    return bind(eqn, ev.plain_inputs(eqn, invals))


def lora_rules() -> RuleSet:
    """The LoRA `RuleSet`: kinds ``"adapted"`` then ``"weight"`` (the integer-execution rules)."""
    base = weight_rules()
    adapted = {(name, "adapted"): _layout for name in _FOLLOWED}
    adapted[("dot_general", "adapted")] = _dot
    adapted[("conv_general_dilated", "adapted")] = _conv
    return base.extend(adapted, kinds=("adapted", "weight"), classify=_classify, materialize=_materialize, unstack=_unstack, default=_default)


_RULES = lora_rules()
_OPTIONS = ExecutionOptions(weight_only=True)


def _inputs(traced, adapters: dict[str, LoraAdapter]) -> list:
    remaining = dict(adapters)
    inputs = []
    for position in traced.dynamic_positions:
        leaf, path = traced.leaves[position], traced.paths[position]
        name = leaf_name(path)
        if isinstance(leaf, QArray):
            try:
                check_qarray(leaf, strict=True)
            except InvalidQArrayError as error:
                raise InvalidQArrayError(f"{name}: {error}") from None
            value: Any = WeightView.from_qarray(leaf, name=name, leaf_index=position, path=params_path(path, 0))
        else:
            value = leaf
        key = params_path(path, 0)
        adapter = remaining.pop(key, None) if key is not None else None
        if adapter is not None:
            check_fits(adapter, leaf.shape, f"lora_apply: {name}")
            value = _Adapted(value, adapter, tuple(leaf.shape), name, tuple(range(len(leaf.shape))))
        inputs.append(value)
    if remaining:
        raise LoraTargetError(f"lora_apply: adapters for paths the base params do not have (or that are not arrays): {sorted(remaining)[:5]}")
    return inputs


def lora_apply(fn: Callable) -> Callable:
    """``g(base, adapters, *args, **kwargs)``: ``fn(base, *args, **kwargs)`` with every adapted
    kernel ``W`` replaced by ``W + (alpha / rank) A @ B`` (see the module docs for how).

    ``base`` may hold `QArray`\\ s (int8 / int4 / ...): they stay quantized, each dot converts
    their codes inside the op (weight-only), and the adapters' term is computed as
    ``(x @ A) @ B``. Differentiate ``g`` in ``adapters`` to train them (`lora_train_step`).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxcompress as jc
    >>> from jaxcompress.lora import LoraRule, lora_init, lora_apply
    >>> model = nn.Dense(4)
    >>> x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)
    >>> qbase, _ = jc.quantize_params(params, [jc.QuantRule(pattern=".*kernel", bits=4, channel_axes=(-1,))])
    >>> adapters = lora_init(jax.random.key(1), qbase, LoraRule(pattern=".*kernel"), rank=2)
    >>> y = jax.jit(lora_apply(model.apply))(qbase, adapters, x)
    >>> bool(jnp.allclose(y, jc.compressed(model.apply, policy="weight_only")(qbase, x), atol=1e-5))
    True
    """
    cache = TraceCache()

    @functools.wraps(fn)
    def adapted(base: Any, adapters: Any, *args: Any, **kwargs: Any) -> Any:
        items = adapter_items(adapters)
        traced = trace_call(fn, (base,) + tuple(args), dict(kwargs), cache)
        evaluator = Evaluator(_RULES, context=_OPTIONS)
        outs = evaluator.run_plain(traced.closed.jaxpr, traced.closed.consts, _inputs(traced, items))
        return jax.tree_util.tree_unflatten(traced.out_tree, outs)

    return adapted
