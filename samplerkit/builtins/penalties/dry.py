"""DRY ("Don't Repeat Yourself"): a penalty growing with the length of a repeated sequence."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from samplerkit.builtins.penalties._common import check_vocab
from samplerkit.context import StepContext
from samplerkit.params import StepParams
from samplerkit.steps import Processor

# As llama.cpp: cap the exponent so base ** exponent stays a finite float32.
_FLOAT_MAX_LOG = 88.7228391
_FLOAT32_MAX = torch.finfo(torch.float32).max


class Dry(Processor):
    """Penalise the token that would extend a repeat of earlier context, more the longer the repeat.

    For each candidate ``t``: let ``n`` be the longest suffix of the context that, followed by
    ``t``, occurred earlier in the context (the window of the last ``penalty_last_n`` tokens).
    If ``n >= allowed_length``: ``x_t -= multiplier * base ** (n - allowed_length)``. Matches
    never extend back across a sequence breaker, and a breaker itself is never penalised.
    The semantics of llama.cpp's ``dry`` sampler (from koboldcpp), with two differences:
    ``sequence_breakers`` are single **token ids** (processors have no tokenizer; llama.cpp
    takes strings, default ``["\\n", ":", "\\"", "*"]``), and ``penalty_last_n: 0`` means the
    whole context (llama.cpp spells that ``-1`` and uses ``0`` for off). ``multiplier: 0`` is
    neutral. Usual settings: ``multiplier 0.8, base 1.75, allowed_length 2``; placed with the
    penalties, before truncation (llama.cpp: after ``repetition_penalty``).

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> ctx = StepContext(1, 4, prompt_ids=[[0, 1, 2, 3, 0, 1]], uses=frozenset({"generated"}))
    >>> Dry([Dry.Params(multiplier=1.0, base=2.0, allowed_length=2)]).apply(torch.zeros(1, 4), ctx)
    tensor([[ 0.,  0., -1.,  0.]])
    """

    name = "dry"
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True
    uses = frozenset({"generated"})

    class Params(StepParams):
        multiplier: float = Field(0.0, ge=0.0, description="penalty for a repeat of exactly allowed_length tokens; 0 disables")
        base: float = Field(1.75, ge=1.0, description="the penalty grows by this factor per extra repeated token")
        allowed_length: int = Field(2, ge=1, description="repeats shorter than this are not penalised")
        penalty_last_n: int = Field(0, ge=0, description="how many of the newest tokens are scanned; 0 = whole context")
        sequence_breakers: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list,
                                             description="token ids a repeat never extends across (e.g. newline's id)")

        def is_neutral(self) -> bool:
            return self.multiplier == 0.0

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        width = max((len(r.sequence_breakers) for r in self.rows), default=0)
        breakers = torch.full((self.batch_size, max(width, 1)), -2, dtype=torch.int64)
        for i, r in enumerate(self.rows):
            breakers[i, :len(r.sequence_breakers)] = torch.tensor(r.sequence_breakers, dtype=torch.int64)
        self._breakers = breakers.to(self.device)
        self._largest = max((t for r in self.rows for t in r.sequence_breakers), default=-1)
        max_exp = [math.floor(_FLOAT_MAX_LOG / math.log(r.base)) if r.base > 1.000001 else 2**31 for r in self.rows]
        self._max_exp = torch.tensor(max_exp, dtype=torch.int64, device=self.device)
        active = [r for r in self.rows if not r.is_neutral()]
        # Host bound on the scanned width, so the search works on fewer columns when every
        # active row has a window.
        self._scan = max(r.penalty_last_n for r in active) if active and all(r.penalty_last_n for r in active) else None

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        vocab = logits.shape[-1]
        check_vocab(self.name, self._largest, vocab)
        ids = ctx.context_ids(include_prompt=True)        # right-aligned: newest in column L - 1
        if self._scan is not None:
            ids = ids[:, max(ids.shape[1] - self._scan, 0):]
        batch, width = ids.shape
        if width < 2:
            return logits
        cols = torch.arange(width, device=ids.device)
        length = (ids >= 0).sum(1)
        window = torch.where(self.p.penalty_last_n > 0, torch.minimum(length, self.p.penalty_last_n), length)
        start = width - window                            # first column of each row's window
        in_window = cols >= start.unsqueeze(1)
        breaker = (ids.unsqueeze(-1) == self._breakers.unsqueeze(1)).any(-1) & in_window
        # A repeat may not reach back past the newest breaker (rep_limit in llama.cpp).
        newest_breaker = torch.where(breaker, cols, -1).amax(1)
        limit = torch.where(newest_breaker >= 0, width - 1 - newest_breaker, window)

        # match[b, i]: length of the common suffix of the context ending at column i and the
        # whole context (ending at width - 1), capped at limit; i runs over 0 .. width - 2.
        earlier = cols[:-1]
        match = torch.zeros(batch, width - 1, dtype=torch.int64, device=ids.device)
        alive = in_window[:, :-1] & self.active.unsqueeze(1)
        for n in range(width - 1):
            pos = earlier - n
            alive &= (pos.unsqueeze(0) >= start.unsqueeze(1)) & (n < limit).unsqueeze(1)
            alive &= ids[:, pos.clamp(min=0)] == ids[:, width - 1 - n].unsqueeze(1)
            if not bool(alive.any()):
                break
            match += alive

        allowed = self.p.allowed_length.unsqueeze(1)
        following = ids[:, 1:]                            # the token that followed each earlier match
        hits = (match >= allowed) & (following >= 0) & (following < vocab)
        # A sequence breaker is never penalised itself.
        hits &= ~(following.unsqueeze(-1) == self._breakers.unsqueeze(1)).any(-1)
        exponent = torch.minimum(match - allowed, self._max_exp.unsqueeze(1)).clamp(min=0)
        # float64 like llama.cpp's std::pow(float, int), then clamped so a huge multiplier
        # cannot turn a logit into -inf.
        penalty = self.p.multiplier.double().unsqueeze(1) * self.p.base.double().unsqueeze(1) ** exponent.double()
        penalty = torch.where(hits, penalty.clamp(max=_FLOAT32_MAX), 0.0).float()
        # Sparse: each earlier match proposes x_t - penalty for its follower t; the longest
        # match (largest penalty) wins through a scatter-min, order-independent.
        index = following.clamp(min=0, max=vocab - 1)
        return logits.scatter_reduce_(1, index, logits.gather(1, index) - penalty, "amin")
