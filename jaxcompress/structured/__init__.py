"""Structured pruning that physically shrinks the model: remove whole channels from the params.

`analyze_channels` reads which channels of which leaves belong together from the traced program
(`coupling`); `shrink` removes masked channels everywhere they appear; `channel_masks` builds
group-aligned filter masks for a target fraction (`shrink`).

Linen (BatchNorm in inference mode; the module takes its widths as attributes)::

    masks = channel_masks(model.apply, variables, x, sparsity=0.5)      # {leaf path: keep vector}
    result = shrink(model.apply, variables, masks, x)                   # params AND batch_stats
    small = CNN(features=(result.features["params/Conv_0"], result.features["params/Conv_1"]),
                hidden=result.features["params/Dense_0"])
    logits = small.apply(result.params, x)

nnx (shrink the ``State`` of ``nnx.split``; build the smaller module abstractly, merge)::

    graphdef, state = nnx.split(model)
    apply = lambda state, x: nnx.merge(graphdef, state)(x)
    result = shrink(apply, state, channel_masks(apply, state, x, sparsity=0.5), x)
    small_graphdef, _ = nnx.split(nnx.eval_shape(lambda: MLP(result.features["up"], nnx.Rngs(0))))
    small = nnx.merge(small_graphdef, result.params)

Both are exercised in tests/structured/test_shrink.py (and examples/shrink.py end to end).
"""

from jaxcompress.structured.coupling import ChannelCoupling, analyze_channels
from jaxcompress.structured.shrinking import (
    ShrinkResult,
    channel_masks,
    channel_masks_with,
    shrink,
    shrink_with,
)

__all__ = [
    "ChannelCoupling",
    "ShrinkResult",
    "analyze_channels",
    "channel_masks",
    "channel_masks_with",
    "shrink",
    "shrink_with",
]
