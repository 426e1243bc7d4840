"""Quantization of sharded params on 8 virtual CPU devices (run via tests/test_multidevice.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


def _kernel(mesh, shape=(256, 128)):
    x = jax.random.normal(jax.random.key(0), shape)
    return jax.device_put(x, NamedSharding(mesh, P("data", "model")))


@pytest.mark.parametrize("options", [
    dict(bits=8, channel_axes=(-1,)),
    dict(bits=4, channel_axes=(-1,), group_size=32, group_axis=0),
    dict(bits=8, channel_axes=(-1,), symmetric=False, calibration="mse"),
], ids=["int8-channel", "int4-g32", "int8-asym-mse"])
def test_per_channel_quantization_keeps_sharding_without_all_gather(mesh, options):
    kernel = _kernel(mesh)
    f = jax.jit(lambda w: jc.quantize(w, **options))
    q = f(kernel)
    assert q.values.sharding.mesh.shape == mesh.shape
    assert q.values.sharding.is_equivalent_to(kernel.sharding, 2)
    # The scale is sharded along the channel axis ('model'), like the kernel's output axis; a
    # per-group scale (#groups, channels) also follows the kernel's sharding of the group axis.
    expected = P("data", "model") if options.get("group_size") else P(None, "model")
    assert q.scale.sharding.is_equivalent_to(NamedSharding(mesh, expected), 2), q.scale.sharding
    hlo = f.lower(kernel).compile().as_text()
    assert "all-gather" not in hlo
    # Same numbers as on one device.
    single = jc.quantize(np.asarray(kernel), **options)
    np.testing.assert_array_equal(np.asarray(q.values.astype(jnp.int8)), np.asarray(single.values.astype(jnp.int8)))
    np.testing.assert_allclose(np.asarray(q.scale), np.asarray(single.scale), rtol=1e-6)


def test_quantize_params_eagerly_on_sharded_tree(mesh):
    params = {"dense": {"kernel": _kernel(mesh), "bias": jnp.zeros(128)}}
    qparams, _ = jc.quantize_params(params, [jc.QuantRule(pattern=".*kernel", bits=8, channel_axes=(-1,))])
    q = qparams["dense"]["kernel"]
    assert q.values.sharding.is_equivalent_to(params["dense"]["kernel"].sharding, 2)
    assert q.scale.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)
    dq = jc.dequantize_params(qparams)["dense"]["kernel"]
    assert dq.sharding.is_equivalent_to(params["dense"]["kernel"].sharding, 2)
