"""Min-p truncation."""

from __future__ import annotations

from pydantic import Field

from samplerkit.context import StepContext
from samplerkit.ops import NEG_INF, min_p_mask
from samplerkit.params import StepParams
from samplerkit.steps import Processor


class MinP(Processor):
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
    argmax_invariant = True

    class Params(StepParams):
        min_p: float = Field(0.0, ge=0.0, le=1.0, description="minimum probability relative to the top token; 0 disables")

    def apply(self, logits, ctx: StepContext):
        keep = min_p_mask(logits, self.p.min_p)
        if not self.all_active:
            keep |= ~self.active.unsqueeze(-1)
        return logits.masked_fill_(~keep, NEG_INF)
