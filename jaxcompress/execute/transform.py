"""`compressed(fn)`: run an unmodified JAX function with quantized params on integer ops.

The function is traced to a jaxpr with a float stand-in for every `QArray` in its arguments and
the jaxpr is evaluated by the program layer with the integer-execution rule set
(`jaxcompress.execute.rules`) (as ``jax.vmap`` or quax do; nothing in jax or flax is patched):
where a `QArray` weight -- possibly transposed, reshaped, broadcast or converted on the way --
meets ``dot_general`` or ``conv_general_dilated`` the quantized op of its activation mode runs:

=================  ==========================================================================
``weight_only``    float activation, float dot / conv with the weight converted from its codes
``dynamic``        int8 activation (per-row absmax scale computed at run time), int8 x int8 ->
                   int32 dot / conv, scales (and the zero-point correction) on the output
``static``         as ``dynamic`` with the calibrated per-tensor activation scale stored on the
                   `QArray` (`calibrate_activations`, `attach_activation_scales`)
=================  ==========================================================================

The mode is chosen per leaf by the `QuantRule` / `QuantSpec` that quantized it (``activation=``).
Everywhere else a `QArray` is seen as its dequantized float value.

What is seen through: nested ``jax.jit``, ``jax.checkpoint`` / ``remat``, ``custom_jvp`` and
``custom_vjp`` functions (``jax.nn.relu``, ``gelu``, flax's activations) are inlined when a
quantized weight flows into them; ``lax.scan`` / ``lax.cond`` / ``lax.while_loop`` are rebuilt
around a re-interpreted body, so weights they close over, and layers stacked along a scan's
``xs`` (``nn.scan``), keep their integer dots. Limits (correct, but float there): a weight carried
through a loop carry is dequantized, and so is a weight entering ``pmap`` / ``shard_map`` bodies or
any op other than the layout ops, ``dot_general`` and ``conv_general_dilated`` (an embedding
``gather`` sees the dequantized table). The returned function composes with ``jax.jit`` and
``jax.vmap``; it is for inference (the custom derivative rules of inlined functions are dropped).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax

from jaxcompress._program import TraceCache
from jaxcompress.execute.policy import resolve_policy
from jaxcompress.execute.rules import ExecutionOptions, record_sites, run_with_qarrays

__all__ = ["compressed"]


def compressed(fn: Callable, *, on_unsupported: str = "error", policy: Any = "rule") -> Callable:
    """Transform ``fn`` so that it accepts params containing `QArray`\\ s and runs integer ops.

    Args:
      fn: any JAX function: a linen ``model.apply``, an nnx forward pass through
        ``nnx.merge(graphdef, state)``, plain ``jnp`` code. Not modified.
      on_unsupported: where a weight asks for an integer activation mode but its op or layout
        cannot run on the integer path (e.g. a scale that varies along two contracted axes, fp8
        codes, ``batch_group_count``), ``"error"`` (default) raises `UnsupportedQuantizedOp`
        naming the primitive and the leaf; ``"dequantize"`` runs that op weight-only instead.
      policy: which path each dot / conv site runs on (`jaxcompress.execute.policy`):
        ``"rule"`` (default: the weight's own activation mode), ``"auto"`` (a cost model: the
        integer op where XLA runs it faster than float, weight-only elsewhere), ``"measure"``
        (each site's programs -- integer, weight-only, at dots ``"integer_bf16"`` and at native
        s8 convs ``"integer_im2col"`` -- timed alone), ``"tune"`` (whole programs timed: the
        fastest mix found on this machine, once per call signature, cached on disk),
        ``"integer"``, ``"weight_only"``, ``"integer_bf16"``, ``"integer_im2col"``, or an
        `ExecutionPolicy` with per-leaf ``overrides``. The returned
        function's ``sites(*args, **kwargs)`` lists the choice made at each site (`SiteChoice`)
        without running anything.

    Returns:
      A function with ``fn``'s signature and outputs (and a ``sites`` method, see ``policy``). `QArray`\\ s must reach ``fn`` through
      its arguments (anywhere in their pytrees, ``kwargs`` included); one ``fn`` closes over is
      not seen. Non-array leaves (``deterministic=True``, strings) are passed through as Python
      values, and the traced program is cached per argument signature.

    A linen Dense with int8 weights and dynamic int8 activations; the compiled program contains
    an ``s8 x s8 -> s32`` dot:

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxcompress as jc
    >>> model = nn.Dense(8)
    >>> x = jax.random.normal(jax.random.key(0), (16, 16))
    >>> params = model.init(jax.random.key(1), x)
    >>> rules = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]
    >>> qparams, _ = jc.quantize_params(params, rules)
    >>> apply = jax.jit(jc.compressed(model.apply))
    >>> y = apply(qparams, x)
    >>> bool(jnp.allclose(y, model.apply(params, x), atol=0.1))
    True
    >>> hlo = apply.lower(qparams, x).compile().as_text()
    >>> any("s8[16,16]" in line and "-> s32[16,8]" in line for line in hlo.splitlines())
    True

    Under ``policy="auto"`` a tiny dot (16 contracted values) runs weight-only, and says why:

    >>> [(site.path, site.chosen) for site in compressed(model.apply, policy="auto").sites(qparams, x)]
    [('params/kernel', 'weight_only')]
    """
    if on_unsupported not in ("error", "dequantize"):
        raise ValueError(f"compressed: on_unsupported must be 'error' or 'dequantize', got {on_unsupported!r}")
    resolved = resolve_policy(policy)
    options = ExecutionOptions(on_unsupported=on_unsupported, policy=resolved)
    cache = TraceCache()

    def run(f, a, k, opts):
        return run_with_qarrays(f, a, k, opts, cache)[0]

    def planned(base: ExecutionOptions, args: tuple, kwargs: dict) -> ExecutionOptions:
        if resolved.default != "tune":
            return base
        from jaxcompress.execute.tune import tune_plan

        return dataclasses.replace(base, plan=tune_plan(fn, args, kwargs, options, cache, run))

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return run_with_qarrays(fn, args, kwargs, planned(options, args, kwargs), cache)[0]

    def sites(*args: Any, **kwargs: Any) -> list:
        """The `SiteChoice` of every dot / conv a quantized weight meets in ``fn(*args,
        **kwargs)`` (traced abstractly: nothing of ``fn`` runs, except the one-time timing of
        the ``"measure"`` and ``"tune"`` policies when nothing is cached)."""
        return record_sites(fn, args, kwargs, planned(options, args, kwargs), cache)

    setattr(wrapped, "sites", sites)  # a method of the returned function (see the docs above)
    return wrapped
