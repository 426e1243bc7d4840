"""Orbax save / restore of trees holding QArrays and masks (exact dtypes and metadata)."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxcompress as jc
from jaxcompress.checkpoint import orbax_io
from jaxcompress.qarray import QArray


def _tree():
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(key, (8, 4))
    return {
        "dense": {
            "kernel": jc.quantize(w, bits=4, channel_axes=(-1,), group_size=4),
            "bias": jnp.arange(4.0),
        },
        "int2": jc.quantize(w, bits=2, symmetric=False),
        "fp8": jc.quantize(w, qtype="float8_e4m3fn", channel_axes=(0,)),
        "layers": [jc.quantize(w, bits=8), jnp.ones(3, jnp.bfloat16)],
        "step": jnp.array(7, jnp.int32),
    }


def _masks(tree):
    return {
        "dense": {"kernel": jnp.arange(32).reshape(8, 4) % 3 == 0, "bias": optax.MaskedNode()},
        "int2": optax.MaskedNode(),
        "fp8": optax.MaskedNode(),
        "layers": [jnp.ones((8, 4), bool), optax.MaskedNode()],
        "step": optax.MaskedNode(),
    }


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=lambda x: isinstance(x, QArray))
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=lambda x: isinstance(x, QArray))
    assert ta == tb
    for x, y in zip(la, lb):
        if isinstance(x, QArray):
            assert isinstance(y, QArray)
            assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)  # static metadata
            for fx, fy in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
                assert fx.dtype == fy.dtype and fx.shape == fy.shape
                np.testing.assert_array_equal(np.asarray(fx.astype(jnp.float32)), np.asarray(fy.astype(jnp.float32)))
        else:
            assert np.asarray(x).dtype == np.asarray(y).dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_without_target(tmp_path):
    tree, path = _tree(), tmp_path / "ckpt"
    masks = _masks(tree)
    orbax_io.save_checkpoint(path, tree, masks)
    params, restored_masks = orbax_io.load_checkpoint(path)
    _assert_same(tree, params)
    assert isinstance(params["layers"], list)
    assert restored_masks["dense"]["bias"] == optax.MaskedNode()
    assert restored_masks["layers"][1] == optax.MaskedNode()
    _assert_same(masks, restored_masks)


def test_roundtrip_into_abstract_target(tmp_path):
    tree, path = _tree(), tmp_path / "ckpt"
    orbax_io.save_checkpoint(path, tree, _masks(tree))
    abstract = jax.eval_shape(lambda: tree)
    params, masks = orbax_io.load_checkpoint(path, abstract)
    _assert_same(tree, params)
    assert masks["int2"] == optax.MaskedNode()


def test_target_with_different_metadata_names_leaf(tmp_path):
    tree, path = _tree(), tmp_path / "ckpt"
    orbax_io.save_checkpoint(path, tree)
    other = dict(tree, int2=jc.quantize(jnp.ones((8, 4)), bits=3, symmetric=False))
    with pytest.raises(ValueError, match=r"int2: QArray metadata differs.*bits"):
        orbax_io.load_checkpoint(path, jax.eval_shape(lambda: other))
    with pytest.raises(ValueError, match="in the target only"):
        orbax_io.load_checkpoint(path, dict(tree, extra=jnp.ones(2)))


def test_checkpoint_manager_roundtrip(tmp_path):
    tree = _tree()
    manager = ocp.CheckpointManager(tmp_path / "run")
    orbax_io.save_to_manager(manager, 1, tree)
    orbax_io.save_to_manager(manager, 2, tree, _masks(tree))
    params, masks = orbax_io.restore_from_manager(manager)
    _assert_same(tree, params)
    assert masks["fp8"] == optax.MaskedNode()
    params1, masks1 = orbax_io.restore_from_manager(manager, 1, jax.eval_shape(lambda: tree))
    _assert_same(tree, params1)
    assert masks1 is None


def test_foreign_and_plain_directories(tmp_path):
    with pytest.raises(ValueError, match="not an Orbax checkpoint"):
        orbax_io.load_checkpoint(tmp_path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "plain", {"w": np.ones(3, np.float32)})
    checkpointer.wait_until_finished()
    params, masks = orbax_io.load_checkpoint(tmp_path / "plain")
    assert masks is None and params["w"].tolist() == [1.0, 1.0, 1.0]


def test_iter_orbax_leaves_streams_all(tmp_path):
    tree = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(4, np.float16)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "plain", tree)
    checkpointer.wait_until_finished()
    leaves = dict((tuple(t[1] for t in tokens), a) for tokens, a in orbax_io.iter_orbax_leaves(tmp_path / "plain", budget_bytes=1))
    assert set(leaves) == {("a", "w"), ("b",)}
    np.testing.assert_array_equal(leaves[("a", "w")], tree["a"]["w"])
    assert leaves[("b",)].dtype == np.float16


def test_restore_into_sharded_abstract_target(tmp_path):
    tree = _tree()
    orbax_io.save_checkpoint(tmp_path / "ckpt", tree)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    params, _ = orbax_io.load_checkpoint(tmp_path / "ckpt", abstract)
    _assert_same(tree, params)
    assert params["dense"]["kernel"].values.sharding == sharding
