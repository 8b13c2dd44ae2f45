"""Top-a truncation."""

from __future__ import annotations

from pydantic import Field

from samplerkit.fastpath import MaskProcessor
from samplerkit.ops.shaping import top_a_mask
from samplerkit.params import StepParams


class TopA(MaskProcessor):
    """Keep tokens with ``p_i >= top_a * (max_j p_j)^2``.

    text-generation-webui's top-a: like ``min_p`` but the floor falls quadratically with the
    top probability, so flat distributions are barely cut. ``top_a = 0`` is neutral; the top
    token (and its ties) always stays. Usually combined with ``temperature``.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> TopA([TopA.Params(top_a=0.5)]).apply(x, StepContext(1)).exp()
    tensor([[0.5000, 0.3000, 0.1500, 0.0000]])
    """

    name = "top_a"
    truncates = True

    class Params(StepParams):
        top_a: float = Field(0.0, ge=0.0, le=1.0, description="floor relative to the squared top probability; 0 disables")

    def keep(self, logits, ctx):
        return top_a_mask(logits, self.p.top_a)
