"""Tail-free sampling."""

from __future__ import annotations

from pydantic import Field

from samplerkit.fastpath import MaskProcessor
from samplerkit.ops.shaping import tail_free_mask
from samplerkit.params import StepParams


class TailFree(MaskProcessor):
    """Cut the tail where the sorted probability curve flattens: the second differences' running share exceeds ``tfs``.

    llama.cpp's ``tail_free`` (Phillips 2019): with ``p`` sorted descending over the finite
    tokens, ``d_i = |p_i - 2 p_{i+1} + p_{i+2}|`` normalised to sum 1; the kept prefix ends at
    the first ``i >= min_keep`` where ``sum_{j<=i} d_j > tfs``. ``tfs = 1`` is neutral; rows
    with at most two finite tokens are unchanged. Position ties: the lower token id first.
    Usually combined with ``temperature`` and ``top_k``.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> x = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.06, 0.04]]))
    >>> TailFree([TailFree.Params(tfs=0.95)]).apply(x, StepContext(1)).exp()
    tensor([[0.5000, 0.2500, 0.0000, 0.0000, 0.0000]])
    """

    name = "tfs"
    truncates = True

    class Params(StepParams):
        tfs: float = Field(1.0, ge=0.0, le=1.0, description="share of the curvature kept (tail-free z); 1 disables")
        min_keep: int = Field(1, ge=1, description="keep at least this many tokens")

        def is_neutral(self) -> bool:
            return self.tfs >= 1.0

    @classmethod
    def keeps_all_of(cls, params):
        return params.min_keep

    def keep(self, logits, ctx):
        return tail_free_mask(logits, self.p.tfs, self.p.min_keep)
