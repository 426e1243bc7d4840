"""Activation quantization for integer execution: float activation -> int8 codes and a scale.

Activations are quantized symmetrically to int8 codes in ``[-127, 127]`` (so that an int8 x int8
product never needs the asymmetric ``-128`` code and a zero-point correction on the activation
side), with round-half-to-even, the same rounding as `jaxcompress.quantize`:

* ``"dynamic"``: the scale is computed at run time, ``max|x| / 127`` over the axes the following
  dot contracts (one scale per row / token for a ``Dense``; one per example for a conv, whose
  windows overlap so a per-position scale would not factor out of the sum).
* ``"static"``: the scale is a calibrated float32 scalar stored on the weight
  (`jaxcompress.calibrate_activations`); values beyond its range saturate at +-127.

An all-zero row gets scale 1.0 (its codes are all 0), never 0 or NaN.

The codes are int8 for XLA's integer dots, or ``bfloat16`` for the ``"integer_bf16"`` path
(`jaxcompress.execute.dot`): every integer in ``[-256, 256]`` is exact in bfloat16, so the codes
are the same numbers.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

__all__ = ["ACTIVATION_QMAX", "quantize_activation", "dynamic_scale"]

ACTIVATION_QMAX = 127


def dynamic_scale(x: jax.Array, reduce_axes: Sequence[int]) -> jax.Array:
    """Per-row absmax scale: ``max|x| / 127`` over ``reduce_axes`` (kept as size 1).

    >>> import jax.numpy as jnp
    >>> dynamic_scale(jnp.array([[1.0, -2.54], [0.0, 0.0]]), (1,)).ravel().tolist()
    [0.019999999552965164, 1.0]
    """
    absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(reduce_axes), keepdims=True)
    return jnp.where(absmax > 0, absmax / ACTIVATION_QMAX, jnp.ones_like(absmax))


def quantize_activation(
    x: jax.Array,
    reduce_axes: Sequence[int],
    mode: str,
    static_scale: jax.Array | None = None,
    codes_dtype: Any = jnp.int8,
) -> tuple[jax.Array, jax.Array]:
    """Quantize an activation to int8 codes for an integer dot.

    Args:
      x: float activation.
      reduce_axes: axes one dynamic scale is shared over (the contracted axes).
      mode: ``"dynamic"`` or ``"static"``.
      static_scale: the calibrated scalar scale, for ``"static"``.
      codes_dtype: ``jnp.int8`` (default) or ``jnp.bfloat16`` (the same integer codes).

    Returns:
      ``(codes, scale)``: integer codes of ``x``'s shape and a float32 scale that broadcasts
      against them (``x``'s rank with ``reduce_axes`` of size 1 for dynamic; a scalar for static),
      with ``x ~= codes * scale``.

    >>> import jax.numpy as jnp
    >>> codes, scale = quantize_activation(jnp.array([[0.5, -1.0], [2.0, 0.25]]), (1,), "dynamic")
    >>> codes.tolist(), scale.ravel().tolist()
    ([[64, -127], [127, 16]], [0.007874015718698502, 0.015748031437397003])
    >>> quantize_activation(jnp.array([3.0, -0.1]), (0,), "static", jnp.float32(0.01))[0].tolist()
    [127, -10]
    """
    if mode == "dynamic":
        scale = dynamic_scale(x, reduce_axes)
    elif mode == "static":
        if static_scale is None:
            raise ValueError("static activation quantization needs a calibrated scale")
        scale = jnp.asarray(static_scale, jnp.float32)
        scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    else:
        raise ValueError(f"activation mode {mode!r} is not 'dynamic' or 'static'")
    if jnp.dtype(codes_dtype) not in (jnp.dtype(jnp.int8), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"activation codes_dtype must be int8 or bfloat16, got {jnp.dtype(codes_dtype)}")
    codes = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -ACTIVATION_QMAX, ACTIVATION_QMAX)
    return codes.astype(codes_dtype), scale
