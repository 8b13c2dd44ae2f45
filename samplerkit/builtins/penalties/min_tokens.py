"""Ban end-of-sequence tokens until a minimum number of tokens was generated."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from samplerkit.builtins.penalties._common import ban_, check_vocab, padded_ids
from samplerkit.context import StepContext
from samplerkit.params import StepParams
from samplerkit.steps import Processor


class MinTokens(Processor):
    """Keep a row going: ``x_e = -inf`` for every end id ``e`` while fewer than ``min_tokens``
    tokens have been generated (vLLM ``min_tokens``, transformers ``min_new_tokens``).

    ``min_tokens: 0`` is neutral. The end ids are ``eos_token_ids`` when given, else the
    context's :attr:`~samplerkit.context.StepContext.eos_token_ids`, which the decode loop
    fills with the backend's EOS ids plus the run's ``stop_token_ids`` (as vLLM bans both).
    An active row with neither is an error. Stop *strings* are not affected. A row whose only
    finite tokens are end ids is left unchanged.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> step = MinTokens([MinTokens.Params(min_tokens=1)])
    >>> step.apply(torch.zeros(1, 4), StepContext(1, eos_token_ids=[3]))
    tensor([[0., 0., 0., -inf]])
    """

    name = "min_tokens"
    constrains = True
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True

    class Params(StepParams):
        min_tokens: int = Field(0, ge=0, description="end ids are banned until this many tokens were generated; 0 disables")
        eos_token_ids: list[Annotated[int, Field(ge=0)]] = Field(
            default_factory=list, description="the end ids to ban; [] = the backend's EOS and stop_token_ids")

        def is_neutral(self) -> bool:
            return self.min_tokens == 0

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        self._largest = max((t for row in self.rows if row.min_tokens for t in row.eos_token_ids), default=-1)
        # Rows that take the end ids from the context (resolved at the first apply).
        self._from_ctx = [i for i, row in enumerate(self.rows) if row.min_tokens and not row.eos_token_ids]
        self._tables: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        ends = ctx.eos_token_ids if self._from_ctx else ()
        if self._from_ctx and not ends:
            raise ValueError(f"min_tokens: row {self._from_ctx[0]} gives no eos_token_ids and the context knows none "
                             f"(the decode loop fills StepContext.eos_token_ids from the backend)")
        check_vocab(self.name, max(self._largest, *ends, -1), logits.shape[-1])
        if ends not in self._tables:
            self._tables[ends] = padded_ids([(row.eos_token_ids or ends) if row.min_tokens else []
                                             for row in self.rows], self.device)
        ids, valid = self._tables[ends]
        still = ctx.num_generated < self.p.min_tokens
        return ban_(logits, ids, valid & still.unsqueeze(1))
