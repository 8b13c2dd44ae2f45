"""Sampling from the processed distribution."""

from __future__ import annotations

import torch

from samplerkit.context import StepContext
from samplerkit.fastpath import FastPathSampler
from samplerkit.ops import race_sample
from samplerkit.ops.histogram import scratch
from samplerkit.ops.random import race_sample_candidates
from samplerkit.seeded import SeededSampler, SeedParams


class Categorical(SeededSampler, FastPathSampler):
    """Draw token ``i`` with probability ``softmax(x)_i`` (after the pipeline's processors).

    Implemented as the exponential race (Gumbel-max, :mod:`samplerkit.ops.random`): exact,
    without ``torch.multinomial`` or a host sync. Each row has its own random stream keyed
    by ``(seed, number of tokens the row has generated)``, so a seeded row draws the same
    tokens alone, in any batch, at any position. Rows without a seed get a fresh random seed
    from torch's global generator when the batch is formed (``torch.manual_seed`` makes them
    reproducible too).

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> s = Categorical([Categorical.Params(seed=1), Categorical.Params(seed=1)])
    >>> ids = s.sample(torch.zeros(2, 10), StepContext(2))
    >>> bool(ids[0] == ids[1])          # same seed, same counter: same draw
    True
    """

    name = "categorical"
    Params = SeedParams
    cut_source = True          # sample_cut honours Cut.source

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        self._work: dict = {}        # [B, V] float32 buffers (weights, kept weights), reused step to step

    def sample(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return race_sample(logits, self.streams.keys(ctx),
                           workspace=scratch(self._work, "weights", logits, torch.float32))

    def sample_cut(self, logits: torch.Tensor, cut, ctx: StepContext) -> torch.Tensor:
        return race_sample(logits, self.streams.keys(ctx),
                           workspace=scratch(self._work, "weights", logits, torch.float32), threshold=cut.threshold,
                           weights=cut.weights, mask_workspace=scratch(self._work, "mask", logits, torch.float32),
                           row_max=cut.row_max, source=cut.source, block_max=cut.block_max,
                           value_block_max=cut.value_block_max)

    def sample_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        vocab = ctx.vocab_size if ctx.vocab_size is not None else 1 << 62
        return race_sample_candidates(values, ids, self.streams.keys(ctx), vocab)
