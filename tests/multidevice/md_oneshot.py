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
