"""Greedy decoding."""

from __future__ import annotations

import torch

from samplerkit.context import StepContext
from samplerkit.fastpath import FastPathSampler


class Greedy(FastPathSampler):
    """Pick the highest logit of each row: ``argmax_i x_i`` (the lowest id among ties).

    Deterministic; processors that never change the argmax are skipped before it.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> Greedy.for_batch(Greedy.Params(), 2).sample(torch.tensor([[0.0, 2.0, 2.0], [5.0, 1.0, 0.0]]), StepContext(2))
    tensor([1, 0])
    """

    name = "greedy"
    picks_argmax = True

    def sample(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return logits.argmax(dim=-1)

    def sample_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        # Lowest id among the top-valued candidates, as argmax over the dense row would pick.
        tied = values == values[:, :1]
        masked = torch.where(tied, ids, torch.full_like(ids, torch.iinfo(ids.dtype).max))
        return masked.amin(dim=-1)
