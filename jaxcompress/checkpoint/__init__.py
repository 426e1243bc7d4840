"""Compressed checkpoints: Orbax and safetensors I/O, sparse encodings, `compress_checkpoint`,
recipes, reports and the ``jaxcompress`` CLI subcommands ``compress`` / ``inspect``."""

from jaxcompress.checkpoint.orbax_io import (
    load_checkpoint,
    restore_from_manager,
    save_checkpoint,
    save_to_manager,
)

__all__ = [
    "load_checkpoint",
    "restore_from_manager",
    "save_checkpoint",
    "save_to_manager",
]
