"""Restrict sampling to a set of token ids (vLLM ``allowed_token_ids``)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from samplerkit.builtins.penalties._common import check_vocab, padded_ids
from samplerkit.context import StepContext
from samplerkit.ops import NEG_INF
from samplerkit.params import StepParams
from samplerkit.steps import Processor


class AllowedTokens(Processor):
    """Only the listed token ids may be sampled: ``x_i = -inf`` for every other ``i``.

    ``allowed_tokens: []`` is neutral (every token allowed). Ids outside the vocabulary are
    an error. If none of the allowed tokens has a finite logit the row is left unchanged, so
    the sampler always has a token to pick. Usually first (vLLM applies it before everything).

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> AllowedTokens([AllowedTokens.Params(allowed_tokens=[1, 3])]).apply(torch.zeros(1, 4), StepContext(1))
    tensor([[-inf, 0., -inf, 0.]])
    """

    name = "allowed_tokens"
    constrains = True
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True

    class Params(StepParams):
        allowed_tokens: list[Annotated[int, Field(ge=0)]] = Field(
            default_factory=list, description="the only token ids that may be sampled; [] disables")

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        self._ids, self._valid = padded_ids([row.allowed_tokens for row in self.rows], self.device)
        # Padding slots repeat the row's first allowed id, so writing them back is harmless.
        self._ids = torch.where(self._valid, self._ids, self._ids[:, :1])
        self._largest = max((t for row in self.rows for t in row.allowed_tokens), default=-1)

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        check_vocab(self.name, self._largest, logits.shape[-1])
        # Save the allowed logits, blank the whole row, write them back: one pass over [B, V].
        kept = logits.gather(1, self._ids)
        some_finite = (torch.isfinite(kept) & self._valid).any(1)
        blank = (self.active & some_finite).unsqueeze(1)
        logits.masked_fill_(blank, NEG_INF)
        return logits.scatter_(1, self._ids, kept)
