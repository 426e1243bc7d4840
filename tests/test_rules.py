"""Rule matching: path strings for every container kind, first full match wins, unused rules."""

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxcompress as jc
from jaxcompress.rules import check_unused_rules, path_to_keystr


class Pair(NamedTuple):
    w: jax.Array
    b: jax.Array


def _paths(tree):
    return jc.match_rules(tree, []).path_strs


def test_paths_of_dicts_lists_and_namedtuples():
    tree = {"enc": [Pair(jnp.ones(2), jnp.zeros(2)), {"k": jnp.ones(1)}]}
    assert _paths(tree) == ("enc/0/w", "enc/0/b", "enc/1/k")


def test_paths_of_a_linen_params_tree():
    model = nn.Sequential([nn.Conv(4, (3, 3)), nn.Dense(2)])
    params = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    assert set(_paths(params)) == {
        "params/layers_0/kernel", "params/layers_0/bias", "params/layers_1/kernel", "params/layers_1/bias",
    }


def test_paths_of_an_nnx_state_drop_the_variable_value():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

    _, state = nnx.split(MLP(nnx.Rngs(0)))
    assert set(_paths(state)) == {"layers/0/kernel", "layers/0/bias", "layers/1/kernel", "layers/1/bias"}


def test_paths_of_a_registered_dataclass():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Block:
        kernel: jax.Array
        scale: jax.Array

    assert _paths({"b": Block(jnp.ones(2), jnp.ones(1))}) == ("b/kernel", "b/scale")


def test_first_full_match_wins_and_search_is_not_enough():
    tree = {"dense": {"kernel": 1.0}, "kernel_norm": 2.0}
    rules = [jc.Rule(pattern="kernel"), jc.Rule(pattern=r".*kernel"), jc.Rule(pattern=r"dense/.*")]
    m = jc.match_rules(tree, rules)
    assert dict(zip(m.path_strs, m.rule_indices)) == {"dense/kernel": 1, "kernel_norm": None}
    assert m.unused_rules == (0, 2)


def test_unused_rules_warn_error_or_ignore():
    rules = [jc.Rule(pattern="nothing/here")]
    with pytest.warns(UserWarning, match=r"rules\[0\] \(pattern 'nothing/here'\)"):
        check_unused_rules(rules, (0,), "warn")
    with pytest.raises(ValueError, match="matched no leaf"):
        check_unused_rules(rules, (0,), "error")
    check_unused_rules(rules, (0,), "ignore")
    with pytest.raises(ValueError, match="on_unused"):
        check_unused_rules(rules, (0,), "sometimes")


def test_bad_patterns_and_non_rules():
    with pytest.raises(ValueError, match="not a valid regex"):
        jc.Rule(pattern="[")
    with pytest.raises(TypeError, match="not a rule"):
        jc.match_rules({"a": 1}, ["a"])


def test_rules_are_frozen_and_keyword_only():
    rule = jc.QuantRule(pattern="a", bits=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.bits = 8
    with pytest.raises(TypeError):
        jc.QuantRule("a")
    assert hash(rule) == hash(jc.QuantRule(pattern="a", bits=4))


def test_keystr_for_error_messages():
    flat = jax.tree_util.tree_flatten_with_path({"conv_1": {"kernel": 0}})[0]
    assert path_to_keystr(flat[0][0]) == "params['conv_1']['kernel']"
