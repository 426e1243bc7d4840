"""Integer execution of quantized weights: quantized ``dot_general`` / ``conv_general_dilated``,
activation quantization and calibration, and the jaxpr interpreter behind
`jaxcompress.compressed`."""

from jaxcompress.execute.activation import quantize_activation
from jaxcompress.execute.calibration import attach_activation_scales, calibrate_activations
from jaxcompress.execute.conv import quantized_conv_general_dilated
from jaxcompress.execute.dot import UnsupportedQuantizedOp, quantized_dot_general

__all__ = [
    "UnsupportedQuantizedOp",
    "attach_activation_scales",
    "calibrate_activations",
    "quantize_activation",
    "quantized_conv_general_dilated",
    "quantized_dot_general",
]
