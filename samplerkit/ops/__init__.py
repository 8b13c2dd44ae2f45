"""Pure tensor functions shared by the built-in steps (no state, no parameters objects).

Processors stay thin: they unpack their per-row parameters and call these.
"""

from samplerkit.ops.random import (
    gumbel_noise,
    race_candidates,
    race_sample,
    row_keys,
    uniform,
)
from samplerkit.ops.truncation import (
    NEG_INF,
    min_p_mask,
    top_k_mask,
    top_p_mask,
    top_p_mask_reference,
)

__all__ = [
    "NEG_INF", "gumbel_noise", "race_candidates", "uniform", "min_p_mask", "race_sample", "row_keys", "top_k_mask",
    "top_p_mask", "top_p_mask_reference",
]
