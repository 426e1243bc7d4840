"""Codes stored (out, in) (`QArray.stored_permutation`) on 8 virtual CPU devices: the stored codes
carry the param's sharding with its axes moved, integer execution and checkpoints keep working
(run via tests/test_multidevice.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcompress as jc
from jaxcompress.quant.arrays import place_like_param

RULES = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


def _params(mesh):
    kernel = jax.random.normal(jax.random.key(0), (256, 128))
    return {"dense": {
        "kernel": jax.device_put(kernel, NamedSharding(mesh, P("data", "model"))),
        "bias": jax.device_put(jnp.zeros(128), NamedSharding(mesh, P("model"))),
    }}


def _check_placement(mesh, q, kernel):
    assert q.stored_permutation == (1, 0) and q.values.shape == (128, 256)
    assert q.values.sharding.is_equivalent_to(NamedSharding(mesh, P("model", "data")), 2), q.values.sharding
    assert q.scale.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2), q.scale.sharding
    assert q.dequantize().sharding.is_equivalent_to(kernel.sharding, 2)


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_quantize_params_stores_sharded_kernels_with_moved_shardings(mesh, jitted):
    params = _params(mesh)
    quantize = (lambda p: jc.quantize_params(p, RULES)[0])
    qparams = jax.jit(quantize)(params) if jitted else quantize(params)
    q = qparams["dense"]["kernel"]
    _check_placement(mesh, q, params["dense"]["kernel"])
    single = jc.quantize(np.asarray(params["dense"]["kernel"]), channel_axes=(-1,), activation="dynamic")
    np.testing.assert_array_equal(np.asarray(q.logical_values), np.asarray(single.values))


def test_compressed_on_the_mesh_matches_one_device(mesh):
    params = _params(mesh)
    qparams, _ = jc.quantize_params(params, RULES)
    x = jax.random.normal(jax.random.key(1), (16, 256))
    fn = jax.jit(jc.compressed(lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]))
    out = fn(qparams, x)
    local = jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a), jax.devices()[0]), qparams)
    np.testing.assert_allclose(np.asarray(out), np.asarray(fn(local, x)), rtol=1e-6, atol=1e-6)
    hlo = fn.lower(qparams, x).compile().as_text()
    assert not [line for line in hlo.splitlines() if "all-gather" in line and "s8[128,256]" in line]


def test_place_like_param_moves_the_sharding_with_the_codes(mesh):
    params = _params(mesh)
    kernel = params["dense"]["kernel"]
    q = jc.quantize(np.asarray(kernel), channel_axes=(-1,), activation="dynamic").with_layout((1, 0))
    _check_placement(mesh, place_like_param(kernel, q), kernel)


def test_orbax_restore_onto_the_mesh_keeps_the_stored_layout(mesh, tmp_path):
    params = _params(mesh)
    qparams, _ = jc.quantize_params(params, RULES)
    path = tmp_path / "ckpt"
    jc.save_checkpoint(path, qparams)

    def shardings(name, shape):
        return NamedSharding(mesh, P("data", "model") if name.endswith("kernel") else P("model"))

    restored, _ = jc.load_checkpoint(path, shardings=shardings)
    q = restored["dense"]["kernel"]
    _check_placement(mesh, q, params["dense"]["kernel"])
    np.testing.assert_array_equal(np.asarray(q.values), np.asarray(qparams["dense"]["kernel"].values))
