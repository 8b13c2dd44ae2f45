"""Nucleus (top-p) truncation."""

from __future__ import annotations

import torch
from pydantic import Field

from samplerkit.context import StepContext
from samplerkit.fastpath import ThresholdProcessor
from samplerkit.ops import NEG_INF, _triton
from samplerkit.ops.candidates import top_p_on_sorted
from samplerkit.ops.sync import sync_free
from samplerkit.ops.truncation import (
    TOP_P_CANDIDATES,
    Cut,
    Stats,
    largest,
    nucleus_stats,
    nucleus_threshold,
    top_p_threshold,
)
from samplerkit.params import StepParams


class TopP(ThresholdProcessor):
    """Keep the smallest set of most probable tokens whose total probability reaches ``p``.

    Token ``j`` (probabilities sorted descending) is kept iff ``sum_{i<j} p_(i) < p``; tokens
    tied with the last kept one are kept too. ``top_p = 1`` is neutral. ``top_p`` must be in
    ``(0, 1]`` (0 is rejected, as vLLM does; use ``top_k: 1`` or the ``greedy`` sampler for
    greedy). The seed's ``sample_top_p`` and transformers' ``TopPLogitsWarper`` keep the same
    set. No full-vocabulary sort (see :func:`samplerkit.ops.truncation.top_p_threshold`).

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> TopP([TopP.Params(top_p=0.75)]).apply(x, StepContext(1)).exp()
    tensor([[0.5000, 0.3000, 0.0000, 0.0000]])
    """

    name = "top_p"
    truncates = True

    class Params(StepParams):
        top_p: float = Field(1.0, gt=0.0, le=1.0, description="cumulative probability kept; 1 disables")

    def reference(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Slow and plain (``samplerkit verify`` checks :meth:`apply` against it): per row, the
        float64 probabilities sorted descending; token ``j`` stays iff the mass before it is below
        ``top_p``; tokens tied with a kept one stay."""
        out = logits.clone()
        for b in range(logits.shape[0]):
            if not bool(self.active[b]):
                continue
            probs, order = torch.sort(torch.softmax(logits[b].double(), -1), descending=True, stable=True)
            kept = order[(probs.cumsum(0) - probs) < float(self.p.top_p[b])]
            out[b, logits[b] < logits[b, kept].min()] = NEG_INF
        return out

    def threshold(self, logits: torch.Tensor) -> torch.Tensor:
        return top_p_threshold(logits, self.p.top_p, work=self._work)

    def select_cut(self, logits: torch.Tensor, ctx: StepContext) -> Cut:
        return Cut(self._for_rows(self.threshold(logits)), logits.amax(dim=-1, keepdim=True))

    def _dense_cut(self, logits: torch.Tensor, stats: Stats, candidates: torch.Tensor | None = None) -> Cut:
        """The cut computed from the statistics :meth:`select_candidates` already has, handed
        back to the pipeline (not remembered here: the pipeline applies it to the same tensor)."""
        threshold = top_p_threshold(logits, self.p.top_p, stats=stats, work=self._work, candidates=candidates)
        return Cut(self._for_rows(threshold), stats.row_max, stats.weights)

    def select_candidates(self, logits: torch.Tensor, ctx: StepContext):
        vocab = logits.shape[-1]
        # Sync-free (CUDA): no candidate list, whose fallback needs a host check; the dense
        # threshold (one sort) is fixed-shape work.
        if not self.all_active or vocab <= TOP_P_CANDIDATES or sync_free(logits):
            return None
        stats = nucleus_stats(logits, self._work)
        top, total = stats.top, stats.total
        p = self.p.top_p
        # Each weight is at most 1, so a row whose total exceeds 256 / p cannot have its
        # nucleus among 256 candidates: skip the topk and compute the dense threshold once.
        if bool((p.double().unsqueeze(-1) * total.double() > TOP_P_CANDIDATES).any()):
            return self._dense_cut(logits, stats)
        values, ids = largest(logits, TOP_P_CANDIDATES)
        threshold, covered = nucleus_threshold(values, top, total, p)
        if not bool(covered.all()):        # the nucleus extends past the candidates
            return self._dense_cut(logits, stats, values)
        return values.masked_fill_(~(values >= threshold), NEG_INF), ids      # NaN is dropped too

    def keep_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return top_p_on_sorted(values, self.p.top_p)

    def apply_candidates(self, values: torch.Tensor, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        # On CUDA one Triton kernel does what keep_candidates and the removal do in ~20 kernels.
        if _triton.available(values) and values.shape[-1] <= _triton.CANDIDATES_MAX and values.stride(-1) == 1:
            return _triton.top_p_candidates_(values, self.p.top_p, None if self.all_active else self.active)
        return super().apply_candidates(values, ids, ctx)
