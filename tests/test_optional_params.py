"""Optional numeric parameters (``float | None``) work per row (issue 15 item 7): ``None`` is a
row's "off", packed as NaN / 0 with a ``<field>_given`` mask, so one batch mixes rows that set
the parameter and rows that leave it off."""

from __future__ import annotations

import torch
from pydantic import Field

import samplerkit
from samplerkit.params import StepParams
from samplerkit.steps import Processor
from samplerkit.testing import temporary_plugin


class CapLogits(Processor):
    """Clamp logits from above at ``cap``: ``min(x_i, cap)``; ``cap: null`` leaves the row as it is."""

    name = "cap_logits"

    class Params(StepParams):
        cap: float | None = Field(None, description="largest logit kept as is; null is off")

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        capped = torch.minimum(logits, self.p.cap.unsqueeze(-1))
        return torch.where(self.p.cap_given.unsqueeze(-1), capped, logits)


def test_a_batch_mixes_rows_with_and_without_an_optional_parameter():
    x = torch.tensor([[0.0, 2.0, 5.0], [0.0, 2.0, 5.0], [0.0, 2.0, 5.0]])
    with temporary_plugin(CapLogits) as registry:
        pipe = samplerkit.load_pipeline({"pipeline": [{"cap_logits": {"cap": None}}], "sampler": "greedy"},
                                        registry=registry)
        bound = pipe.bind([{"cap_logits": {"cap": 1.0}}, None, {"cap_logits": {"cap": 3.0}}])
        out = bound.process(x)
    assert out.tolist() == [[0.0, 1.0, 1.0], [0.0, 2.0, 5.0], [0.0, 2.0, 3.0]]


def test_packing_of_optional_numbers():
    step = CapLogits([CapLogits.Params(cap=2.0), CapLogits.Params()])
    assert step.p.cap_given.tolist() == [True, False]
    assert step.p.cap[0].item() == 2.0 and torch.isnan(step.p.cap[1])
    assert step.any_active                       # row 0 sets it: the step runs
    off = CapLogits([CapLogits.Params(), CapLogits.Params()])
    assert off.p.cap_given.tolist() == [False, False] and not off.any_active   # all off: skipped
