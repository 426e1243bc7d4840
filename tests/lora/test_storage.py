"""Adapter-only checkpoints: safetensors and Orbax round trips, and clear errors against a base that does not fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.lora import LoraAdapter, LoraRule, LoraTargetError, load_adapters, lora_init, save_adapters


def _base_and_adapters():
    params = {"block": {"q": {"kernel": jnp.ones((8, 2, 4))}, "o": {"kernel": jnp.ones((2, 4, 8))}}, "stack": jnp.ones((3, 4, 5))}
    qbase, _ = jc.quantize_params(params, [jc.QuantRule(pattern=".*", bits=4, channel_axes=(-1,))])
    rules = [LoraRule(pattern=".*q/kernel", output_axes=2, rank=3, alpha=6.0), LoraRule(pattern=".*o/kernel"), LoraRule(pattern="stack", stacked_axes=1)]
    adapters = lora_init(jax.random.key(0), qbase, rules, rank=2)
    adapters = jax.tree_util.tree_map(lambda a: a + 0.25, adapters)  # nonzero B
    return params, qbase, adapters


@pytest.mark.parametrize("name", ["adapters.safetensors", "adapters_orbax"])
def test_round_trip_is_exact_and_writes_only_adapters(tmp_path, name):
    params, qbase, adapters = _base_and_adapters()
    path = tmp_path / name
    save_adapters(path, adapters)
    restored = load_adapters(path, qbase)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(adapters)
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(adapters)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert restored["block"]["q"]["kernel"].alpha == 6.0 and restored["stack"].stacked_axes == 1
    assert restored["block"]["q"]["kernel"].output_axes == 2
    # the file holds the adapters and nothing of the base
    raw = jc.import_safetensors(path)[0] if path.suffix else jc.load_checkpoint(path)[0]
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(raw)[0]}
    fields = ("a", "alpha", "b", "output_axes", "stacked_axes")
    kernels = ("['block']['o']['kernel']", "['block']['q']['kernel']", "['stack']")
    assert names == {f"{k}['{f}']" for k in kernels for f in fields}
    with pytest.raises(FileExistsError):
        save_adapters(path, adapters)
    save_adapters(path, adapters, force=True)


def test_loading_against_a_base_that_does_not_fit_names_the_leaf(tmp_path):
    _, qbase, adapters = _base_and_adapters()
    path = tmp_path / "adapters.safetensors"
    save_adapters(path, adapters)
    other = dict(qbase, stack=jnp.ones((3, 4, 7)))
    with pytest.raises(LoraTargetError, match=r"params/stack.*do not fit.*\(3, 4, 7\)"):
        load_adapters(path, other)
    with pytest.raises(LoraTargetError, match="params/block/o/kernel.*does not have"):
        load_adapters(path, {"block": {"q": qbase["block"]["q"]}, "stack": qbase["stack"]})
    jc.export_safetensors(tmp_path / "model.safetensors", {"w": jnp.ones((2, 2))})
    with pytest.raises(LoraTargetError, match="not a LoRA adapter record"):
        load_adapters(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="empty"):
        save_adapters(tmp_path / "none.safetensors", {})
    with pytest.raises(TypeError, match=r"adapters\['w'\]"):
        save_adapters(tmp_path / "bad.safetensors", {"w": jnp.ones(2)})
    assert isinstance(load_adapters(path)["stack"], LoraAdapter)
