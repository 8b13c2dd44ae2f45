"""Top-k truncation."""

from __future__ import annotations

import torch
from pydantic import Field

from samplerkit.context import StepContext
from samplerkit.fastpath import FastPathProcessor
from samplerkit.ops import NEG_INF, top_k_mask
from samplerkit.ops.candidates import top_k_candidates, top_k_candidates_keyed
from samplerkit.ops.sync import sync_free
from samplerkit.params import StepParams

#: The exact selection where no host check is allowed (CUDA): one int64 topk over (value, id)
#: keys. ``samplerkit.ops.candidates.top_k_candidates_repaired`` (a float32 topk and a device-side
#: tie repair) selects the same set but measured slower on a GPU (docs/performance.md: torch's
#: row cumsum dominates it); benchmarks/check_cuda.py compares both.
SYNC_FREE_TOP_K = top_k_candidates_keyed


class TopK(FastPathProcessor):
    """Keep the ``k`` highest logits of each row, set the rest to ``-inf``.

    ``top_k = 0`` is neutral (vLLM's ``-1`` is not accepted: one spelling). Exactly ``k``
    tokens are kept: at a tie on the boundary the lower token ids win, so ``top_k = 1`` is
    greedy. Usually combined with ``top_p`` (which then only sorts ``k`` candidates).

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> TopK([TopK.Params(top_k=2)]).apply(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), StepContext(1))
    tensor([[-inf, 4., 3., -inf]])
    """

    name = "top_k"
    truncates = True
    scale_invariant = True  # ranks only
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True
    argmax_invariant = True

    class Params(StepParams):
        top_k: int = Field(0, ge=0, description="number of highest logits kept; 0 disables")

    @classmethod
    def kept_at_most(cls, params):
        return params.top_k or None

    @classmethod
    def keeps_all_of(cls, params):
        return params.top_k or 1

    def reference(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Slow and plain (``samplerkit verify`` checks :meth:`apply` against it): per row, a
        stable sort by descending logit (lower ids first among ties); the first ``k`` stay."""
        out = logits.clone()
        for b in range(logits.shape[0]):
            k = int(self.p.top_k[b])
            if k > 0:
                out[b, torch.sort(logits[b], descending=True, stable=True).indices[k:]] = NEG_INF
        return out

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        active_ks = [row.top_k for row in self.rows if row.top_k > 0]
        # Host-side bounds, so apply() sizes its selection without a device sync.
        self.k_max = max(active_ks, default=0)
        self._k_min = min(active_ks, default=0)

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        vocab = logits.shape[-1]
        if self._k_min >= vocab:            # every active row keeps the whole vocabulary
            return logits
        keep = top_k_mask(logits, self.p.top_k, min(self.k_max, vocab))
        if not self.all_active or self.k_max >= vocab:
            truncating = self.active & (self.p.top_k < vocab)
            keep |= ~truncating.unsqueeze(-1)
        return logits.masked_fill_(~keep, NEG_INF)

    def select_candidates(self, logits: torch.Tensor, ctx: StepContext):
        # Only when every row truncates: a neutral row cannot be a short candidate list.
        if not self.all_active or self.k_max >= logits.shape[-1]:
            return None
        if sync_free(logits):                # exact ties without a host check
            return SYNC_FREE_TOP_K(logits, self.p.top_k, self.k_max)
        return top_k_candidates(logits, self.p.top_k, self.k_max)

    def select_candidates_after(self, logits: torch.Tensor, ctx: StepContext, transform, divisor=None):
        if not self.all_active or self.k_max >= logits.shape[-1]:
            return None
        if sync_free(logits):
            return SYNC_FREE_TOP_K(logits, self.p.top_k, self.k_max, transform, divisor)
        return top_k_candidates(logits, self.p.top_k, self.k_max, transform)
