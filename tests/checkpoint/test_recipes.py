"""Recipes: TOML tables map one-to-one to rules; presets load by name; errors name the key."""

import dataclasses

import pytest

from jaxcompress.checkpoint import recipes
from jaxcompress.pruning import PruneRule
from jaxcompress.rules import QuantRule


def test_presets_load_and_aliases():
    assert recipes.list_presets() == ["2of4-int8", "sparse90-int8", "w4-g128", "w4-g128-bf16", "w4-g128-emb-row", "w8a8"]
    for alias, name in recipes.PRESET_ALIASES.items():
        assert recipes.load_recipe(alias).name == name
    w8a8 = recipes.load_recipe("w8a8")
    assert all(isinstance(r, QuantRule) for r in w8a8.quantize) and w8a8.prune == ()
    assert w8a8.quantize[2].pattern == ".*weight" and w8a8.quantize[2].activation == "dynamic"
    nm = recipes.load_recipe("2:4+int8")
    assert isinstance(nm.prune[1], PruneRule) and (nm.prune[1].n, nm.prune[1].m, nm.prune[1].axis) == (2, 4, -1)
    assert "prune[1]" in nm.describe()


def test_one_to_one_mapping(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'description = "d"\n'
        '[[quantize]]\npattern = ".*kernel"\nbits = 4\nchannel_axes = [-1]\ngroup_size = 32\n'
        'calibration = { method = "mse", grid_size = 8 }\n'
        '[[prune]]\npattern = ".*kernel"\nstructure = "block"\nblock_size = [2, 2]\nsparsity = 0.5\n'
    )
    recipe = recipes.load_recipe(path)
    assert recipe.name == "mine" and recipe.source == str(path)
    rule = recipe.quantize[0]
    assert rule == QuantRule(pattern=".*kernel", bits=4, channel_axes=(-1,), group_size=32, calibration=dataclasses.replace(rule.calibration))
    assert rule.calibration.method == "mse" and rule.calibration.grid_size == 8
    assert recipe.prune[0] == PruneRule(pattern=".*kernel", structure="block", block_size=(2, 2), sparsity=0.5)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[quantize]]\npattern = ".*"\nbitz = 4\n', r"quantize\[0\]\.bitz: unknown key"),
        ('[[quantize]]\nbits = 4\n', r"quantize\[0\]: missing 'pattern'"),
        ('[[quantize]]\npattern = ".*"\nbits = 9\n', r"quantize\[0\]: bits must be in 2..8"),
        ('[[prune]]\npattern = ".*"\nsparsity = 1.5\n', r"prune\[0\]: .*sparsity"),
        ('quantize = 3\n', r"quantize: expected an array of tables"),
        ('colour = "red"\n[[quantize]]\npattern = ".*"\n', r"colour: unknown top-level key"),
        ('name = "x"\n', "no \\[\\[quantize\\]\\] or \\[\\[prune\\]\\] tables"),
        ('[[quantize]\n', "not valid TOML"),
        ('[[quantize]]\npattern = "("\n', r"quantize\[0\]: rule pattern '\(' is not a valid regex"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(recipes.RecipeError, match=message) as info:
        recipes.load_recipe(path)
    assert "bad.toml" in str(info.value)


def test_unknown_name():
    with pytest.raises(recipes.RecipeError, match="not a preset \\(presets: 2of4-int8"):
        recipes.load_recipe("w3-magic")
