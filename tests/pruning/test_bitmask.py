"""`bitmask.bit_view`: masks read as bits inside `prune`'s step.

What must hold: the view equals the mask bit for bit (any shape, last axis not a multiple of 8);
`prune` gives bit-identical params, masks and optimizer state whether it reads the masks as bits
or as bools (gradual pruning and dynamic sparse training); and in the compiled step each bool
mask is read by ONE instruction (the packing) instead of one per use, with the packed bits the
only temporary added (1/8 byte per pruned weight).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxcompress.pruning as jp
from jaxcompress.pruning import bitmask


@pytest.fixture
def always_packed(monkeypatch):
    monkeypatch.setattr(bitmask, "MIN_PACKED_SIZE", 0)


@given(
    shape=st.lists(st.integers(1, 21), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**31 - 1),
)
def test_bit_view_equals_the_mask(shape, seed):
    mask = np.random.default_rng(seed).random(shape) < 0.5
    bitmask.MIN_PACKED_SIZE, old = 0, bitmask.MIN_PACKED_SIZE
    try:
        view = jax.jit(bitmask.bit_view)(jnp.asarray(mask))
    finally:
        bitmask.MIN_PACKED_SIZE = old
    assert view.dtype == jnp.bool_ and view.shape == mask.shape
    np.testing.assert_array_equal(np.asarray(view), mask)


def test_small_scalar_and_uint8_masks():
    small = jnp.array([True, False, True])
    assert bitmask.bit_view(small) is small  # under MIN_PACKED_SIZE: used as it is
    assert bitmask.bit_view(jnp.array(True)).shape == ()
    as_uint8 = bitmask.bit_view(jnp.ones((3,), jnp.uint8))
    assert as_uint8.dtype == jnp.bool_ and bool(as_uint8.all())


def _params():
    rng = np.random.default_rng(0)
    return {
        "a": {"kernel": jnp.asarray(rng.standard_normal((12, 37)), jnp.float32), "bias": jnp.zeros(37)},
        "b": {"kernel": jnp.asarray(rng.standard_normal((37, 5)), jnp.float32)},
    }


def _loss(params, x):
    h = jnp.tanh(x @ params["a"]["kernel"] + params["a"]["bias"])
    return jnp.mean((h @ params["b"]["kernel"]) ** 2)


def _run(opt, steps=9):
    params = _params()
    state = opt.init(params)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 12)), jnp.float32)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(_loss)(params, x), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("kind", ["gradual", "rigl"])
def test_prune_is_bit_identical_with_packed_masks(kind, monkeypatch):
    def make():
        if kind == "gradual":
            rule = jp.PruneRule(pattern=".*kernel", sparsity=jp.polynomial(0.7, begin_step=0, end_step=6, frequency=2))
            return jp.prune(optax.adamw(0.05, weight_decay=0.1), rule, update_every=2)
        rule = jp.PruneRule(pattern=".*kernel", sparsity=0.6)
        return jp.prune(optax.adam(0.05), rule, update_every=2, dst=jp.RigL(end_step=8, drop_fraction=0.5))

    monkeypatch.setattr(bitmask, "MIN_PACKED_SIZE", 1 << 40)
    as_bools = _run(make())
    monkeypatch.setattr(bitmask, "MIN_PACKED_SIZE", 0)
    as_bits = _run(make())
    masks = jp.prune_masks(as_bits[1])
    assert 0.5 < jp.mask_sparsity(masks)["total"] < 0.8
    for want, got in zip(jax.tree.leaves(as_bools), jax.tree.leaves(as_bits)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _entry(hlo: str) -> list[str]:
    lines = hlo.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    return lines[start + 1 : end]


def _readers(lines: list[str], shape: str) -> list[str]:
    """Entry instructions (not tuples, parameters or tuple accesses) with a pred[shape] operand
    that XLA materialised: the passes that read the bool mask's bytes."""
    pattern = re.compile(r"%(\S+) = pred\[" + shape + r"\]\{")
    names = {m.group(1) for line in lines if (m := pattern.search(line))}
    out = []
    for line in lines:
        op = re.search(r"= \S+ ([\w-]+)\(", line)
        if op is None or op.group(1) in ("tuple", "get-tuple-element", "parameter", "conditional"):
            continue
        operands = line.split("(", 1)[1]
        if any(re.search(r"%" + re.escape(n) + r"[,)]", operands) for n in names):
            out.append(op.group(1))
    return out


def test_compiled_step_reads_each_mask_once(always_packed):
    params = {"w": jnp.ones((64, 256)), "b": jnp.zeros(256)}
    grads = jax.tree.map(jnp.ones_like, params)
    rule = jp.PruneRule(pattern="w", sparsity=jp.polynomial(0.5, begin_step=0, end_step=100, frequency=10))
    opt = jp.prune(optax.adam(1e-3), rule, update_every=10)
    state = opt.init(params)
    compiled = jax.jit(opt.update, donate_argnums=(1,)).lower(grads, state, params).compile()
    readers = _readers(_entry(compiled.as_text()), "64,256")
    # one fusion packs the mask; the three uses (masked gradient into mu and nu, the final
    # select) read the bits
    assert readers == ["fusion"], readers
    plain = jax.jit(optax.adam(1e-3).update).lower(grads, optax.adam(1e-3).init(params), params).compile()
    extra = compiled.memory_analysis().temp_size_in_bytes - plain.memory_analysis().temp_size_in_bytes
    assert extra <= 64 * 256 // 8 + 4096, extra
