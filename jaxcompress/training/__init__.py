"""Training-time compression: fake quantization (clipped STE, LSQ), the `qat` optax wrapper and
knowledge distillation. (Named `training`, not `qat`, so that `jaxcompress.qat` is the function.)"""

from jaxcompress.training.activations import (
    activation_fake_quant,
    fake_quant_activations,
    init_activation_steps,
)
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
from jaxcompress.training.optax_wrapper import ClipRanges, QATState, convert_qat, qat, qat_activation_ranges, qat_ranges

__all__ = [
    "ClipRanges",
    "QATState",
    "activation_fake_quant",
    "convert_qat",
    "fake_quant_activations",
    "init_activation_steps",
    "qat_activation_ranges",
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
