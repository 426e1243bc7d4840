"""Sharded Orbax checkpoints of compressed trees on 8 virtual CPU devices (run through
tests/test_multidevice.py): QArray trees (int8 per-channel, int4 per-group) and mask trees saved
from a 2x4 ('data', 'model') mesh restore BITWISE onto a 4x2 mesh, and from there onto 2 devices,
with the target shardings given per param path (`load_checkpoint(path, shardings=...)`, built on
`abstract_checkpoint`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxcompress as jc
import jaxcompress.pruning as jp
from jaxcompress.checkpoint.orbax_io import abstract_checkpoint, follow_sharding, load_checkpoint, save_checkpoint

SPECS = {  # Megatron: column-parallel up, row-parallel down, FSDP over 'data' on the other axis
    "up/kernel": P("data", "model"),
    "up/bias": P("model"),
    "down/kernel": P("model", "data"),
    "down/bias": P(),
}
RULES = {
    "int8-channel": [jc.QuantRule(pattern=r".*kernel", bits=8, channel_axes=(-1,))],
    "int4-g32": [jc.QuantRule(pattern=r".*kernel", bits=4, channel_axes=(-1,), group_size=32, group_axis=0)],
    "int8-asym": [jc.QuantRule(pattern=r".*kernel", bits=8, channel_axes=(-1,), symmetric=False)],
}


def spec_of(path: str) -> P:
    return SPECS[path]


def mesh_of(shape, devices=None):
    devices = jax.devices()[: int(np.prod(shape))] if devices is None else devices
    return jax.sharding.Mesh(np.array(devices).reshape(shape), ("data", "model"))


def placed(mesh):
    return lambda path, shape: NamedSharding(mesh, spec_of(path))


def host_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "up": {"kernel": rng.standard_normal((128, 256)).astype(np.float32), "bias": rng.standard_normal(256).astype(np.float32)},
        "down": {"kernel": rng.standard_normal((256, 128)).astype(np.float32), "bias": np.zeros(128, np.float32)},
    }


def sharded(tree, mesh):
    return {
        layer: {name: jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec_of(f"{layer}/{name}"))) for name, x in leaves.items()}
        for layer, leaves in tree.items()
    }


def _leaves(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return {jax.tree_util.keystr(p): x for p, x in flat}


def assert_bitwise_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for key in la:
        if isinstance(la[key], optax.MaskedNode):
            assert isinstance(lb[key], optax.MaskedNode), key
            continue
        x, y = np.asarray(la[key]), np.asarray(lb[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        if x.dtype.name in ("int4", "int2"):  # compare the bits of the unpacked values
            x, y = x.astype(np.int8), y.astype(np.int8)
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=key)


def assert_placed(qparams, masks, mesh):
    for layer in ("up", "down"):
        q = qparams[layer]["kernel"]
        want = NamedSharding(mesh, spec_of(f"{layer}/kernel"))
        assert isinstance(q, jc.QArray)
        assert q.values.sharding.is_equivalent_to(want, 2), (layer, q.values.sharding)
        assert q.scale.sharding.is_equivalent_to(follow_sharding(want, q.scale.shape), 2), (layer, q.scale.sharding)
        if q.zero_point is not None:
            assert q.zero_point.sharding.is_equivalent_to(follow_sharding(want, q.zero_point.shape), 2)
        assert masks[layer]["kernel"].sharding.is_equivalent_to(want, 2)
        assert isinstance(masks[layer]["bias"], optax.MaskedNode)
        bias = qparams[layer]["bias"]
        assert bias.sharding.is_equivalent_to(NamedSharding(mesh, spec_of(f"{layer}/bias")), 1)


@pytest.mark.parametrize("which", list(RULES))
def test_save_on_2x4_restore_on_4x2_then_2_devices_bitwise(tmp_path, which):
    mesh8 = mesh_of((2, 4))
    params = sharded(host_tree(), mesh8)
    pruned, masks = jp.prune_params(params, jp.PruneRule(pattern=r".*kernel", sparsity=0.7))
    qparams, _ = jc.quantize_params(pruned, RULES[which])
    assert qparams["up"]["kernel"].values.sharding.is_equivalent_to(params["up"]["kernel"].sharding, 2)
    save_checkpoint(tmp_path / "a", qparams, masks)

    # 8 devices as 2x4 -> the same 8 devices as 4x2 (every shard moves)
    mesh42 = mesh_of((4, 2))
    restored, restored_masks = load_checkpoint(tmp_path / "a", shardings=placed(mesh42))
    assert_placed(restored, restored_masks, mesh42)
    assert_bitwise_equal(restored, qparams)
    assert_bitwise_equal(restored_masks, masks)
    assert restored["up"]["kernel"].values.addressable_shards[0].data.shape == (32, 128)

    # save from 4x2, restore onto 2 devices (1 x 2)
    save_checkpoint(tmp_path / "b", restored, restored_masks)
    mesh2 = mesh_of((1, 2), jax.devices()[6:])
    again, again_masks = load_checkpoint(tmp_path / "b", shardings=placed(mesh2))
    assert_placed(again, again_masks, mesh2)
    assert {d.id for d in again["down"]["kernel"].values.sharding.device_set} == {6, 7}
    assert_bitwise_equal(again, qparams)
    assert_bitwise_equal(again_masks, masks)
    # the restored tree runs: dequantized it matches the original on every layout
    np.testing.assert_array_equal(
        np.asarray(jc.dequantize_params(again)["up"]["kernel"]), np.asarray(jc.dequantize_params(qparams)["up"]["kernel"])
    )


def test_abstract_checkpoint_is_metadata_only_and_validates(tmp_path):
    mesh8 = mesh_of((2, 4))
    qparams, _ = jc.quantize_params(sharded(host_tree(), mesh8), RULES["int4-g32"])
    save_checkpoint(tmp_path / "c", qparams)
    params, masks = abstract_checkpoint(tmp_path / "c", NamedSharding(mesh_of((4, 2)), P("data", "model")))
    q = params["up"]["kernel"]
    assert masks is None and isinstance(q.values, jax.ShapeDtypeStruct)
    assert q.values.dtype == jnp.int4 and q.scale.shape == (4, 256) and q.group_size == 32
    assert q.scale.sharding.spec == P("data", "model")  # 4 groups over 'data' (4): kept
    assert params["up"]["bias"].sharding.spec == P("data")  # one sharding for all, adapted to rank 1
    with pytest.raises(TypeError, match="either shardings or target"):
        load_checkpoint(tmp_path / "c", target=params, shardings=placed(mesh8))
    with pytest.raises(TypeError, match="expected a jax.sharding.Sharding"):
        load_checkpoint(tmp_path / "c", shardings=lambda path, shape: "model")
