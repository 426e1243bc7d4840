"""Hand-built and modified `QArray`s: every contradiction between the arrays and the static
metadata is an `InvalidQArrayError` (a ValueError) naming the field and what was expected."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.qarray import QArray
from tests.adversarial.support import expect_clear, expect_ok

try:
    from jaxcompress._errors import InvalidQArrayError
except ImportError:  # the suite also ran against the code before the fixes
    InvalidQArrayError = ValueError


def _per_channel(**changes):
    kwargs = dict(values=jnp.ones((8, 4), jnp.int8), scale=jnp.ones((1, 4), jnp.float32), channel_axes=(1,), bits=8)
    kwargs.update(changes)
    return kwargs


def _grouped(**changes):
    kwargs = dict(values=jnp.ones((8, 4), jnp.int4), scale=jnp.ones((2, 4), jnp.float32), channel_axes=(1,),
                  group_axis=0, group_size=4, bits=4)
    kwargs.update(changes)
    return kwargs


BAD = {
    "bits-99": (_per_channel(bits=99), ("bits", "99")),
    "bits-0": (_per_channel(bits=0), ("bits", "2..8")),
    "bits-str": (_per_channel(bits="8"), ("bits",)),
    "bits-4-in-int8": (_per_channel(bits=4), ("int4", "int8")),
    "bits-8-in-int4": (_per_channel(values=jnp.ones((8, 4), jnp.int4)), ("int8", "int4")),
    "bits-2-in-int8": (_per_channel(bits=2), ("int2",)),
    "qtype-unknown": (_per_channel(qtype="int3"), ("qtype", "int3")),
    "fp8-qtype-int8-values": (_per_channel(qtype="float8_e4m3fn"), ("float8_e4m3fn", "int8")),
    "int-qtype-uint8-values": (_per_channel(values=jnp.ones((8, 4), jnp.uint8)), ("uint8",)),
    "scale-rank": (_per_channel(scale=jnp.ones((4,), jnp.float32)), ("scale", "rank")),
    "scale-channel-size": (_per_channel(scale=jnp.ones((1, 3), jnp.float32)), ("scale", "(1, 4)")),
    "scale-shared-axis-not-1": (_per_channel(scale=jnp.ones((8, 4), jnp.float32)), ("scale", "(1, 4)")),
    "scale-int-dtype": (_per_channel(scale=jnp.ones((1, 4), jnp.int32)), ("scale", "float")),
    "channel-axis-out-of-range": (_per_channel(channel_axes=(2,)), ("channel_axes", "2")),
    "channel-axes-repeat": (_per_channel(channel_axes=(1, 1)), ("channel_axes", "repeat")),
    "channel-axes-not-tuple": (_per_channel(channel_axes="1"), ("channel_axes",)),
    "group-size-ragged-contradicts-scale": (_grouped(group_size=3, scale=jnp.ones((2, 4), jnp.float32)), ("group_size", "3", "(3, 4)")),
    "group-size-without-axis": (_grouped(group_axis=None), ("group_axis", "group_size")),
    "group-axis-without-size": (_grouped(group_size=None), ("group_axis", "group_size")),
    "group-axis-is-channel": (_grouped(group_axis=1, scale=jnp.ones((8, 1), jnp.float32)), ("group_axis", "channel")),
    "group-axis-out-of-range": (_grouped(group_axis=5), ("group_axis", "5")),
    "group-scale-size": (_grouped(scale=jnp.ones((4, 4), jnp.float32)), ("scale", "(2, 4)")),
    "group-size-zero": (_grouped(group_size=0), ("group_size",)),
    "zero-point-shape": (_per_channel(zero_point=jnp.zeros((1, 3), jnp.int8)), ("zero_point", "(1, 4)")),
    "zero-point-dtype": (_per_channel(zero_point=jnp.zeros((1, 4), jnp.float32)), ("zero_point", "int8")),
    "input-scale-rank": (_per_channel(input_scale=jnp.ones((8,), jnp.float32)), ("input_scale", "rank")),
    "input-scale-size": (_per_channel(input_scale=jnp.ones((3, 1), jnp.float32)), ("input_scale", "8")),
    "activation-unknown": (_per_channel(activation="int8"), ("activation", "int8")),
    "activation-scale-not-scalar": (_per_channel(activation_scale=jnp.ones((4,), jnp.float32)), ("activation_scale", "scalar")),
    "original-dtype-int": (_per_channel(dtype=jnp.dtype(jnp.int32)), ("dtype", "int32")),
    "fp8-bits-4": (_per_channel(values=jnp.ones((8, 4), jnp.float8_e4m3fn), qtype="float8_e4m3fn", bits=4), ("bits", "8")),
    "nf4-bits-8": (_grouped(qtype="nf4", bits=8), ("bits", "nf4")),
    "nf4-int8-values": (_per_channel(qtype="nf4", bits=4), ("int4", "int8")),
    "nf4-zero-point": (_grouped(qtype="nf4", zero_point=jnp.zeros((2, 4), jnp.int4)), ("nf4", "zero_point")),
    "nf4-dynamic-activation": (_grouped(qtype="nf4", activation="dynamic"), ("activation", "qtype")),
    "group-ragged-scale-too-few": (_grouped(values=jnp.ones((10, 4), jnp.int4)), ("scale", "(3, 4)")),
    "fp8-dynamic-activation": (_per_channel(values=jnp.ones((8, 4), jnp.float8_e4m3fn), qtype="float8_e4m3fn", activation="dynamic"), ("activation", "qtype")),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_qarray_is_a_clear_error(case):
    kwargs, needles = BAD[case]
    expect_clear(lambda: QArray(**kwargs), (InvalidQArrayError, TypeError), *needles)


REPLACE = {
    "scale-vs-channel-axes": (dict(scale=jnp.ones((8, 1), jnp.float32)), ("scale", "(1, 4)")),
    "bits-vs-values": (dict(bits=4), ("int4",)),
    "values-shape-vs-scale": (dict(values=jnp.ones((8, 5), jnp.int8)), ("scale", "(1, 5)")),
    "channel-axes-vs-scale": (dict(channel_axes=(0,)), ("scale", "(8, 1)")),
}


@pytest.mark.parametrize("case", sorted(REPLACE))
def test_replace_is_validated(case):
    q = jc.quantize(jnp.arange(32.0).reshape(8, 4), bits=8, channel_axes=(1,))
    changes, needles = REPLACE[case]
    expect_clear(lambda: dataclasses.replace(q, **changes), InvalidQArrayError, *needles)


def test_float_values_are_refused_by_the_strict_check():
    # float children are what tree_map(zeros_like-with-a-dtype) / float0 cotangents give, so a
    # plain construction accepts them; the checkpoint readers check strictly
    from jaxcompress.qarray import check_qarray

    q = QArray(**_per_channel(values=jnp.ones((8, 4), jnp.float32)))
    expect_clear(lambda: check_qarray(q, strict=True), InvalidQArrayError, "float32", "int8")


def test_replaced_qarray_never_reaches_compressed():
    # issue 18: a hand-modified scale ran through `compressed` and gave wrong numbers
    q = jc.quantize(jnp.arange(32.0).reshape(8, 4), bits=8, channel_axes=(1,))

    def run():
        bad = dataclasses.replace(q, scale=jnp.ones((8, 1), jnp.float32))
        return jc.compressed(lambda p, x: x @ p["w"])({"w": bad}, jnp.ones((2, 8)))

    expect_clear(run, InvalidQArrayError, "scale", "channel_axes")


def test_negative_channel_axis_is_normalised():
    q = expect_ok(lambda: QArray(**_per_channel(channel_axes=(-1,))))
    assert q.channel_axes == (1,)


# ---- valid uses that must keep working (the pytree node is rebuilt with odd children) ----------


def test_pytree_children_may_be_anything():
    q = jc.quantize(jnp.ones((8, 4)), bits=4, channel_axes=(1,), group_size=4)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    for filler in (None, object(), jax.ShapeDtypeStruct((3,), jnp.float32)):
        expect_ok(lambda: jax.tree_util.tree_unflatten(treedef, [filler] * len(leaves)))
    expect_ok(lambda: jax.eval_shape(lambda q: q, q), lambda out: out.scale.shape == (2, 4))
    expect_ok(lambda: jax.jit(lambda q: q.dequantize())(q), lambda out: out.shape == (8, 4))
    expect_ok(lambda: jax.vmap(lambda x, q: x @ q.dequantize(), in_axes=(0, None))(jnp.ones((2, 8)), q), lambda out: out.shape == (2, 4))


def test_stacked_layers_under_scan():
    q = jc.quantize(jnp.ones((3, 4, 4)), bits=8, channel_axes=(0, 2))
    body = lambda h, layer: (h @ layer.dequantize(), None)
    expect_ok(lambda: jax.lax.scan(body, jnp.ones((2, 4)), q)[0], lambda out: out.shape == (2, 4))


# ---- misuse: a QArray used as an array without `compressed` ------------------------------------

MISUSE = {
    "float": lambda q, x: float(q),
    "numpy": lambda q, x: np.asarray(q) + 0,
    "jnp.asarray": lambda q, x: jnp.asarray(q),
    "matmul": lambda q, x: x @ q,
    "jnp.dot": lambda q, x: jnp.dot(x, q),
    "add": lambda q, x: q + 1,
    "flax-dense": lambda q, x: __import__("flax.linen", fromlist=["Dense"]).Dense(3).apply({"params": {"kernel": q, "bias": jnp.zeros(3)}}, x),
}


@pytest.mark.parametrize("case", sorted(MISUSE))
def test_qarray_as_array_says_what_to_use(case):
    q = jc.quantize(jnp.ones((4, 3)), bits=8, channel_axes=(-1,))
    expect_clear(lambda: MISUSE[case](q, jnp.ones((2, 4))), TypeError, "compressed", "dequantize_params")
