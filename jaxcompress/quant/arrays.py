"""`quantize` / `dequantize`: one array in, one `QArray` out (and back).

Eagerly (concrete input) the work runs in one jit-compiled function cached per shape and spec,
and a NaN/Inf raises a `ValueError` naming the array. Under a transformation (``jit``, ``vmap``,
``grad`` of something else...) `quantize` traces inline; a NaN/Inf then raises from a host
callback when the computation runs (the error surfaces, carrying the same message, as a
``JaxRuntimeError`` when the result is used, or a ``ValueError`` when it is passed on to another
jitted call), unless ``allow_nonfinite=True``. The check adds no effect to the program (see
`jaxcompress._checks`): ``jit`` keeps its fast dispatch path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxcompress._checks import checked
from jaxcompress.qarray import NF4_QTYPE, QArray
from jaxcompress.quant.calibrate import calibrate_array
from jaxcompress.quant.codec import block_size, decode_array, encode_array, scale_from_range, to_grouped
from jaxcompress.quant.spec import Calibration, QuantSpec, ResolvedSpec

__all__ = [
    "quantize",
    "dequantize",
    "quantize_with_spec",
    "quantize_with_range",
    "make_spec",
    "scale_sharding",
    "stored_sharding",
    "place_like_param",
]


def make_spec(spec: QuantSpec | None, kwargs: dict[str, Any]) -> QuantSpec:
    if spec is not None and kwargs:
        raise TypeError(f"pass either a QuantSpec or keyword options, not both (got {sorted(kwargs)})")
    return spec if spec is not None else QuantSpec(**kwargs)


def quantize(x: Any, spec: QuantSpec | None = None, *, name: str = "array", **options) -> QArray:
    """Quantize a float array.

    Args:
      x: a float array (jax or numpy).
      spec: a `QuantSpec`; or pass its fields as keywords (``bits``, ``qtype``, ``symmetric``,
        ``channel_axes``, ``group_size``, ``group_axis``, ``calibration``, ``allow_nonfinite``,
        ``activation``).
      name: what error messages call the array (`quantize_params` passes the pytree path).

    Returns:
      A `QArray` with the values, scale (zero point) and metadata.

    Per-output-channel int8 of a Flax Dense kernel, and int4 in groups of 2 along the input axis:

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> w = jnp.array([[0.5, -2.0], [1.0, 0.25], [-0.75, 1.5], [0.1, -0.2]])
    >>> q = jc.quantize(w, bits=8, channel_axes=(-1,))
    >>> q.values[:, 1].tolist()
    [-127, 16, 95, -13]
    >>> q4 = jc.quantize(w, bits=4, channel_axes=(-1,), group_size=2)
    >>> q4.scale.shape, q4.values.dtype
    ((2, 2), dtype(int4))
    >>> bool(jnp.abs(jc.dequantize(q4) - w).max() <= q4.scale.max() / 2)
    True

    A group size need not divide its axis (the last group is shorter), and ``qtype="nf4"``
    stores QLoRA's normal-float 4-bit codes:

    >>> jc.quantize(w, bits=4, channel_axes=(-1,), group_size=3).scale.shape  # groups of 3 + 1
    (2, 2)
    >>> jc.quantize(w, qtype="nf4", group_size=64).scale.shape  # one group of 4 per column
    (1, 1)
    """
    spec = make_spec(spec, options)
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array to quantize, got dtype {x.dtype}")
    resolved = spec.resolve(tuple(x.shape), name)
    if isinstance(x, jax.core.Tracer):
        qarray, finite = _quantize_impl(x, resolved, block_size(x, resolved))
    else:
        x = jnp.asarray(x)
        qarray, finite = _quantize_jit(x, resolved, block_size(x, resolved), _named(x))
    if not resolved.allow_nonfinite:
        # The check rides on the scale (`checked`: a zero added under jit, nothing eagerly).
        scale = checked(qarray.scale, finite, _nonfinite_message(name))
        if scale is not qarray.scale:
            qarray = dataclasses.replace(qarray, scale=scale)
    return qarray


def quantize_with_spec(x: jax.Array, spec: ResolvedSpec) -> QArray:
    """Quantize with an already-resolved spec, skipping validation and the NaN check (internal:
    for callers such as fake-quant that have validated once and run inside their own jit)."""
    return _quantize_impl(x, spec, block_size(x, spec))[0]


def _nonfinite_message(name: str) -> str:
    return (
        f"{name}: contains NaN or Inf; quantization needs finite values "
        f"(pass allow_nonfinite=True to clip Inf and store NaN as 0)"
    )


def _quantize_impl(
    x: jax.Array, spec: ResolvedSpec, block: int | None, placement: NamedSharding | None = None
) -> tuple[QArray, jax.Array]:
    xf = x.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(xf))
    lo, hi = calibrate_array(xf, spec, block)
    qarray = _from_range(x, lo, hi, spec, block)
    if placement is not None:  # eager on a NamedSharding'd array: pin the documented layout
        scale_placement = scale_sharding(placement, tuple(x.shape), spec)
        qarray = dataclasses.replace(
            qarray,
            values=jax.lax.with_sharding_constraint(qarray.values, placement),
            scale=jax.lax.with_sharding_constraint(qarray.scale, scale_placement),
            zero_point=None
            if qarray.zero_point is None
            else jax.lax.with_sharding_constraint(qarray.zero_point, scale_placement),
        )
    return qarray, finite


def _named(x: jax.Array) -> NamedSharding | None:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.device_set) > 1:
        return sharding
    return None


def scale_sharding(sharding: NamedSharding, shape: tuple[int, ...], spec: ResolvedSpec) -> NamedSharding:
    """Where the scale (and zero point) of an array of ``shape`` placed by ``sharding`` lives:
    split like the array along its per-channel axes; along the group axis too when the groups
    align with the shards (each shard holds whole groups, as many on every shard); replicated
    along shared axes and along a group axis whose groups straddle shard boundaries.

    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> from jaxcompress.quant.spec import QuantSpec
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> spec = QuantSpec(bits=4, channel_axes=(-1,), group_size=64).resolve((192, 8))
    >>> scale_sharding(NamedSharding(mesh, P("model", None)), (192, 8), spec).spec
    P('model', None)
    """
    entries = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    mesh_shape = dict(sharding.mesh.shape)
    out: list[Any] = []
    for axis, entry in enumerate(entries):
        if entry is None or (axis not in spec.channel_axes and axis != spec.group_axis):
            out.append(None)
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        shards = math.prod(int(mesh_shape[name]) for name in names)
        if axis == spec.group_axis:
            aligned = shape[axis] % shards == 0 and (shape[axis] // shards) % int(spec.group_size or 1) == 0
            out.append(entry if aligned else None)
        else:
            out.append(entry if shape[axis] % shards == 0 else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*out))


def stored_sharding(sharding: Any, permutation: tuple[int, ...] | None) -> Any:
    """The sharding of codes stored in axis order ``permutation`` (`QArray.stored_permutation`)
    for a param placed by ``sharding``: a `NamedSharding`'s spec entries move with their axes
    (a ``P('data', 'model')`` ``(in, out)`` kernel stored ``(out, in)`` is ``P('model', 'data')``).
    Other shardings, and ``permutation=None``, are returned unchanged.

    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
    >>> stored_sharding(NamedSharding(mesh, P("data", "model")), (1, 0)).spec
    P('model', 'data')
    """
    if permutation is None or not isinstance(sharding, NamedSharding):
        return sharding
    entries = tuple(sharding.spec) + (None,) * (len(permutation) - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*(entries[axis] for axis in permutation)))


def quantize_with_range(x: jax.Array, lo: jax.Array, hi: jax.Array, spec: ResolvedSpec) -> QArray:
    """Quantize with a GIVEN clip range instead of calibrating (internal: QAT conversion uses the
    ranges training tracked). ``lo`` / ``hi`` are in the grouped layout with reduced axes kept."""
    return _from_range(x, lo, hi, spec, block_size(x, spec))


def _from_range(x: jax.Array, lo: jax.Array, hi: jax.Array, spec: ResolvedSpec, block: int | None) -> QArray:
    """Encode ``x`` (original shape) with the per-group range ``[lo, hi]`` (grouped layout). The
    work runs in the blocked view (`jaxcompress.quant.codec`): the codes keep ``x``'s sharding
    even where groups straddle shard boundaries."""
    original_dtype = jnp.dtype(x.dtype)
    scale, zero_point = scale_from_range(lo, hi, spec)
    values = encode_array(x, scale, zero_point, spec, block)
    if spec.group_axis is not None:
        # Drop the within-group axis: the scale keeps the original rank, group axis = #groups.
        scale = jnp.squeeze(scale, spec.group_axis + 1)
        if zero_point is not None:
            zero_point = jnp.squeeze(zero_point, spec.group_axis + 1)
    if zero_point is not None:
        zero_point = zero_point.astype(values.dtype)
    return QArray(
        values=values,
        scale=scale.astype(spec.scale_dtype),
        zero_point=zero_point,
        bits=spec.bits,
        qtype=spec.qtype,
        channel_axes=spec.channel_axes,
        group_axis=spec.group_axis,
        group_size=spec.group_size,
        dtype=original_dtype,
        activation=spec.activation,
    )


_quantize_jit = jax.jit(_quantize_impl, static_argnums=(1, 2, 3))


def dequantize(q: QArray, dtype: Any = None) -> jax.Array:
    """The float array a `QArray` stands for (in its original dtype unless ``dtype`` is given).
    The result keeps the sharding of ``q.values``, also when groups straddle shard boundaries.

    >>> import jax.numpy as jnp, jaxcompress as jc
    >>> jc.dequantize(jc.quantize(jnp.zeros((2, 3)), bits=4)).tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    if not isinstance(q, QArray):
        raise TypeError(f"dequantize expects a QArray, got {type(q).__name__}")
    if (q.group_axis is None and q.qtype != NF4_QTYPE) or q.stored_permutation is not None:
        return q.dequantize(dtype)
    out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(q.dtype)
    if q.input_scale is not None:
        smoothed = dequantize(dataclasses.replace(q, input_scale=None), jnp.float32)
        return (smoothed / q.input_scale.astype(jnp.float32)).astype(out_dtype)
    spec = group_spec(q)
    scale = to_grouped(q.scale.astype(jnp.float32), spec)
    zero_point = None if q.zero_point is None else to_grouped(q.zero_point.astype(jnp.float32), spec)
    return decode_array(q.values, scale, zero_point, spec, block_size(q.values, spec)).astype(out_dtype)


def place_like_param(param: Any, q: QArray) -> QArray:
    """``q`` with its arrays where ``param`` (the array it quantizes) lives: the values with the
    param's sharding, scale and zero point by `scale_sharding`, an input scale split like the
    param along the axes it has in full (codes stored in another axis order,
    `QArray.stored_permutation`, get the param's sharding with its axes moved the same way:
    `stored_sharding`). For results computed off the mesh (the one-shot methods
    run their per-matrix algorithm on the whole matrix). A param that is not a `jax.Array`
    (NumPy) leaves ``q`` as it is.

    >>> import jax, jax.numpy as jnp, jaxcompress as jc
    >>> w = jax.device_put(jnp.ones((4, 2)), jax.devices()[0])
    >>> place_like_param(w, jc.quantize(jnp.ones((4, 2)), bits=4, group_size=2)).values.devices() == w.devices()
    True
    """
    if not isinstance(param, jax.Array) or isinstance(param, jax.core.Tracer):
        return q
    sharding = param.sharding
    if not isinstance(sharding, NamedSharding):
        if len(sharding.device_set) != 1:
            return q
        return jax.tree.map(lambda a: jax.device_put(a, sharding), q)
    entries = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
    scale_placement = scale_sharding(sharding, tuple(param.shape), group_spec(q))

    def like_full_axes(array):
        spec = PartitionSpec(*(e if array.shape[d] == param.shape[d] else None for d, e in enumerate(entries)))
        return jax.device_put(array, NamedSharding(sharding.mesh, spec))

    return dataclasses.replace(
        q,
        values=jax.device_put(q.values, stored_sharding(sharding, q.stored_permutation)),
        scale=jax.device_put(q.scale, scale_placement),
        zero_point=None if q.zero_point is None else jax.device_put(q.zero_point, scale_placement),
        activation_scale=None if q.activation_scale is None else jax.device_put(
            q.activation_scale, NamedSharding(sharding.mesh, PartitionSpec())
        ),
        input_scale=None if q.input_scale is None else like_full_axes(q.input_scale),
    )


def group_spec(q: QArray) -> ResolvedSpec:
    """The layout part of the spec a `QArray` was made with (internal: for its group axis)."""
    return ResolvedSpec(
        bits=q.bits,
        qtype=q.qtype,
        symmetric=q.symmetric,
        channel_axes=tuple(q.channel_axes),
        group_axis=q.group_axis,
        group_size=q.group_size,
        calibration=Calibration(),
        allow_nonfinite=True,
        group_dim=None if q.group_axis is None else int(q.shape[q.group_axis]),
    )
