"""Quantization-aware training: fake quantization with straight-through and LSQ gradients."""

from jaxcompress.qat.fake_quantize import fake_quant, fake_quant_array, init_lsq_step, init_lsq_steps, lsq_fake_quant

__all__ = ["fake_quant", "fake_quant_array", "init_lsq_step", "init_lsq_steps", "lsq_fake_quant"]
