"""Training-time compression: fake quantization (clipped STE, LSQ), the `qat` optax wrapper and
knowledge distillation. (Named `training`, not `qat`, so that `jaxcompress.qat` is the function.)"""

from jaxcompress.training.distill import distillation_loss
from jaxcompress.training.fake_quantize import (
    fake_quant,
    fake_quant_array,
    init_lsq_step,
    init_lsq_steps,
    lsq_fake_quant,
    weight_range,
    weight_ranges,
)
from jaxcompress.training.optax_wrapper import QATState, qat, qat_ranges

__all__ = [
    "QATState",
    "distillation_loss",
    "fake_quant",
    "fake_quant_array",
    "init_lsq_step",
    "init_lsq_steps",
    "lsq_fake_quant",
    "qat",
    "qat_ranges",
    "weight_range",
    "weight_ranges",
]
