"""Float64 NumPy references of the integer arithmetic, and a compiled-HLO reader (test helpers).

Written independently of the package: activation codes are ``clip(round(x / s), -127, 127)`` with
``s = max|x| / 127`` (computed in float32, as on the device, so that the codes match exactly);
the integer products are summed in int64 and scaled in float64.
"""

from __future__ import annotations

import itertools
import re

import jax.numpy as jnp
import numpy as np


def activation_codes(x, reduce_axes=None, static_scale=None):
    """int8-range codes (as int64) and the float64 scale of a symmetric int8 activation."""
    x = np.asarray(x, np.float32)
    if static_scale is not None:
        scale = np.float32(static_scale)
    else:
        absmax = np.max(np.abs(x), axis=reduce_axes, keepdims=True).astype(np.float32)
        scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
    codes = np.clip(np.round(x / scale), -127, 127).astype(np.int64)
    return codes, np.asarray(scale, np.float64)


def weight_parts(q):
    """(codes int64, scale float64, zero point int64 or None) of a QArray, original layout."""
    values = np.asarray(q.logical_values.astype(jnp.int32)).astype(np.int64)
    scale = np.asarray(q.scale, np.float64)
    zero = None if q.zero_point is None else np.asarray(q.zero_point.astype(jnp.int32)).astype(np.int64)
    return values, scale, zero


def dense_w8a8(x, q, bias=None, static_scale=None):
    """``x @ w`` for a Dense kernel ``(in, out)`` quantized per output channel (optionally per
    group along ``in`` and asymmetric), with per-row (or static) int8 activations."""
    codes, x_scale = activation_codes(x, (-1,), static_scale)
    w, w_scale, zero = weight_parts(q)
    groups = w_scale.shape[0]
    size = w.shape[0] // groups
    out = np.zeros(codes.shape[:-1] + (w.shape[1],), np.float64)
    for g in range(groups):
        rows = slice(g * size, (g + 1) * size)
        acc = codes[..., rows] @ w[rows]
        if zero is not None:
            acc = acc - codes[..., rows].sum(-1, keepdims=True) * zero[g]
        out += acc * w_scale[g]
    out = out * (x_scale if np.ndim(x_scale) == 0 else x_scale)
    return out if bias is None else out + np.asarray(bias, np.float64)


def conv_nhwc(x, w, strides, padding, dilation=(1, 1), groups=1):
    """Float64 (or int64) 2-D conv, NHWC input, HWIO kernel, explicit padding pairs."""
    x = np.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    kh, kw, cin, cout = w.shape
    n, h, wd, c = x.shape
    oh = (h - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    ow = (wd - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    out = np.zeros((n, oh, ow, cout), np.result_type(x.dtype, w.dtype))
    per_group = cout // groups
    for i, j in itertools.product(range(kh), range(kw)):
        patch = x[:, i * dilation[0] : i * dilation[0] + (oh - 1) * strides[0] + 1 : strides[0],
                  j * dilation[1] : j * dilation[1] + (ow - 1) * strides[1] + 1 : strides[1], :]
        for g in range(groups):
            out[..., g * per_group : (g + 1) * per_group] += (
                patch[..., g * cin : (g + 1) * cin] @ w[i, j, :, g * per_group : (g + 1) * per_group]
            )
    return out


def conv_w8a8(x, q, strides, padding, dilation=(1, 1), groups=1, bias=None):
    """Integer conv: per-example int8 activation, per-output-channel int8 kernel."""
    codes, x_scale = activation_codes(x, (1, 2, 3))
    w, w_scale, zero = weight_parts(q)
    if zero is not None:
        w = w - zero
    acc = conv_nhwc(codes, w, strides, padding, dilation, groups)
    out = acc * x_scale * w_scale.reshape(-1)
    return out if bias is None else out + np.asarray(bias, np.float64)


# ---- compiled HLO --------------------------------------------------------------------------
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\w+)\[([^\]]*)\]\S*\s+([\w\-]+)\((.*)$")


def integer_contractions(hlo_text: str):
    """``(op, result dtype, operand dtypes)`` of every ``dot`` / ``convolution`` in compiled HLO
    text, operand dtypes resolved within their computation."""
    found = []
    types: dict[str, str] = {}
    pending = []
    for line in hlo_text.splitlines():
        if line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
            types, pending = {}, []
        match = _INSTRUCTION.match(line)
        if not match:
            if line.strip() == "}":
                for op, result, operands in pending:
                    found.append((op, result, tuple(types.get(o, "?") for o in operands)))
                pending = []
            continue
        name, dtype, _, op, rest = match.groups()
        types[name] = dtype
        if op in ("dot", "convolution"):
            operand_text = rest.split(")")[0]
            inline = re.findall(r"(\w+)\[[^\]]*\]\S*\s+%", operand_text)
            names = re.findall(r"%([\w.\-]+)", operand_text)
            if inline:
                found.append((op, dtype, tuple(inline)))
            else:
                pending.append((op, dtype, tuple(names)))
    return found


def count_s8_contractions(hlo_text: str, op: str | None = None) -> int:
    """How many ``s8 x s8 -> s32`` dots / convolutions the compiled program has."""
    return sum(
        1
        for kind, result, operands in integer_contractions(hlo_text)
        if result == "s32" and operands == ("s8", "s8") and (op is None or kind == op)
    )
