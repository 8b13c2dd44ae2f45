"""Entropy-scaled (dynamic) temperature."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from samplerkit.builtins.shaping.temperature import GREEDY_BELOW, finite_division
from samplerkit.fastpath import FastPathProcessor
from samplerkit.ops import NEG_INF
from samplerkit.ops.shaping import dynamic_temperature
from samplerkit.params import StepParams


class DynamicTemperature(FastPathProcessor):
    """Divide logits by a temperature that grows with the row's normalised entropy: ``T = low + (high - low) (H / log n)^exponent``.

    llama.cpp's dynatemp (``temp_ext``; text-generation-webui's ``dynatemp_low/high/exponent``):
    ``H`` is the entropy of ``softmax(x)`` and ``n`` the number of finite logits, so confident
    rows get ``low`` and flat ones ``high``. llama.cpp's ``temp ± delta`` is ``low = temp - delta``,
    ``high = temp + delta``. ``low = high = 1`` is neutral; ``low = high = T`` is plain
    ``temperature: T``. A resulting ``T < 1e-5`` is greedy (the top token, lowest id among ties),
    as in ``temperature``. Usually the last processor (llama.cpp order).

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> step = DynamicTemperature([DynamicTemperature.Params(low=0.5, high=2.0)])
    >>> step.apply(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), StepContext(1))   # flat: H = log n, T = high
    tensor([[0.5000, 0.5000, 0.5000, 0.5000]])
    """

    name = "dynamic_temperature"
    rescales = True
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True
    argmax_invariant = True
    inplace = False

    class Params(StepParams):
        low: float = Field(1.0, ge=0.0, description="temperature at zero entropy (dynatemp_low); 1 with high 1 is neutral")
        high: float = Field(1.0, ge=0.0, description="temperature at maximum entropy (dynatemp_high); 1 with low 1 is neutral")
        exponent: float = Field(1.0, ge=0.0, description="exponent applied to the normalised entropy (dynatemp_exponent)")

        @model_validator(mode="after")
        def _ordered(self):
            if self.high < self.low:
                raise ValueError(f"high ({self.high:g}) must be >= low ({self.low:g})")
            return self

        def is_neutral(self) -> bool:
            return self.low == 1.0 and self.high == 1.0

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        t = dynamic_temperature(logits, self.p.low, self.p.high, self.p.exponent).to(torch.float32)
        t = torch.where(self.active, t, torch.ones_like(t))
        greedy = (t < GREEDY_BELOW).unsqueeze(-1)
        # Saturating division (as temperature): a finite logit never becomes inf.
        out = finite_division(logits, torch.where(greedy, torch.ones_like(t.unsqueeze(-1)), t.unsqueeze(-1)),
                               torch.empty_like(logits))
        top = out.argmax(dim=-1, keepdim=True)
        is_top = torch.zeros_like(out, dtype=torch.bool).scatter_(-1, top, True)
        return out.masked_fill_(greedy & ~is_top, NEG_INF)
