"""One-shot (post-training, calibration-based) compression: capture, GPTQ, ...

`capture` collects per-weight input statistics from sample batches run through an unmodified
function; the methods build on it.
"""

from jaxcompress.oneshot.capture import (
    LayerStatistics,
    MatrixView,
    capture_statistics,
    from_matrix,
    sequential_groups,
    to_matrix,
)

__all__ = [
    "LayerStatistics",
    "MatrixView",
    "capture_statistics",
    "from_matrix",
    "sequential_groups",
    "to_matrix",
]
