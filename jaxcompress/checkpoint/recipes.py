"""Recipes: TOML files whose tables map one-to-one to rules.

A recipe has an optional ``name`` and ``description``, then ``[[prune]]`` tables (each one a
`jaxcompress.pruning.PruneRule`) and ``[[quantize]]`` tables (each one a `jaxcompress.QuantRule`),
in order: for every leaf the first rule of each kind whose ``pattern`` fully matches its path
wins. Keys are exactly the rule's fields (TOML arrays become tuples; ``calibration`` may be a
method name or a table of `jaxcompress.QuantSpec` calibration fields)::

    name = "w4-g128"

    [[quantize]]
    pattern = ".*bias"
    skip = true

    [[quantize]]
    pattern = ".*weight"
    bits = 4
    channel_axes = [0]
    group_size = 128
    group_axis = -1

Shipped presets (``jaxcompress/checkpoint/presets/*.toml``, listed with their aliases by
`describe_presets`): ``w8a8`` (alias ``int8``), ``w4-g128`` (alias ``int4``), ``w4-g128-bf16``,
``w4-g128-emb-row`` (embedding tables per row instead of g128), ``2of4-int8`` (alias
``2:4+int8``) and ``sparse90-int8`` (alias ``90%-sparse+int8``). They are name-robust: one
model gets the same decision per leaf whether its leaves carry PyTorch / Hugging Face names
(``*.weight`` (out, in); embeddings ``embeddings.word_embeddings.weight``,
``embed_tokens.weight``, ``wte.weight``; ``LayerNorm.weight`` / ``bias``) or Flax names
(``kernel`` (in, out), ``embedding``, ``LayerNorm/scale`` / ``bias``): the same bits, scale
granularity along the same logical axes (output channels, input groups) and activation mode.
`load_recipe` takes a preset name or a path.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import textwrap
import tomllib
from typing import Any

from jaxcompress._errors import RecipeError
from jaxcompress.rules import QuantRule

__all__ = ["Recipe", "RecipeError", "load_recipe", "parse_recipe", "list_presets", "describe_presets", "PRESET_ALIASES"]

PRESET_ALIASES = {"2:4+int8": "2of4-int8", "90%-sparse+int8": "sparse90-int8", "int8": "w8a8", "int4": "w4-g128"}
_TOP_LEVEL = {"name", "description", "quantize", "prune"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A parsed recipe: its rules and where it came from.

    >>> recipe = load_recipe("w4-g128")
    >>> recipe.name, recipe.quantize[1].bits, recipe.quantize[1].group_size
    ('w4-g128', 4, 128)
    """

    name: str
    description: str
    quantize: tuple[QuantRule, ...]
    prune: tuple[Any, ...]
    source: str

    def describe(self) -> str:
        """One line per rule, for humans."""
        lines = [f"recipe {self.name!r} ({self.source}): {self.description}".rstrip(": ")]
        for i, rule in enumerate(self.prune):
            lines.append(f"  prune[{i}] {rule.pattern!r}: {rule.describe()}")
        for i, rule in enumerate(self.quantize):
            lines.append(f"  quantize[{i}] {rule.pattern!r}: {'skip' if rule.skip else rule.spec.describe()}")
        return "\n".join(lines)


def _presets_dir():
    return importlib.resources.files("jaxcompress.checkpoint").joinpath("presets")


def list_presets() -> list[str]:
    """Names of the shipped presets.

    >>> list_presets()
    ['2of4-int8', 'sparse90-int8', 'w4-g128', 'w4-g128-bf16', 'w4-g128-emb-row', 'w8a8']
    """
    return sorted(entry.name[: -len(".toml")] for entry in _presets_dir().iterdir() if entry.name.endswith(".toml"))


def describe_presets(width: int = 96) -> str:
    """One entry per shipped preset: its name, its aliases and its description (for ``--help``),
    wrapped at ``width`` (continuation lines indented).

    >>> print(describe_presets(200).splitlines()[-1])
    w8a8 (alias int8): int8 per-channel weights, int8 dynamic activations; norms and biases stay float
    """
    lines = []
    for name in list_presets():
        aliases = [alias for alias, target in PRESET_ALIASES.items() if target == name]
        data = tomllib.loads(_presets_dir().joinpath(name + ".toml").read_text(encoding="utf-8"))
        head = name + (f" (alias{'es' if len(aliases) > 1 else ''} {', '.join(aliases)})" if aliases else "")
        line = f"{head}: {data.get('description', '')}".rstrip(": ")
        lines.append(textwrap.fill(line, width, subsequent_indent="    ", break_on_hyphens=False))
    return "\n".join(lines)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _convert(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_convert(v) for v in value)
    return value


def _build(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: expected a table of rule fields, got {type(table).__name__}")
    allowed = _field_names(cls)
    for key in table:
        if key not in allowed:
            raise RecipeError(f"{where}.{key}: unknown key (a {cls.__name__} has {', '.join(allowed)})")
    if "pattern" not in table:
        raise RecipeError(f"{where}: missing 'pattern' (a regex matched in full against leaf paths)")
    kwargs = {key: _convert(value) for key, value in table.items()}
    if cls is QuantRule and isinstance(kwargs.get("calibration"), dict):
        from jaxcompress.quant.spec import Calibration

        try:
            kwargs["calibration"] = Calibration(**kwargs["calibration"])
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{where}.calibration: {err}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None


def parse_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """A `Recipe` from already-parsed TOML data; errors name ``source`` and the recipe key.

    >>> parse_recipe({"quantize": [{"pattern": ".*kernel", "bits": 4, "channel_axes": [-1]}]}).quantize[0].channel_axes
    (-1,)
    >>> parse_recipe({"quantize": [{"pattern": ".*", "bitz": 4}]}, "r.toml")
    Traceback (most recent call last):
    ...
    jaxcompress._errors.RecipeError: r.toml: quantize[0].bitz: unknown key (a QuantRule has ...)
    """
    for key in data:
        if key not in _TOP_LEVEL:
            raise RecipeError(f"{source}: {key}: unknown top-level key (expected {', '.join(sorted(_TOP_LEVEL))})")
    sections = {}
    for section in ("quantize", "prune"):
        tables = data.get(section, [])
        if not isinstance(tables, list):
            raise RecipeError(f"{source}: {section}: expected an array of tables ([[{section}]]), got {type(tables).__name__}")
        sections[section] = tables
    quantize = tuple(_build(QuantRule, table, f"{source}: quantize[{i}]") for i, table in enumerate(sections["quantize"]))
    prune = ()
    if sections["prune"]:
        from jaxcompress.pruning import PruneRule

        prune = tuple(_build(PruneRule, table, f"{source}: prune[{i}]") for i, table in enumerate(sections["prune"]))
    if not quantize and not prune:
        raise RecipeError(f"{source}: the recipe has no [[quantize]] or [[prune]] tables")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise RecipeError(f"{source}: {key}: expected a string")
    name = data.get("name") or os.path.splitext(os.path.basename(source))[0]
    return Recipe(name=name, description=data.get("description", ""), quantize=quantize, prune=prune, source=source)


def load_recipe(name_or_path: str | os.PathLike | Recipe) -> Recipe:
    """Load a preset by name (``"w8a8"``, ``"w4-g128"``, ``"2:4+int8"``...) or a TOML file by path.

    >>> [rule.bits for rule in load_recipe("2:4+int8").quantize if not rule.skip]
    [8, 8, 8]
    """
    if isinstance(name_or_path, Recipe):
        return name_or_path
    text = os.fspath(name_or_path)
    preset = PRESET_ALIASES.get(text, text)
    if os.path.exists(text):
        source = text
        try:
            with open(text, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"{source}: not valid TOML ({err})") from None
    elif preset in list_presets():
        entry = _presets_dir().joinpath(preset + ".toml")
        source = f"preset:{preset}"
        data = tomllib.loads(entry.read_text(encoding="utf-8"))
    else:
        raise RecipeError(
            f"{text}: no such recipe file, and not a preset (presets: {', '.join(list_presets())}; "
            f"aliases: {', '.join(PRESET_ALIASES)})"
        )
    return parse_recipe(data, source)
