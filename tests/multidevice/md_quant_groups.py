"""Grouped quantization along SHARDED axes on 8 virtual CPU devices (run via
tests/test_multidevice.py): every axis that can be sharded is, the group axis included, with
groups that align with the shards and groups that straddle shard boundaries (issue 21).

For quantize (eager and under jit), quantize_params / dequantize_params, dequantize and the
packed int4 values we check that the values come back sharded exactly like the param, the scale
like the param along its per-channel axes (and along the group axis where groups align with the
shards), the numbers equal a one-device run, and the compiled program holds no all-gather /
all-to-all of anything larger than one shard of the param (the bug gathered the whole f32 kernel
at the group reshape).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxcompress as jc
from jaxcompress.quant.arrays import scale_sharding

# (shape, param spec, quantization options): the case first.
CASES = {
    "g64-straddles-model": ((192, 192), P("model", "data"), dict(bits=4, channel_axes=(-1,), group_size=64, group_axis=0)),
    "g16-aligned-model": ((192, 192), P("model", "data"), dict(bits=4, channel_axes=(-1,), group_size=16, group_axis=0)),
    "g64-straddles-8way": ((192, 64), P(("data", "model"), None), dict(bits=4, channel_axes=(-1,), group_size=64, group_axis=0)),
    "g32-aligned-data": ((256, 128), P("data", "model"), dict(bits=4, channel_axes=(-1,), group_size=32, group_axis=0)),
    "g64-asym-mse": ((192, 192), P("model", "data"), dict(bits=4, channel_axes=(-1,), group_size=64, group_axis=0,
                                                          symmetric=False, calibration="mse")),
    "g48-out-axis": ((64, 192), P("data", "model"), dict(bits=8, channel_axes=(0,), group_size=48, group_axis=1)),
    "conv-g32": ((3, 3, 96, 64), P(None, None, "model", "data"), dict(bits=4, channel_axes=(-1,), group_size=32, group_axis=2)),
    "int2-g64-bf16": ((192, 192), P("model", "data"), dict(bits=2, channel_axes=(-1,), group_size=64, group_axis=0,
                                                           scale_dtype="bfloat16")),
    # ragged last groups (issue 19): 576 = 4.5 x 128, with 144 / 72 rows per shard; g100 on 192
    # (48 per shard); a conv's 96 input channels in groups of 40 (24 per shard); nf4 on 576.
    "g128-ragged-576-model": ((576, 64), P("model", "data"), dict(bits=4, channel_axes=(-1,), group_size=128, group_axis=0)),
    "g128-ragged-576-8way": ((576, 32), P(("data", "model"), None), dict(bits=4, channel_axes=(-1,), group_size=128, group_axis=0)),
    "g100-ragged-asym-mse": ((192, 64), P("model", "data"), dict(bits=4, channel_axes=(-1,), group_size=100, group_axis=0,
                                                                  symmetric=False, calibration="mse")),
    "conv-g40-ragged": ((3, 3, 96, 64), P(None, None, "model", "data"), dict(bits=4, channel_axes=(-1,), group_size=40, group_axis=2)),
    "nf4-g128-ragged": ((576, 64), P("model", "data"), dict(qtype="nf4", channel_axes=(-1,), group_size=128, group_axis=0)),
}

_COLLECTIVE = re.compile(r"=\s*\(?\s*\w+\[([\d,]*)\][^=]*?\b(all-gather|all-to-all)(-start)?\(")


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _param(mesh, shape, spec, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jax.device_put(x, NamedSharding(mesh, spec))


def _shard_size(param) -> int:
    return int(np.prod(param.sharding.shard_shape(param.shape)))


def shard_sized_gathers(hlo: str, *params) -> list[str]:
    """all-gather / all-to-all instructions whose result holds more elements than ONE shard of
    the largest of ``params``: gathering (or re-laying out) a param is at least two shards'
    worth; the per-block ranges regrouped for straddling groups are 1/block of the param."""
    shard = max(_shard_size(param) for param in params)
    found = []
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if match and int(np.prod([int(d) for d in match.group(1).split(",") if d] or [1])) > shard:
            found.append(line.strip()[:200])
    return found


def _same(a, b):
    return a.sharding.is_equivalent_to(b.sharding, a.ndim)


def _check(q, param, options):
    spec = jc.QuantSpec(**options).resolve(param.shape)
    assert _same(q.values, param), q.values.sharding
    # Packed int4 / int2 storage is sharded too: each device holds its own shard of the codes.
    assert q.values.addressable_shards[0].data.shape == param.sharding.shard_shape(param.shape)
    expected = scale_sharding(param.sharding, param.shape, spec)
    assert q.scale.sharding.is_equivalent_to(expected, q.ndim), (q.scale.sharding, expected)
    if q.zero_point is not None:
        assert q.zero_point.sharding.is_equivalent_to(expected, q.ndim)
    return spec


def _check_one_device(q, param, options):
    single = jc.quantize(np.asarray(param), **options)
    np.testing.assert_array_equal(np.asarray(q.values.astype(jnp.int8)), np.asarray(single.values.astype(jnp.int8)))
    np.testing.assert_allclose(np.asarray(q.scale, np.float32), np.asarray(single.scale, np.float32), rtol=1e-6)
    if single.zero_point is not None:
        np.testing.assert_array_equal(np.asarray(q.zero_point.astype(jnp.int8)), np.asarray(single.zero_point.astype(jnp.int8)))


def test_detector_flags_the_old_group_reshape(mesh):
    """The HLO check can fail: the plain group reshape of a straddling g64 gathers the kernel."""
    shape, spec, _ = CASES["g64-straddles-model"]
    param = _param(mesh, shape, spec)
    f = jax.jit(lambda w: jnp.max(jnp.abs(w.reshape(3, 64, 192)), axis=1))
    assert shard_sized_gathers(f.lower(param).compile().as_text(), param)


@pytest.mark.parametrize("case", list(CASES))
def test_quantize_keeps_the_params_sharding_without_gathering_it(mesh, case):
    shape, spec, options = CASES[case]
    param = _param(mesh, shape, spec)
    f = jax.jit(lambda w: jc.quantize(w, **options))
    compiled = f.lower(param).compile()
    q = compiled(param)
    _check(q, param, options)
    gathers = shard_sized_gathers(compiled.as_text(), param)
    assert not gathers, "\n".join(gathers[:4])
    eager = jc.quantize(param, **options)
    _check(eager, param, options)
    if options.get("calibration") != "mse":  # mse sums blocks in another order on the mesh
        _check_one_device(q, param, options)
        _check_one_device(eager, param, options)
    # dequantize: the param's sharding back, no gather, the one-device numbers. (Called through
    # jit, not the AOT-compiled object: jax 0.10 gives sharded int4 arrays an unpacked layout
    # that an AOT executable compiled for them refuses; see docs/scaling.md.)
    dense = jax.jit(jc.dequantize)(q)
    assert _same(dense, param), dense.sharding
    assert not shard_sized_gathers(jax.jit(jc.dequantize).lower(q).compile().as_text(), param)
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(jc.dequantize(jax.device_get(q))))
    assert _same(jc.dequantize(eager), param)


def _tree(mesh):
    params = {name: {"kernel": _param(mesh, shape, spec, seed=i)} for i, (name, (shape, spec, _)) in enumerate(CASES.items())}
    rules = [jc.QuantRule(pattern=f"{name}/kernel", **options) for name, (_, _, options) in CASES.items()]
    return params, rules


def test_quantize_params_on_a_sharded_tree(mesh):
    params, rules = _tree(mesh)
    f = jax.jit(lambda p: jc.quantize_params(p, rules)[0]).lower(params).compile()
    for qparams in (f(params), jc.quantize_params(params, rules)[0]):
        for name, (_, _, options) in CASES.items():
            _check(qparams[name]["kernel"], params[name]["kernel"], options)
    assert not shard_sized_gathers(f.as_text(), *jax.tree.leaves(params))


def test_dequantize_params_on_a_sharded_tree(mesh):
    params, rules = _tree(mesh)
    qparams = jax.jit(lambda p: jc.quantize_params(p, rules)[0])(params)
    dense = jax.jit(jc.dequantize_params)(qparams)
    for name in CASES:
        assert _same(dense[name]["kernel"], params[name]["kernel"]), (name, dense[name]["kernel"].sharding)
    hlo = jax.jit(jc.dequantize_params).lower(qparams).compile().as_text()
    assert not shard_sized_gathers(hlo, *jax.tree.leaves(params))


@pytest.mark.parametrize("case", ["g64-straddles-model", "g64-straddles-8way", "g64-asym-mse", "conv-g32",
                                  "g128-ragged-576-model", "g100-ragged-asym-mse"])
def test_explicit_mesh_axes_straddling_groups(case):
    """Explicit axes refuse reshapes that move elements between shards: the blocked view and the
    regrouping of the (small) per-block ranges must satisfy them."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    shape, spec, options = CASES[case]
    param = _param(mesh, shape, spec)
    q = jax.jit(lambda w: jc.quantize(w, **options))(param)
    assert _same(q.values, param)
    if options.get("calibration") != "mse":
        _check_one_device(q, param, options)
    dense = jax.jit(jc.dequantize)(q)
    assert _same(dense, param)


@pytest.mark.parametrize("case", ["g128-ragged-576-model", "g128-ragged-576-8way"])
def test_compressed_integer_dot_with_a_sharded_ragged_weight(mesh, case):
    """`compressed`'s grouped int8 dot on a weight whose ragged groups straddle the shards of
    its contracting axis: per-block scales, the same numbers as one device, an s8 dot."""
    shape, spec, options = CASES[case]
    param = _param(mesh, shape, spec)
    q = jax.jit(lambda w: jc.quantize(w, **dict(options, activation="dynamic")))(param)
    x = np.random.default_rng(7).standard_normal((16, shape[0])).astype(np.float32)
    f = jc.compressed(lambda w, a: a @ w)
    out = jax.jit(f)(q, x)
    single = f(jax.device_get(q), x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=1e-5, atol=1e-5)
    assert "s8" in jax.jit(f).lower(q, x).compile().as_text()
