"""LoRA over a base whose int8 codes `quantize_params` stored (out, in) (a W8A8 Flax Dense):
the adapted function equals the merged float tree's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxcompress as jc
from jaxcompress import lora


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8)(nn.relu(nn.Dense(16)(x)))


def test_adapters_over_a_stored_layout_base_match_the_merged_tree():
    model, x = _MLP(), jax.random.normal(jax.random.key(1), (4, 12))
    params = model.init(jax.random.key(0), x)
    base, _ = jc.quantize_params(params, [jc.QuantRule(pattern=".*kernel", channel_axes=(-1,), activation="dynamic")])
    kernels = [leaf for leaf in jax.tree.leaves(base, is_leaf=lambda v: isinstance(v, jc.QArray)) if isinstance(leaf, jc.QArray)]
    assert [k.stored_permutation for k in kernels] == [(1, 0), (1, 0)]
    adapters = lora.lora_init(jax.random.key(2), base, [lora.LoraRule(pattern=".*kernel")], rank=2)
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)  # B starts at zero: make the update non-zero
    out = np.asarray(jax.jit(lora.lora_apply(model.apply))(base, adapters, x), np.float64)
    merged = np.asarray(model.apply(lora.merge_lora(base, adapters), x), np.float64)
    assert np.abs(merged - np.asarray(model.apply(jc.dequantize_params(base), x))).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(out, merged, rtol=1e-5, atol=1e-5 * np.abs(merged).max())
