"""One-shot methods (GPTQ, Wanda, SparseGPT) on params sharded over a 2-D mesh of 8 virtual CPU
devices (run via tests/test_multidevice.py).

The calibration capture runs sharded (its statistics are all-reduced by XLA, layer-by-layer
values stay on the mesh between groups); the per-matrix algorithms need the whole matrix (see
docs/scaling.md). The results must match the single-device run and come back sharded like the
params they replace.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxcompress as jc
from jaxcompress.oneshot.gptq import gptq
from jaxcompress.oneshot.sparsegpt import sparsegpt
from jaxcompress.oneshot.wanda import wanda

SPECS = {"a": P(None, "model"), "b": P("model", None), "c": P()}


@pytest.fixture(scope="module")
def setup():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    keys = jax.random.split(jax.random.key(0), 5)
    host = {"a": np.asarray(jax.random.normal(keys[0], (16, 64))), "b": np.asarray(jax.random.normal(keys[1], (64, 64))) / 8,
            "c": np.asarray(jax.random.normal(keys[2], (64, 8)))}
    batches = [np.asarray(jax.random.normal(k, (32, 16))) for k in keys[3:]]
    params = {name: jax.device_put(value, NamedSharding(mesh, SPECS[name])) for name, value in host.items()}
    sharded_batches = [jax.device_put(b, NamedSharding(mesh, P("data", None))) for b in batches]
    return host, batches, params, sharded_batches


def fn(p, x):
    return jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"]) @ p["c"]


def _differs(a, b):
    return float(np.mean(np.asarray(a) != np.asarray(b)))


def test_gptq_on_a_mesh_matches_one_device_and_keeps_the_sharding(setup):
    host, batches, params, sharded_batches = setup
    rules = [jc.QuantRule(pattern="a|b|c", bits=4, channel_axes=(-1,), group_size=16)]
    want, _ = gptq(fn, host, batches, rules, act_order=True)
    got, report = gptq(fn, params, sharded_batches, rules, act_order=True)
    for name in host:
        # Summation order differs on the mesh: allow a rare flip of a rounding decision.
        assert _differs(got[name].values, want[name].values) < 0.01, name
        np.testing.assert_allclose(np.asarray(got[name].scale), np.asarray(want[name].scale), rtol=1e-4)
        assert got[name].values.sharding.is_equivalent_to(params[name].sharding, 2), name
    assert all(layer.error <= layer.rtn_error for layer in report.layers)


@pytest.mark.parametrize("method", [wanda, sparsegpt], ids=["wanda", "sparsegpt"])
def test_pruning_on_a_mesh_matches_one_device_and_keeps_the_sharding(setup, method):
    host, batches, params, sharded_batches = setup
    rules = [jc.PruneRule(pattern="a|b|c", sparsity=0.5)]
    want, want_masks = method(fn, host, batches, rules)
    got, masks = method(fn, params, sharded_batches, rules)
    for name in host:
        assert _differs(masks[name], want_masks[name]) < 0.01, name
        assert np.mean(np.asarray(got[name]) == 0) >= 0.5
        assert got[name].sharding.is_equivalent_to(params[name].sharding, 2), name
        assert masks[name].sharding.is_equivalent_to(params[name].sharding, 2), name


# ---- group scales along a sharded group axis (issue 21) ---------------------------------------

GROUP_SPECS = {"a": P(None, "model"), "b": P("model", "data"), "c": P("data", None)}


@pytest.fixture(scope="module")
def grouped_setup():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    keys = jax.random.split(jax.random.key(1), 5)
    host = {"a": np.asarray(jax.random.normal(keys[0], (16, 64))), "b": np.asarray(jax.random.normal(keys[1], (64, 64))) / 8,
            "c": np.asarray(jax.random.normal(keys[2], (64, 8)))}
    batches = [np.asarray(jax.random.normal(k, (32, 16))) for k in keys[3:]]
    params = {name: jax.device_put(value, NamedSharding(mesh, GROUP_SPECS[name])) for name, value in host.items()}
    return host, batches, params


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("group_size", [16, 32], ids=["aligned", "straddling"])
def test_group_scales_follow_a_sharded_group_axis(grouped_setup, method, group_size):
    """'b' (64, 64) has its input (group) axis split 4 ways over 'model' (16 rows a shard): g16
    groups align with the shards, so the (4, 64) scale is split along the group axis like the
    kernel; g32 groups straddle two shards, so the (2, 64) scale is replicated along it (never
    the codes, which stay split like the kernel). 'c' splits its group axis 2 ways over 'data'."""
    from jaxcompress.oneshot.awq import awq
    from jaxcompress.quant.arrays import scale_sharding

    host, batches, params = grouped_setup
    sizes = {"a": 16, "b": group_size, "c": group_size}  # 'a' has 16 input rows
    rules = [jc.QuantRule(pattern=name, bits=4, channel_axes=(-1,), group_size=size, symmetric=False) for name, size in sizes.items()]
    run = (lambda p, b: gptq(fn, p, b, rules)) if method == "gptq" else (lambda p, b: awq(fn, p, b, rules, grid=4))
    want, _ = run(host, batches)
    got, _ = run(params, batches)
    for name, param in params.items():
        q = got[name]
        spec = jc.QuantSpec(bits=4, channel_axes=(-1,), group_size=sizes[name], symmetric=False).resolve(param.shape)
        expected = scale_sharding(param.sharding, param.shape, spec)
        assert q.values.sharding.is_equivalent_to(param.sharding, 2), (name, q.values.sharding)
        assert q.scale.sharding.is_equivalent_to(expected, 2), (name, q.scale.sharding, expected)
        assert q.zero_point.sharding.is_equivalent_to(expected, 2), name
        np.testing.assert_allclose(np.asarray(q.scale), np.asarray(want[name].scale), rtol=1e-3)
    assert got["b"].scale.sharding.spec[0] == ("model" if group_size == 16 else None)
