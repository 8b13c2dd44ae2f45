"""Nucleus (top-p) truncation."""

from __future__ import annotations

import torch
from pydantic import Field

from samplerkit.context import StepContext
from samplerkit.ops import NEG_INF, top_p_mask
from samplerkit.ops.candidates import top_p_on_sorted
from samplerkit.ops.truncation import TOP_P_CANDIDATES
from samplerkit.params import StepParams
from samplerkit.steps import MaskProcessor


class TopP(MaskProcessor):
    """Keep the smallest set of most probable tokens whose total probability reaches ``p``.

    Token ``j`` (probabilities sorted descending) is kept iff ``sum_{i<j} p_(i) < p``; tokens
    tied with the last kept one are kept too. ``top_p = 1`` is neutral. ``top_p`` must be in
    ``(0, 1]`` (0 is rejected, as vLLM does; use ``top_k: 1`` or the ``greedy`` sampler for
    greedy). The seed's ``sample_top_p`` and transformers' ``TopPLogitsWarper`` keep the same
    set. No full-vocabulary sort in the common case (see :func:`samplerkit.ops.top_p_mask`).

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> TopP([TopP.Params(top_p=0.75)]).apply(x, StepContext(1)).exp()
    tensor([[0.5000, 0.3000, 0.0000, 0.0000]])
    """

    name = "top_p"

    class Params(StepParams):
        top_p: float = Field(1.0, gt=0.0, le=1.0, description="cumulative probability kept; 1 disables")

    def keep(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return top_p_mask(logits, self.p.top_p)

    def select_candidates(self, logits: torch.Tensor, ctx: StepContext):
        vocab = logits.shape[-1]
        if not self.all_active or vocab <= TOP_P_CANDIDATES:
            return None
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        values, ids = logits.topk(TOP_P_CANDIDATES, dim=-1)
        keep = top_p_on_sorted(values, self.p.top_p, log_norm)
        if bool(keep[:, -1].any()):        # the nucleus may extend past the candidates
            return None
        return values.masked_fill_(~keep, NEG_INF), ids

    def keep_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return top_p_on_sorted(values, self.p.top_p)
