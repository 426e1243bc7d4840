"""The program layer (private): every feature that reads a traced program is a rule set on ONE evaluator.

* `trace_call` traces a function once (a `QArray` counts as one leaf, traced as a float stand-in);
* `Evaluator` evaluates the jaxpr under a `RuleSet`: rules keyed by (primitive, value kind), a
  default that materialises special values and binds, call-like primitives inlined, ``scan`` /
  ``cond`` / ``while`` rebuilt around re-evaluated bodies, observations returned as outputs;
* `flatten_call` gives the same program as one flat equation list (inlined bodies spliced in) for
  callers that run it in segments (sequential one-shot calibration).

The rule sets: `jaxcompress.execute.rules` (integer execution: `compressed`, calibration),
`jaxcompress.execute.hooks` (hooked float weights: activation fake-quant, one-shot capture),
`jaxcompress.structured.dataflow` (channel coupling), `jaxcompress.export` (LiteRT / ONNX).
"""

from jaxcompress._program.evaluator import PLAIN, Evaluator, Rule, RuleSet, bind
from jaxcompress._program.flat import FlatProgram, flatten_call
from jaxcompress._program.primitives import CALL_LIKE, CONTRACTIONS, CONTROL_FLOW, LAYOUT, call_body, source_line
from jaxcompress._program.trace import TraceCache, TracedCall, is_qarray, leaf_name, params_path, trace_call

__all__ = [
    "CALL_LIKE",
    "CONTRACTIONS",
    "CONTROL_FLOW",
    "LAYOUT",
    "PLAIN",
    "Evaluator",
    "FlatProgram",
    "Rule",
    "RuleSet",
    "TraceCache",
    "TracedCall",
    "bind",
    "call_body",
    "flatten_call",
    "is_qarray",
    "leaf_name",
    "params_path",
    "source_line",
    "trace_call",
]
