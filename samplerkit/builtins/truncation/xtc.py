"""XTC: exclude top choices."""

from __future__ import annotations

import torch
from pydantic import Field

from samplerkit.ops import NEG_INF, uniform
from samplerkit.ops.shaping import xtc_mask
from samplerkit.params import StepParams
from samplerkit.seeded import RowStreams, Seeded
from samplerkit.steps import Processor

#: Random stream of XTC's per-row coin (independent of the samplers' streams on the same key).
XTC_STREAM = 0x787463


class Xtc(Seeded, Processor):
    """With probability ``probability``, remove every token with ``p_i >= threshold`` except the least probable of them.

    llama.cpp's ``xtc`` (text-generation-webui's "exclude top choices"): it removes the obvious
    continuations when there are several good ones, and does nothing when fewer than two tokens
    reach ``threshold``. ``probability = 0`` is neutral. Tokens tied with the least probable one
    above the threshold stay too. Each row's coin is drawn from its own counter-based stream,
    keyed by ``(seed, tokens the row has generated)``, so it does not depend on the batch;
    ``seed: null`` draws a seed from torch's global generator when the batch is formed. llama.cpp
    places it after ``min_p``, before ``temperature``.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> Xtc([Xtc.Params(threshold=0.2, probability=1.0, seed=0)]).apply(x, StepContext(1)).exp()
    tensor([[0.0000, 0.3000, 0.1500, 0.0500]])
    """

    name = "xtc"
    stochastic = True
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True

    class Params(StepParams):
        threshold: float = Field(0.1, gt=0.0, le=1.0, description="tokens at or above this probability are top choices (above 0.5 nothing is removed)")
        probability: float = Field(0.0, ge=0.0, le=1.0, description="chance per row and token that top choices are removed; 0 disables")
        seed: int | None = Field(None, ge=0, lt=2**63, description="seed of the row's coin; null draws one at random")

        def is_neutral(self) -> bool:
            return self.probability == 0.0

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        # Only active unseeded rows consume the global generator (so a neutral xtc does not
        # shift the sampler's unseeded draws).
        self.streams = RowStreams.for_rows(self.rows, self.device, draw_for=[not row.is_neutral() for row in self.rows])

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        coin = uniform(self.streams.keys(ctx), XTC_STREAM)
        fire = self.active & (coin < self.p.probability.double())
        keep = xtc_mask(logits, self.p.threshold) | ~fire.unsqueeze(-1)
        return logits.masked_fill_(~keep, NEG_INF)
