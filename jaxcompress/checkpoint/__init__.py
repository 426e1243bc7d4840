"""Compressed checkpoints: Orbax and safetensors I/O, sparse encodings, `compress_checkpoint`,
recipes, reports and the ``jaxcompress`` CLI subcommands ``compress`` / ``inspect``.

Modules, one idea each: `treemeta` (a compressed tree's structure as JSON records), `orbax_io`
(Orbax save / restore), `orbax_guard` (Orbax reads that fail cleanly: validated metadata, one
error type, closed checkpointers), `orbax_sharding` (restoring onto a mesh), `sparse` (bit
packing, bitmap and N:M encodings), `safetensors_format` (validating reader, streaming atomic
writer with lock-guarded scratch files), `safetensors_records` (the validated JSON record of a
file), `safetensors_io` (compressed trees <-> tensor names), `sources` (read a float checkpoint
leaf by leaf), `sliced` (quantize a leaf slice by slice), `magnitude` (bounded-memory magnitude
masks), `recipes` (TOML -> rules, presets), `compress` (`compress_checkpoint`), `inspection`
(`inspect_checkpoint`), `report` (the per-leaf table and its renderers), `analysis` (XLA cost
analysis, latency, Pareto plot), `command` (a CLI subcommand and how errors become exit codes)
and `cli` (the ``compress`` / ``inspect`` subcommands).

Untrusted input: every reader validates what it reads and raises a `CheckpointFormatError` (a
``ValueError``) naming the file and the leaf; writers raise `CheckpointWriteError` naming the
destination and leave nothing behind; the error types live in `jaxcompress._errors`.
"""

from jaxcompress._errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    DestinationError,
    InvalidQArrayError,
)
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
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "DestinationError",
    "InvalidQArrayError",
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
