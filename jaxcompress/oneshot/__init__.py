"""One-shot (post-training, calibration-based) compression.

`capture` collects per-weight input statistics from sample batches run through an unmodified
function; the methods build on it, one module each: ``gptq``, ``wanda``, ``sparsegpt``, ``mixed``
(mixed precision), ``smoothquant``, ``awq``.
"""

from jaxcompress.oneshot.capture import (
    LayerStatistics,
    MatrixView,
    capture_statistics,
    from_matrix,
    sequential_groups,
    to_matrix,
)

# The methods (``gptq``, ``wanda``, ``sparsegpt``, ``mixed_precision``, ``smoothquant``, ``awq``)
# are exported from `jaxcompress` itself, not here: re-exporting a function named like its module
# (``jaxcompress.oneshot.gptq``) would hide the module from ``import jaxcompress.oneshot.gptq``.

__all__ = [
    "LayerStatistics",
    "MatrixView",
    "capture_statistics",
    "from_matrix",
    "sequential_groups",
    "to_matrix",
]
