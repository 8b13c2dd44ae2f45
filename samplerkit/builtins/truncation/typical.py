"""Locally typical sampling."""

from __future__ import annotations

import torch
from pydantic import Field

from samplerkit.builtins.truncation.min_keep import KeepsMinTokens
from samplerkit.context import StepContext
from samplerkit.fastpath import MaskProcessor
from samplerkit.ops.shaping import typical_cut, typical_mask
from samplerkit.ops.truncation import keep_where_nonnegative
from samplerkit.params import StepParams


class TypicalP(KeepsMinTokens, MaskProcessor):
    """Keep the tokens whose surprise ``-log p_i`` is closest to the entropy ``H``, up to mass ``typical_p``.

    Tokens ranked by ``|-log p_i - H|`` ascending; the smallest prefix whose probability reaches
    ``typical_p`` is kept (transformers' ``TypicalLogitsWarper``, Meister et al. 2022), and at
    least ``min_tokens_to_keep`` tokens. ``typical_p = 1`` is neutral. Usually combined with
    ``temperature`` (transformers applies it after ``top_k``/``top_p``/``min_p``).

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> x = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    >>> TypicalP([TypicalP.Params(typical_p=0.45)]).apply(x, StepContext(1)).exp()
    tensor([[0.0000, 0.3000, 0.2000, 0.0000]])
    """

    name = "typical_p"
    truncates = True
    # The most probable token may be atypical and removed.
    argmax_invariant = False

    class Params(StepParams):
        typical_p: float = Field(1.0, gt=0.0, le=1.0, description="probability mass of the most typical tokens kept; 1 disables")
        min_tokens_to_keep: int = Field(1, ge=1, description="keep at least this many tokens (first in the typicality ranking)")

        def is_neutral(self) -> bool:
            return self.typical_p >= 1.0

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        # Neutral rows (typical_p = 1) are searched at a reachable mass, then keep everything.
        self._mass = torch.where(self.active, self.p.typical_p, 0.5)

    def keep(self, logits, ctx):
        return typical_mask(logits, self.p.typical_p, self.p.min_tokens_to_keep, self._min_keep_max, self._work)

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.apply_into(logits, logits, ctx)

    def apply_into(self, logits: torch.Tensor, out: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        cut = typical_cut(logits, self._mass, self._work) if self._min_keep_max == 1 else None
        if cut is None:
            keep = self.keep(logits, ctx)
            return self._remove(out if out is logits else out.copy_(logits), keep)
        score, threshold = cut
        if not self.all_active:
            threshold = threshold.masked_fill(~self.active.unsqueeze(-1), float("inf"))
        # Keep score <= threshold: threshold - score has the comparison's sign exactly (+0 when
        # equal), and no bool mask is written (slow on CPU).
        return keep_where_nonnegative(logits, torch.sub(threshold, score, out=score), out)
