"""`QuantSpec`: how one array is quantized (bits, format, granularity, calibration).

A spec is static configuration: hashable, so it can key jit caches and live in rules. Checking a
spec against an array's shape (`QuantSpec.resolve`) turns negative axes into positive ones and
raises a `RuleMismatchError` (a ``ValueError``) that names the array (its pytree path) when the
two do not fit.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from jaxcompress._errors import RuleMismatchError
from jaxcompress.qarray import FP8_QTYPES, INT_QTYPE, NF4_QTYPE
from jaxcompress.quant.groups import group_span, num_groups

__all__ = ["Calibration", "QuantSpec", "ResolvedSpec", "CALIBRATION_METHODS", "ACTIVATION_MODES", "ASYMMETRIC_MAX_BITS",
           "default_symmetric"]

CALIBRATION_METHODS = ("absmax", "percentile", "mse")
# How `jaxcompress.compressed` treats the activation a quantized weight meets in a dot / conv.
ACTIVATION_MODES = ("weight_only", "dynamic", "static")
SCALE_DTYPES = ("float32", "bfloat16")  # bfloat16 keeps float32's exponent range: no overflow


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """How the clipping range of each scale group is chosen from the weights.

    Attributes:
      method: ``"absmax"`` (the full range), ``"percentile"`` (clip at the ``percentile``-th
        percentile of ``|x|``; for asymmetric quantization, of ``x`` at both ends) or ``"mse"``
        (grid search over clip ratios minimising ``||x - dequantize(quantize(x))||^2`` per scale
        group; ratio 1.0, i.e. absmax, is always on the grid so the result is never worse).
      percentile: used by ``"percentile"``, in (0, 100].
      grid_size: number of clip ratios tried by ``"mse"``, spaced evenly in [min_ratio, 1].
      min_ratio: smallest clip ratio tried by ``"mse"``, in (0, 1].

    >>> Calibration(method="mse", grid_size=32).method
    'mse'
    """

    method: str = "absmax"
    percentile: float = 99.99
    grid_size: int = 64
    min_ratio: float = 0.3

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(
                f"calibration method {self.method!r} is not one of {CALIBRATION_METHODS}"
            )
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"calibration percentile {self.percentile} is not in (0, 100]")
        if self.grid_size < 1:
            raise ValueError(f"calibration grid_size {self.grid_size} must be >= 1")
        if not 0.0 < self.min_ratio <= 1.0:
            raise ValueError(f"calibration min_ratio {self.min_ratio} is not in (0, 1]")


# Integer codes of this many bits or fewer default to asymmetric (a zero point per scale group).
ASYMMETRIC_MAX_BITS = 4


def default_symmetric(bits: int, qtype: str = INT_QTYPE) -> bool:
    """What ``QuantSpec(symmetric=None)`` resolves to: ``False`` (asymmetric, a zero point) for
    integer codes of at most `ASYMMETRIC_MAX_BITS` bits, ``True`` otherwise (fp8 and nf4 are
    symmetric-only formats).

    >>> default_symmetric(4), default_symmetric(3), default_symmetric(8), default_symmetric(4, "nf4")
    (False, False, True, True)
    """
    if qtype != INT_QTYPE or isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        return True  # non-integer qtypes; a bad `bits` is reported by the bits check
    return not int(bits) <= ASYMMETRIC_MAX_BITS


def _axes(channel_axes) -> tuple[int, ...]:
    """``channel_axes`` as a tuple of ints (a single int is one axis: ``-1`` -> ``(-1,)``)."""
    if isinstance(channel_axes, (int, np.integer)) and not isinstance(channel_axes, bool):
        return (int(channel_axes),)
    if isinstance(channel_axes, (str, bytes)) or not hasattr(channel_axes, "__iter__"):
        raise TypeError(f"channel_axes must be an int or a tuple of ints, got {channel_axes!r}")
    axes = tuple(channel_axes)
    if not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes):
        raise TypeError(f"channel_axes must be an int or a tuple of ints, got {channel_axes!r}")
    return tuple(int(a) for a in axes)


def as_calibration(calibration: str | Calibration) -> Calibration:
    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, str):
        return Calibration(method=calibration)
    raise TypeError(f"calibration must be a method name or a Calibration, got {calibration!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize one array.

    Attributes:
      bits: integer bit width, 2..8 (ignored for fp8 formats, which are 8-bit, and for nf4,
        which is 4-bit).
      qtype: ``"int"``, an fp8 format (``"float8_e4m3fn"`` / ``"float8_e5m2"``) or ``"nf4"``
        (normal-float 4-bit, QLoRA's code book `jaxcompress.quant.nf4.NF4_CODE` times an absmax
        scale per group; symmetric and weight-only; QLoRA uses ``group_size=64``).
      symmetric: symmetric (no zero point, range ``[-(2^(b-1)-1), 2^(b-1)-1]``) or asymmetric
        (a zero point, full range ``[-2^(b-1), 2^(b-1)-1]``, zero exactly representable).
        ``None`` (the default) resolves when the spec is built (`default_symmetric`):
        asymmetric for integer codes of 4 bits or fewer, symmetric above 4 bits and for fp8 and
        nf4 (symmetric-only formats), so ``spec.symmetric`` is always a bool. Measured at 4 bits
        (groups of 128): all-MiniLM-L6-v2 GPTQ mean cosine 0.9850 symmetric vs 0.9883
        asymmetric (0.9905 asymmetric with dense targets, the only setting that reaches 0.990),
        a 135M decoder's GPTQ perplexity 31.1 vs 27.4, round-to-nearest on
        ``examples/tiny_lm.py`` 1.0023x vs 1.0018x fp32's perplexity (4 bits, groups of 128:
        +0.004 B/element for the zero points); at 8 bits the zero point buys nothing
        measurable and the integer paths are cheaper without it. Pass ``True`` / ``False`` to
        force either. ``dataclasses.replace(spec, bits=...)`` keeps the resolved value: pass
        ``symmetric=None`` too to resolve it again for the new width.
      channel_axes: axes that keep their own scale. ``()`` is per-tensor; ``(-1,)`` is
        per-output-channel for Flax ``Dense`` (in, out) and ``Conv`` (H, W, I, O) kernels.
      group_size: if set, the scale is also split into groups of this many consecutive elements
        along ``group_axis`` (per-group quantization along a contracting axis). It need not
        divide the axis: the last group is then shorter (``ceil(dim / group_size)`` groups), and
        an axis shorter than ``group_size`` is one group.
      group_axis: the axis the groups run along; defaults to -2, the input-feature
        (contracting) axis of Flax ``Dense`` and ``Conv`` kernels.
      calibration: a method name (``"absmax"``, ``"percentile"``, ``"mse"``) or a `Calibration`.
      scale_dtype: how the scale is stored: ``"float32"`` (default) or ``"bfloat16"``. A
        bfloat16 scale is rounded UP to a representable value before encoding (so the clip range
        still fits the codes) and halves the scale overhead, as 16-bit-scale GPTQ/AWQ checkpoints
        do: int4 with groups of 128 goes from 0.531 to 0.516 B/element (plus 0.004 for the int4
        zero points of asymmetric codes).
      allow_nonfinite: by default a NaN or Inf in the array is an error. If True, non-finite
        elements are excluded from calibration, +-Inf saturate to the largest code and NaN is
        stored as 0.
      activation: what `jaxcompress.compressed` does where this weight meets a ``dot_general``
        or ``conv_general_dilated``: ``"weight_only"`` (float activations, dequantized weight),
        ``"dynamic"`` (int8 activations with per-row absmax scales computed at run time, int8 x
        int8 -> int32) or ``"static"`` (int8 activations with a calibrated per-tensor scale, see
        `jaxcompress.calibrate_activations`). Integer activation modes need ``qtype="int"``.

    >>> QuantSpec(bits=4, channel_axes=(-1,), group_size=128).resolve((256, 64), "w").group_axis
    0
    """

    bits: int = 8
    qtype: str = INT_QTYPE
    symmetric: bool | None = None
    channel_axes: tuple[int, ...] = ()
    group_size: int | None = None
    group_axis: int | None = None
    calibration: str | Calibration = "absmax"
    allow_nonfinite: bool = False
    activation: str = "weight_only"
    scale_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "channel_axes", _axes(self.channel_axes))
        object.__setattr__(self, "calibration", as_calibration(self.calibration))
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", default_symmetric(self.bits, self.qtype))
        elif not isinstance(self.symmetric, (bool, np.bool_)):
            raise TypeError(f"symmetric must be True, False or None (by bits), got {self.symmetric!r}")
        else:
            object.__setattr__(self, "symmetric", bool(self.symmetric))
        if self.qtype not in (INT_QTYPE, NF4_QTYPE) and self.qtype not in FP8_QTYPES:
            raise ValueError(
                f"qtype {self.qtype!r} is not 'int', 'nf4' or one of {sorted(FP8_QTYPES)}"
            )
        if self.qtype == NF4_QTYPE:
            if self.bits not in (4, 8):  # 8: the default when only qtype="nf4" is given
                raise ValueError(f"nf4 is a 4-bit format, got bits={self.bits!r}")
            object.__setattr__(self, "bits", 4)
            if not self.symmetric:
                raise ValueError("nf4 quantization is symmetric only (symmetric=False given)")
        elif self.qtype == INT_QTYPE:
            if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
                raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}")
            if not 2 <= self.bits <= 8:
                raise ValueError(f"bits must be in 2..8, got {self.bits}")
        else:
            if self.bits != 8:
                object.__setattr__(self, "bits", 8)
            if not self.symmetric:
                raise ValueError(f"{self.qtype} quantization is symmetric only (symmetric=False given)")
        if self.group_axis is not None and (isinstance(self.group_axis, bool) or not isinstance(self.group_axis, (int, np.integer))):
            raise TypeError(f"group_axis must be an integer axis, got {self.group_axis!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or int(self.group_size) != self.group_size or self.group_size < 1
        ):
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype {self.scale_dtype!r} is not one of {SCALE_DTYPES}")
        if self.activation not in ACTIVATION_MODES:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATION_MODES}")
        if self.activation != "weight_only" and self.qtype != INT_QTYPE:
            raise ValueError(
                f"activation={self.activation!r} runs int8 x int8 dots and needs qtype='int', "
                f"got qtype={self.qtype!r} (use activation='weight_only' for fp8 and nf4 weights)"
            )

    def resolve(self, shape: tuple[int, ...], name: str = "array") -> "ResolvedSpec":
        """Check this spec against ``shape`` and return it with non-negative axes.

        Raises `RuleMismatchError` (a ``ValueError``) naming ``name`` (a pytree path) when an
        axis is out of range, an axis repeats, the group axis is also a channel axis, or the
        array is empty. A group size that does not divide its axis is fine (a shorter last
        group).
        """
        ndim = len(shape)
        if 0 in tuple(shape):
            raise RuleMismatchError(f"{name}: cannot quantize a zero-size array of shape {tuple(shape)} (there is no range to calibrate)")

        def normalize(axis: int, what: str) -> int:
            if not -ndim <= axis < ndim:
                raise RuleMismatchError(
                    f"{name}: {what} {axis} is out of range for an array of shape {tuple(shape)} "
                    f"(expected -{ndim} <= axis < {ndim})"
                )
            return axis % ndim

        channel_axes = tuple(sorted(normalize(a, "channel axis") for a in self.channel_axes))
        if len(set(channel_axes)) != len(channel_axes):
            raise RuleMismatchError(f"{name}: channel_axes {self.channel_axes} repeat an axis")
        group_axis = None
        if self.group_size is not None:
            group_axis = normalize(-2 if self.group_axis is None else self.group_axis, "group axis")
            if group_axis in channel_axes:
                raise RuleMismatchError(
                    f"{name}: group axis {group_axis} is also a channel axis {channel_axes}; "
                    f"groups run along a shared (contracting) axis"
                )
        return ResolvedSpec(
            bits=int(self.bits),
            qtype=self.qtype,
            symmetric=bool(self.symmetric),
            channel_axes=channel_axes,
            group_axis=group_axis,
            group_size=None if self.group_size is None else int(self.group_size),
            calibration=as_calibration(self.calibration),
            allow_nonfinite=self.allow_nonfinite,
            activation=self.activation,
            scale_dtype=self.scale_dtype,
            group_dim=None if group_axis is None else int(shape[group_axis]),
        )

    def describe(self) -> str:
        fmt = f"int{self.bits}" if self.qtype == INT_QTYPE else self.qtype
        gran = f"channels{self.channel_axes}" if self.channel_axes else "per-tensor"
        if self.group_size:
            gran += f" g{self.group_size}"
        sym = "sym" if self.symmetric else "asym"
        activation = "" if self.activation == "weight_only" else f" a8-{self.activation}"
        scale = "" if self.scale_dtype == "float32" else f" scale={self.scale_dtype}"
        return f"{fmt} {gran} {sym} {as_calibration(self.calibration).method}{activation}{scale}"


@dataclasses.dataclass(frozen=True)
class ResolvedSpec:
    """A `QuantSpec` checked against one shape: all axes non-negative (internal).
    ``group_dim`` is the length of the group axis (``None``: not recorded, read from the shape
    passed to `grouped_shape`)."""

    bits: int
    qtype: str
    symmetric: bool
    channel_axes: tuple[int, ...]
    group_axis: int | None
    group_size: int | None
    calibration: Calibration
    allow_nonfinite: bool
    activation: str = "weight_only"
    scale_dtype: str = "float32"
    group_dim: int | None = None

    def grouped_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``shape`` with the group axis split into ``(num_groups, group_span)`` (see
        `jaxcompress.quant.groups`: a ragged axis is padded at its end to whole groups)."""
        if self.group_axis is None or self.group_size is None:
            return tuple(shape)
        axis, dim = self.group_axis, int(shape[self.group_axis])
        split = (num_groups(dim, self.group_size), group_span(dim, self.group_size))
        return tuple(shape[:axis]) + split + tuple(shape[axis + 1 :])

    def num_groups(self, dim: int | None = None) -> int:
        """Groups along the group axis (of length ``dim``, default ``group_dim``); 1 without one."""
        if self.group_axis is None or self.group_size is None:
            return 1
        dim = self.group_dim if dim is None else dim
        if dim is None:
            raise ValueError("ResolvedSpec.num_groups: the length of the group axis is not known")
        return num_groups(dim, self.group_size)

    def reduce_axes(self, ndim: int) -> tuple[int, ...]:
        """Axes of the GROUPED view that one scale is shared over."""
        axes = []
        for axis in range(ndim):
            if axis in self.channel_axes:
                continue
            if axis == self.group_axis:
                axes.append(axis + 1)  # the within-group axis
                continue
            axes.append(axis if self.group_axis is None or axis < self.group_axis else axis + 1)
        return tuple(axes)
