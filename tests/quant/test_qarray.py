"""QArray: storage dtypes, honest byte counts, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.qarray import storage_bits, storage_dtype


@pytest.mark.parametrize("bits,dtype,bits_per_value", [
    (2, jnp.int2, 2), (3, jnp.int4, 4), (4, jnp.int4, 4), (5, jnp.int8, 8), (8, jnp.int8, 8),
])
def test_storage_dtype_and_bits(bits, dtype, bits_per_value):
    assert storage_dtype(bits) == jnp.dtype(dtype)
    assert storage_bits(storage_dtype(bits)) == bits_per_value


@pytest.mark.parametrize("bits,values_bytes", [(8, 4096), (4, 2048), (3, 2048), (2, 1024)])
@pytest.mark.parametrize("symmetric", [True, False, None])
def test_nbytes_per_channel(bits, values_bytes, symmetric):
    q = jc.quantize(jnp.ones((64, 64)), bits=bits, channel_axes=(-1,), symmetric=symmetric)
    asymmetric = symmetric is False or (symmetric is None and bits <= 4)  # the default by bits
    # 64 f32 scales; asymmetric: 64 zero points in the values' container (int4 below 5 bits, int8 else)
    zero_bytes = 64 * storage_bits(storage_dtype(bits)) // 8 if asymmetric else 0
    assert (q.zero_point is not None) == asymmetric
    assert q.nbytes == values_bytes + 64 * 4 + zero_bytes


def test_nbytes_grouped_asymmetric_and_fp8():
    x = jnp.linspace(-1, 1, 256 * 32).reshape(256, 32)
    q = jc.quantize(x, bits=4, channel_axes=(-1,), group_size=128, symmetric=False)
    # 8192 int4 values = 4096 B; scale (2, 32) f32 = 256 B; zero point (2, 32) int4 = 32 B.
    assert q.scale.shape == (2, 32) and q.zero_point.shape == (2, 32)
    assert q.nbytes == 4096 + 256 + 32
    f = jc.quantize(x, qtype="float8_e5m2")
    assert f.nbytes == 8192 + 4


def test_odd_element_count_rounds_up_to_whole_bytes():
    q = jc.quantize(jnp.ones((3, 3)), bits=4, symmetric=True)
    assert q.nbytes == 5 + 4  # 9 nibbles -> 5 bytes, plus one f32 scale
    q = jc.quantize(jnp.ones((3, 3)), bits=4)  # asymmetric by default: one int4 zero point, 1 byte
    assert q.nbytes == 5 + 4 + 1


def test_is_a_pytree_with_static_metadata():
    q = jc.quantize(jnp.ones((8, 4)), bits=4, channel_axes=(-1,), group_size=4, symmetric=False)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3  # values, scale, zero_point
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.bits == 4 and rebuilt.group_size == 4 and rebuilt.channel_axes == (1,)
    symmetric = jc.quantize(jnp.ones((8, 4)), bits=8)
    assert len(jax.tree_util.tree_leaves(symmetric)) == 2
    # Static metadata is part of the treedef: a different bit width is a different structure.
    assert jax.tree_util.tree_structure(symmetric) != jax.tree_util.tree_structure(
        jc.quantize(jnp.ones((8, 4)), bits=6)
    )


def test_passes_through_jit_as_an_argument():
    q = jc.quantize(jnp.arange(12.0).reshape(3, 4), bits=8, channel_axes=(0,))
    dq = jax.jit(lambda qa: qa.dequantize())(q)
    np.testing.assert_array_equal(dq, q.dequantize())


def test_array_surface_and_repr():
    q = jc.quantize(jnp.ones((2, 3, 4)), bits=4, channel_axes=(2,), group_axis=1, group_size=3)
    assert q.shape == (2, 3, 4) and q.ndim == 3 and q.size == 24
    assert q.shared_axes == (0,)
    assert "int4" in repr(q) and "per-group" in repr(q)
