"""compressed() on NamedSharding'd quantized params (8 virtual CPU devices; run through
tests/test_multidevice.py): shardings are kept and no full parameter is all-gathered."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxcompress as jc
from jaxcompress.execute.transform import compressed


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.relu(nn.Dense(64, name="up")(x))
        return nn.Dense(32, name="down")(h)


def _shard_qarray(q, mesh, spec):
    """values / scale sharded along the same mesh axis (scale axes of size 1 replicated)."""
    scale_spec = P(*[name if q.scale.shape[i] == q.shape[i] else None for i, name in enumerate(spec)])
    return jc.QArray(
        **{
            **q.__dict__,
            "values": jax.device_put(q.values, NamedSharding(mesh, P(*spec))),
            "scale": jax.device_put(q.scale, NamedSharding(mesh, scale_spec)),
        }
    )


def test_sharded_qparams_keep_shardings_and_avoid_all_gathers():
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("model",))
    model = MLP()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 32)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    rules = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]
    qparams, _ = jc.quantize_params(params, rules, layout="logical")  # placed by logical specs below
    p = qparams["params"]
    # Megatron-style: "up" column-parallel (output axis), "down" row-parallel (input axis).
    sharded = {
        "params": {
            "up": {
                "kernel": _shard_qarray(p["up"]["kernel"], mesh, (None, "model")),
                "bias": jax.device_put(p["up"]["bias"], NamedSharding(mesh, P("model"))),
            },
            "down": {
                "kernel": _shard_qarray(p["down"]["kernel"], mesh, ("model", None)),
                "bias": jax.device_put(p["down"]["bias"], NamedSharding(mesh, P())),
            },
        }
    }
    apply = jax.jit(compressed(model.apply))
    out = apply(sharded, x)
    ref = jax.jit(compressed(model.apply))(qparams, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)

    # the params are untouched and still sharded as placed
    up = sharded["params"]["up"]["kernel"]
    assert up.values.sharding.spec == P(None, "model")
    assert up.values.addressable_shards[0].data.shape == (32, 8)

    hlo = apply.lower(sharded, x).compile().as_text()
    gathers = [line for line in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", line)]
    full_shapes = ("[32,64]", "[64,32]")
    assert not [g for g in gathers if any(s in g.split("=")[1].split(" ")[1] for s in full_shapes)], gathers
    # the int8 dots run on the shards: s8 operands of the per-device (sharded) sizes
    assert re.search(r"s8\[32,8\]", hlo), "column-parallel int8 kernel shard not in the program"
    assert re.search(r"s8\[8,32\]", hlo), "row-parallel int8 kernel shard not in the program"
