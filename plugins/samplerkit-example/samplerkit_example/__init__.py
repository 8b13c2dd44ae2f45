"""samplerkit-example: the tutorial plugin (see docs/plugins.md).

It registers one processor, ``suppress_tokens``, through the ``register_processors`` hook.
samplerkit finds this module through the ``samplerkit`` entry point in ``pyproject.toml``.
"""

from __future__ import annotations

import torch
from pydantic import Field

import samplerkit
from samplerkit import Processor, StepContext, StepParams

__all__ = ["SuppressTokens", "register_processors"]

NEG_INF = float("-inf")


class SuppressTokens(Processor):
    """Never sample the listed token ids: ``x_i = -inf`` for every ``i`` in ``token_ids``.

    The same semantics as transformers' ``SuppressTokensLogitsProcessor`` and vLLM's
    ``bad_words`` for single tokens, but per row. ``token_ids: []`` is neutral. Ids outside
    ``[0, V)`` are ignored (a config can name ids of a larger vocabulary). A row is never
    emptied: when every finite logit of a row is listed, that row is left unchanged, so the
    sampler always has a token to pick. Usually placed first, before ``temperature`` and
    truncation, so ``top_p`` and ``min_p`` renormalise over the tokens that remain.

    >>> import torch
    >>> from samplerkit import StepContext
    >>> step = SuppressTokens([SuppressTokens.Params(token_ids=[1, 3]), SuppressTokens.Params()])
    >>> step.apply(torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]]), StepContext(2))
    tensor([[0., -inf, 2., -inf],
            [0., 1., 2., 3.]])
    """

    name = "suppress_tokens"
    # Suppressing the top token changes the argmax, so a greedy pipeline must run this step.
    argmax_invariant = False
    # It removes tokens by id whatever their probability (samplerkit lint warns when it runs
    # after a truncation, which may have kept only tokens it suppresses).
    constrains = True

    class Params(StepParams):
        token_ids: list[int] = Field(default_factory=list,
                                     description="token ids that are never sampled; [] disables; ids outside [0, V) are ignored")

    @classmethod
    def contract_examples(cls):
        # What samplerkit.testing.check_processor tries besides the neutral value.
        return [{"token_ids": [0, 5]}, {"token_ids": [31, 31, 7]}, {"token_ids": list(range(32))}]

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        # Lists are not packed into ``self.p`` (only bool/int/float fields are), so flatten the
        # per-row lists once per batch composition into (row, token) index pairs.
        pairs = [(r, t) for r, row in enumerate(self.rows) for t in dict.fromkeys(row.token_ids)]
        self._row_idx = torch.tensor([r for r, _ in pairs], dtype=torch.int64, device=self.device)
        self._tok_idx = torch.tensor([t for _, t in pairs], dtype=torch.int64, device=self.device)
        self._masks: dict[int, torch.Tensor] = {}    # vocab size -> [B, V] bool, built once

    def _mask(self, vocab: int) -> torch.Tensor:
        mask = self._masks.get(vocab)
        if mask is None:
            in_range = (self._tok_idx >= 0) & (self._tok_idx < vocab)
            mask = torch.zeros(self.batch_size, vocab, dtype=torch.bool, device=self.device)
            mask[self._row_idx[in_range], self._tok_idx[in_range]] = True
            self._masks[vocab] = mask
        return mask

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        mask = self._mask(logits.shape[-1])
        # Keep at least one token: a row whose finite logits are all listed is left alone
        # (computed on the device, no host sync).
        survives = (torch.isfinite(logits) & ~mask).any(dim=-1, keepdim=True)
        return logits.masked_fill_(mask & survives, NEG_INF)


@samplerkit.hookimpl
def register_processors():
    return [SuppressTokens]
