"""One-shot (post-training, calibration-based) compression.

`capture` collects per-weight input statistics from sample batches run through an unmodified
function; the methods build on it: `gptq` here; Wanda / SparseGPT / mixed precision / SmoothQuant
/ AWQ in their modules (``jaxcompress.oneshot.wanda`` ...).
"""

from jaxcompress.oneshot.capture import (
    LayerStatistics,
    MatrixView,
    capture_statistics,
    from_matrix,
    sequential_groups,
    to_matrix,
)
from jaxcompress.oneshot.gptq import GPTQReport, GPTQResult, LayerResult, gptq, gptq_matrix

__all__ = [
    "GPTQReport",
    "GPTQResult",
    "LayerResult",
    "gptq",
    "gptq_matrix",
    "LayerStatistics",
    "MatrixView",
    "capture_statistics",
    "from_matrix",
    "sequential_groups",
    "to_matrix",
]
