"""Ban any token that would repeat an n-gram of the context (transformers ``no_repeat_ngram_size``)."""

from __future__ import annotations

import torch
from pydantic import Field

from samplerkit.builtins.penalties._common import ban_
from samplerkit.context import StepContext
from samplerkit.params import StepParams
from samplerkit.steps import Processor


class NoRepeatNgram(Processor):
    """Never repeat an n-gram: ``x_t = -inf`` for every ``t`` such that the newest ``n - 1``
    tokens followed by ``t`` already occur in the context (prompt and generated tokens).

    ``no_repeat_ngram: 0`` is neutral; ``1`` bans every token seen. The same bans as
    transformers' ``NoRepeatNGramLogitsProcessor`` (which also counts the prompt). A hard
    rule: good against loops in greedy or beam decoding, but it also forbids legitimate
    repeats (names, code); ``dry`` is the soft alternative. A row whose every remaining token
    would be banned is left unchanged.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> ctx = StepContext(1, 4, prompt_ids=[[1, 2, 3, 1]], uses=frozenset({"generated"}))
    >>> NoRepeatNgram([NoRepeatNgram.Params(no_repeat_ngram=2)]).apply(torch.zeros(1, 4), ctx)
    tensor([[0., 0., -inf, 0.]])
    """

    name = "no_repeat_ngram"
    constrains = True
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True
    uses = frozenset({"generated"})

    class Params(StepParams):
        no_repeat_ngram: int = Field(0, ge=0, description="size n of the n-grams that may occur only once; 0 disables")

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        self._sizes = sorted({row.no_repeat_ngram for row in self.rows if row.no_repeat_ngram})

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        vocab = logits.shape[-1]
        ids = ctx.context_ids(include_prompt=True)        # right-aligned: newest in the last column
        width = ids.shape[1]
        index, on = [], []
        for n in self._sizes:                                # one pass per distinct size in the batch
            if width < n:
                continue
            prefix = ids[:, width - n + 1:]                  # the newest n - 1 tokens
            windows = ids.unfold(1, n, 1)                    # [B, width - n + 1, n]
            matched = (windows[..., :-1] == prefix.unsqueeze(1)).all(-1)
            # A prefix reaching into the padding means the row is shorter than n - 1 tokens;
            # a window whose last slot is padding holds no n-gram.
            matched &= (prefix >= 0).all(-1, keepdim=True) & (windows[..., -1] >= 0)
            matched &= (self.p.no_repeat_ngram == n).unsqueeze(1)
            index.append(windows[..., -1].clamp(min=0, max=vocab - 1))
            on.append(matched)
        if not index:
            return logits
        # Each window bans its own last token: a sparse ban, no [B, V] mask.
        return ban_(logits, torch.cat(index, 1), torch.cat(on, 1))
