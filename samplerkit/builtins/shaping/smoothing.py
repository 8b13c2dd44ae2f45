"""Quadratic smoothing."""

from __future__ import annotations

import torch
from pydantic import Field

from samplerkit.fastpath import FastPathProcessor
from samplerkit.ops.shaping import quadratic_smoothing
from samplerkit.params import StepParams


class Smoothing(FastPathProcessor):
    """Reshape logits by a quadratic (or cubic) curve around the top: ``x' = max - k f d^2 + s f d^3``, ``d = x - max``.

    text-generation-webui's quadratic sampling: ``f = smoothing_factor``,
    ``k = (3 - smoothing_curve) / 2``, ``s = (smoothing_curve - 1) / 2``. Small ``f`` flattens the
    head of the distribution and cuts the far tail; large ``f`` sharpens. ``smoothing_factor = 0``
    is neutral (webui skips the step then); ``-inf`` stays ``-inf``. The maximum is per row
    (webui takes it over its batch of one). Replaces or precedes ``temperature``.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> Smoothing([Smoothing.Params(smoothing_factor=0.5)]).apply(torch.tensor([[2.0, 1.0, 0.0]]), StepContext(1))
    tensor([[2.0000, 1.5000, 0.0000]])
    """

    name = "smoothing"
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True
    # With smoothing_curve > 3 the cubic term can lift a token above the former maximum.
    argmax_invariant = False
    inplace = False

    class Params(StepParams):
        smoothing_factor: float = Field(0.0, ge=0.0, description="strength of the quadratic transform; 0 disables")
        smoothing_curve: float = Field(1.0, ge=1.0, description="1 is purely quadratic; larger adds a cubic term that cuts the tail harder")

        def is_neutral(self) -> bool:
            return self.smoothing_factor == 0.0

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        out = quadratic_smoothing(logits, self.p.smoothing_factor, self.p.smoothing_curve)
        if not self.all_active:
            out = torch.where(self.active.unsqueeze(-1), out, logits)
        return out
