"""Compressed checkpoints: Orbax and safetensors I/O, sparse encodings, `compress_checkpoint`,
recipes, reports and the ``jaxcompress`` CLI subcommands ``compress`` / ``inspect``.

Modules, one idea each: `treemeta` (a compressed tree's structure as JSON records), `orbax_io`
(Orbax save / restore), `sparse` (bit packing, bitmap and N:M encodings), `safetensors_format`
(validating reader, streaming atomic writer), `safetensors_io` (compressed trees <-> tensor
names), `sources` (read a float checkpoint leaf by leaf), `sliced` (quantize a leaf slice by slice),
`magnitude` (bounded-memory magnitude masks), `recipes` (TOML -> rules, presets),
`compress` (`compress_checkpoint`), `inspection` (`inspect_checkpoint`), `report` (the
per-leaf table and its renderers), `analysis` (XLA cost analysis, latency, Pareto plot) and
`cli` (argparse subcommands).
"""

from jaxcompress.checkpoint.analysis import (
    Cost,
    Latency,
    ParetoPoint,
    cost_analysis,
    latency,
    pareto_front,
    pareto_plot,
)
from jaxcompress.checkpoint.compress import compress_checkpoint
from jaxcompress.checkpoint.inspection import inspect_checkpoint
from jaxcompress.checkpoint.orbax_io import (
    abstract_checkpoint,
    follow_sharding,
    load_checkpoint,
    restore_from_manager,
    save_checkpoint,
    save_to_manager,
)
from jaxcompress.checkpoint.recipes import Recipe, RecipeError, list_presets, load_recipe
from jaxcompress.checkpoint.report import (
    CompressionTable,
    LeafRow,
    render_json,
    render_markdown,
    render_text,
)
from jaxcompress.checkpoint.safetensors_format import HeaderError
from jaxcompress.checkpoint.safetensors_io import export_safetensors, import_safetensors

__all__ = [
    "abstract_checkpoint",
    "follow_sharding",
    "CompressionTable",
    "Cost",
    "Latency",
    "ParetoPoint",
    "cost_analysis",
    "latency",
    "pareto_front",
    "pareto_plot",
    "HeaderError",
    "LeafRow",
    "Recipe",
    "RecipeError",
    "compress_checkpoint",
    "export_safetensors",
    "import_safetensors",
    "inspect_checkpoint",
    "list_presets",
    "load_checkpoint",
    "load_recipe",
    "render_json",
    "render_markdown",
    "render_text",
    "restore_from_manager",
    "save_checkpoint",
    "save_to_manager",
]
