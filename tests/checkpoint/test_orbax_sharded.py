"""`abstract_checkpoint` / `load_checkpoint(shardings=...)` / `follow_sharding` on one device (the
8-device mesh-to-mesh restores are in tests/multidevice/md_scale_checkpoint.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxcompress as jc
from jaxcompress.checkpoint.orbax_io import abstract_checkpoint, follow_sharding, load_checkpoint, save_checkpoint


@pytest.fixture
def mesh():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))


def test_follow_sharding_keeps_dividing_axes_only():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    sharding = NamedSharding(mesh, P(("data", "model"), None))
    assert follow_sharding(sharding, (1, 4)).spec == P(None, None)  # size-1 dims are replicated
    assert follow_sharding(sharding, (6, 4)).spec == P(("data", "model"), None)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert follow_sharding(single, (3,)) is single


def test_shardings_restore_equals_plain_restore(tmp_path, mesh):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((64, 16)), jnp.float32), "b": jnp.zeros(16)}
    qparams, _ = jc.quantize_params(params, [jc.QuantRule(pattern="w", bits=4, channel_axes=(-1,), group_size=16, group_axis=0)])
    masks = {"w": jnp.asarray(rng.random((64, 16)) > 0.5), "b": optax.MaskedNode()}
    save_checkpoint(tmp_path / "ckpt", qparams, masks)

    abstract, abstract_masks = abstract_checkpoint(tmp_path / "ckpt")
    assert abstract["w"].scale.shape == (4, 16) and abstract["w"].bits == 4
    assert isinstance(abstract_masks["b"], optax.MaskedNode) and abstract_masks["w"].dtype == jnp.bool_

    seen = []

    def shardings(path, shape):
        seen.append((path, shape))
        return NamedSharding(mesh, P(None, "model"))

    restored, restored_masks = load_checkpoint(tmp_path / "ckpt", shardings=shardings)
    plain, plain_masks = load_checkpoint(tmp_path / "ckpt")
    assert ("w", (64, 16)) in seen and ("b", (16,)) in seen
    np.testing.assert_array_equal(np.asarray(restored["w"].values, np.int8), np.asarray(plain["w"].values, np.int8))
    np.testing.assert_array_equal(np.asarray(restored["w"].scale), np.asarray(plain["w"].scale))
    np.testing.assert_array_equal(np.asarray(restored_masks["w"]), np.asarray(masks["w"]))
    assert restored["w"].values.sharding.spec == P(None, "model")
    assert isinstance(restored_masks["b"], optax.MaskedNode)


def test_abstract_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="not an Orbax checkpoint"):
        abstract_checkpoint(tmp_path)
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "plain", {"w": np.ones(3)})
    checkpointer.wait_until_finished()
    with pytest.raises(ValueError, match="not a jaxcompress checkpoint"):
        abstract_checkpoint(tmp_path / "plain")
    save_checkpoint(tmp_path / "jc", {"w": jnp.ones(3)})
    with pytest.raises(TypeError, match="shardings must be"):
        abstract_checkpoint(tmp_path / "jc", shardings="model")
