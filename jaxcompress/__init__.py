"""jaxcompress: quantization and pruning for JAX as pure transforms over parameter pytrees.

The data path (see the README): rules select leaves; array transforms quantize one array;
pytree transforms apply them to a whole params tree; metrics report what it cost.
"""

from jaxcompress.compressed import compressed
from jaxcompress.execute import (
    UnsupportedQuantizedOp,
    attach_activation_scales,
    calibrate_activations,
    quantize_activation,
    quantized_conv_general_dilated,
    quantized_dot_general,
)
from jaxcompress.metrics import CompressionMetrics, LeafMetrics, quantization_metrics, sqnr_db
from jaxcompress.params import LeafDecision, QuantizeReport, dequantize_params, quantize_params
from jaxcompress.qarray import QArray
from jaxcompress.training import (
    QATState,
    distillation_loss,
    fake_quant,
    fake_quant_array,
    init_lsq_step,
    init_lsq_steps,
    lsq_fake_quant,
    qat,
    qat_ranges,
    weight_ranges,
)
from jaxcompress.quant import Calibration, QuantSpec, dequantize, quantize
from jaxcompress.rules import QuantRule, Rule, match_rules, path_to_str

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "CompressionMetrics",
    "LeafDecision",
    "LeafMetrics",
    "QATState",
    "QArray",
    "QuantRule",
    "QuantSpec",
    "QuantizeReport",
    "Rule",
    "UnsupportedQuantizedOp",
    "attach_activation_scales",
    "calibrate_activations",
    "compressed",
    "quantize_activation",
    "quantized_conv_general_dilated",
    "quantized_dot_general",
    "dequantize",
    "dequantize_params",
    "distillation_loss",
    "fake_quant",
    "fake_quant_array",
    "init_lsq_step",
    "init_lsq_steps",
    "lsq_fake_quant",
    "qat",
    "qat_ranges",
    "weight_ranges",
    "match_rules",
    "path_to_str",
    "quantization_metrics",
    "quantize",
    "quantize_params",
    "sqnr_db",
]
