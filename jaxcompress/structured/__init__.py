"""Structured pruning that physically shrinks the model: remove whole channels from the params.

`analyze_channels` reads which channels of which leaves belong together from the traced program
(`coupling`); `shrink` removes masked channels everywhere they appear; `channel_masks` builds
group-aligned filter masks for a target fraction (`shrink`).
"""

from jaxcompress.structured.coupling import ChannelCoupling, analyze_channels
from jaxcompress.structured.shrink import (
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
