"""Array-level quantization: specs, calibration, quantize / dequantize."""

from jaxcompress.quant.calibrate import absmax_range, mse_range, percentile_range
from jaxcompress.quant.codec import int_range
from jaxcompress.quant.arrays import dequantize, quantize
from jaxcompress.quant.spec import Calibration, QuantSpec

__all__ = [
    "Calibration",
    "QuantSpec",
    "absmax_range",
    "dequantize",
    "int_range",
    "mse_range",
    "percentile_range",
    "quantize",
]
