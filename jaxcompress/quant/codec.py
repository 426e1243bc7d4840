"""The arithmetic of one quantization step, on the GROUPED view of an array (internal).

Everything here works on float32 arrays in the grouped layout of `ResolvedSpec.grouped_shape`,
with ranges / scales / zero points that keep the reduced axes as size 1, so plain broadcasting
applies. Kept separate so calibration (which needs a fake-quant round trip to score clip ratios)
and quantization share one definition of the math.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes

from jaxcompress.qarray import FP8_QTYPES, INT_QTYPE, storage_dtype
from jaxcompress.quant.spec import ResolvedSpec

__all__ = ["int_range", "scale_from_range", "encode", "decode", "round_trip", "to_grouped", "from_grouped"]


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes used: symmetric drops the most negative code so that 0 is centred.

    >>> int_range(8, True), int_range(8, False), int_range(4, True)
    ((-127, 127), (-128, 127), (-7, 7))
    """
    qmax = 2 ** (bits - 1) - 1
    return (-qmax, qmax) if symmetric else (-qmax - 1, qmax)


def fp8_max(qtype: str) -> float:
    return float(ml_dtypes.finfo(FP8_QTYPES[qtype]).max)


def scale_from_range(lo: jax.Array, hi: jax.Array, spec: ResolvedSpec):
    """Scale (and zero point, or None) mapping the clip range ``[lo, hi]`` onto the codes.

    A degenerate range (all zeros, or a range that underflows) gets scale 1.0: never 0 or NaN,
    and zeros still encode to exact zeros.
    """
    if spec.qtype != INT_QTYPE:
        absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = absmax / fp8_max(spec.qtype)
        return _stored_scale(scale, spec), None
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    if spec.symmetric:
        absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        return _stored_scale(absmax / qmax, spec), None
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    scale = _stored_scale((hi - lo) / (qmax - qmin), spec)
    zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def _stored_scale(scale: jax.Array, spec: ResolvedSpec) -> jax.Array:
    """A safe scale, representable in ``spec.scale_dtype`` (as float32). A narrower dtype rounds
    UP: ``scale * (1 + eps)`` rounded to nearest is never below ``scale``, so the clip range still
    fits the codes."""
    scale = _safe_scale(scale)
    if spec.scale_dtype == "float32":
        return scale
    dtype = jnp.dtype(spec.scale_dtype)
    widened = (scale * (1.0 + float(jnp.finfo(dtype).eps))).astype(dtype).astype(jnp.float32)
    return _safe_scale(widened)


def _safe_scale(scale: jax.Array) -> jax.Array:
    ok = jnp.isfinite(scale) & (scale > 0)
    return jnp.where(ok, scale, jnp.ones_like(scale))


def encode(x: jax.Array, scale: jax.Array, zero_point, spec: ResolvedSpec) -> jax.Array:
    """Float (grouped view) -> stored codes, in the storage dtype."""
    if spec.allow_nonfinite:
        x = jnp.where(jnp.isnan(x), 0.0, x)
    if spec.qtype != INT_QTYPE:
        limit = fp8_max(spec.qtype)
        return jnp.clip(x / scale, -limit, limit).astype(storage_dtype(8, spec.qtype))
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    codes = jnp.round(x / scale)
    if zero_point is not None:
        codes = codes + zero_point
    return jnp.clip(codes, qmin, qmax).astype(storage_dtype(spec.bits, spec.qtype))


def decode(values: jax.Array, scale: jax.Array, zero_point) -> jax.Array:
    """Stored codes (grouped view) -> float32."""
    out = values.astype(jnp.float32)
    if zero_point is not None:
        out = out - zero_point.astype(jnp.float32)
    return out * scale


def round_trip(x: jax.Array, lo: jax.Array, hi: jax.Array, spec: ResolvedSpec) -> jax.Array:
    """``decode(encode(x))`` with the scale implied by the clip range ``[lo, hi]``."""
    scale, zero_point = scale_from_range(lo, hi, spec)
    return decode(encode(x, scale, zero_point, spec), scale, zero_point)


def to_grouped(array: jax.Array, spec: ResolvedSpec) -> jax.Array:
    """Scale layout (group axis = number of groups) -> grouped layout (within-group axis of 1)."""
    return array if spec.group_axis is None else jnp.expand_dims(array, spec.group_axis + 1)


def from_grouped(array: jax.Array, spec: ResolvedSpec) -> jax.Array:
    """Grouped layout -> scale layout (the shape of `QArray.scale`)."""
    return array if spec.group_axis is None else jnp.squeeze(array, spec.group_axis + 1)
