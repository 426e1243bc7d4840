"""Quantization-aware training: fake quantization (clipped STE, LSQ) and the `qat` optax wrapper."""

from jaxcompress.qat.distill import distillation_loss
from jaxcompress.qat.fake_quantize import (
    fake_quant,
    fake_quant_array,
    init_lsq_step,
    init_lsq_steps,
    lsq_fake_quant,
    weight_range,
    weight_ranges,
)
from jaxcompress.qat.optax_wrapper import QATState, qat, qat_ranges

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
