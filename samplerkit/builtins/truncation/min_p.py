"""Min-p truncation."""

from __future__ import annotations

import torch
from pydantic import Field

from samplerkit.context import StepContext
from samplerkit.fastpath import ThresholdProcessor
from samplerkit.ops import NEG_INF
from samplerkit.ops.random import RACE_BLOCK
from samplerkit.ops.sync import sync_free
from samplerkit.ops.truncation import TOP_P_CANDIDATES, Cut, block_maxima, min_p_threshold
from samplerkit.params import StepParams


class MinP(ThresholdProcessor):
    """Keep tokens with ``p_i >= min_p * max_j p_j``; the rest become ``-inf``.

    ``min_p = 0`` is neutral. The cut scales with the model's confidence: strict when one
    token dominates, permissive when the distribution is flat. Where it sits relative to
    ``temperature`` matters (transformers/vLLM apply temperature first, llama.cpp last).

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> MinP([MinP.Params(min_p=0.5)]).apply(x, StepContext(1)).exp()
    tensor([[0.5000, 0.3000, 0.0000, 0.0000]])
    """

    name = "min_p"
    truncates = True

    class Params(StepParams):
        min_p: float = Field(0.0, ge=0.0, le=1.0, description="minimum probability relative to the top token; 0 disables")

    def reference(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Slow and plain (``samplerkit verify`` checks :meth:`apply` against it): float64
        probabilities, ``p_i >= min_p * max_j p_j`` stays."""
        probs = torch.softmax(logits.double(), -1)
        keep = probs >= self.p.min_p.double().unsqueeze(-1) * probs.amax(-1, keepdim=True)
        return logits.masked_fill(~keep, NEG_INF)

    def threshold(self, logits: torch.Tensor) -> torch.Tensor:
        # min_p = 0 gives log(0) = -inf: neutral rows keep everything by themselves.
        return min_p_threshold(logits.amax(dim=-1, keepdim=True), self.p.min_p)

    def select_cut(self, logits: torch.Tensor, ctx: StepContext) -> Cut:
        if logits.device.type != "cpu":
            row_max = logits.amax(dim=-1, keepdim=True)
            return Cut(min_p_threshold(row_max, self.p.min_p), row_max)
        # On CPU the row max through the race's block maxima (the same one pass): the sampler
        # then bounds each block's kept mass from them instead of weighing every token.
        blocks = block_maxima(logits, RACE_BLOCK)
        row_max = blocks.amax(dim=-1, keepdim=True)
        return Cut(min_p_threshold(row_max, self.p.min_p), row_max, block_max=blocks)

    def select_candidates(self, logits: torch.Tensor, ctx: StepContext):
        vocab = logits.shape[-1]
        # On CPU the dense mask (a max and a compare) and the sampler's blocked race cost less
        # than one topk of 256, and do not fall back on flat rows.
        # Sync-free (CUDA): no candidate list either, whose fallback needs a host check.
        if not self.all_active or vocab <= TOP_P_CANDIDATES or logits.device.type == "cpu" or sync_free(logits):
            return None
        values, ids = logits.topk(TOP_P_CANDIDATES, dim=-1)
        keep = values >= min_p_threshold(values[:, :1], self.p.min_p)
        if bool(keep[:, -1].any()):        # more survivors than candidates: dense path
            return None
        return values.masked_fill_(~keep, NEG_INF), ids

    def keep_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return values >= min_p_threshold(values[:, :1], self.p.min_p)
