"""OpenAI/vLLM additive frequency and presence penalties."""

from __future__ import annotations

import torch
from pydantic import Field

from samplerkit.builtins.penalties._common import fill_padding
from samplerkit.context import StepContext
from samplerkit.params import StepParams
from samplerkit.steps import Processor


def _subtract_(logits: torch.Tensor, ctx: StepContext, coef: torch.Tensor, active: torch.Tensor, per_count: bool) -> torch.Tensor:
    """``x_i -= coef * (c_i if per_count else [c_i > 0])`` over the generated tokens of active rows."""
    if ctx.generated is None or (per_count and ctx.counts is None):     # no history kept: nothing generated yet
        return logits
    ids = ctx.generated
    # The generated buffer is left-aligned; flip it so padding is on the left, as fill_padding expects.
    cols = torch.arange(ids.shape[1], device=ids.device)
    ids = torch.where(cols < ctx.num_generated.unsqueeze(1), ids, -1).flip(1)
    if ids.shape[1] == 0:
        return logits
    # Sparse: only generated tokens change (O(B * T)); repeats of a token write the same value.
    index, present = fill_padding(ids)
    values = logits.gather(1, index)
    amount = ctx.counts.gather(1, index).to(logits.dtype) if per_count else torch.ones_like(values)
    new = values - coef.unsqueeze(1) * amount
    return logits.scatter_(1, index, torch.where(present & active.unsqueeze(1), new, values))


class FrequencyPenalty(Processor):
    """Subtract a penalty proportional to how often a token was generated: ``x_i -= f * c_i``.

    ``c_i`` counts token ``i`` among the **generated** tokens only (not the prompt), as in
    vLLM and the OpenAI API. ``f = 0`` is neutral; ``f`` in ``[-2, 2]`` as OpenAI (negative
    values encourage repeats). Often combined with ``presence_penalty``; both are additive,
    unlike the multiplicative ``repetition_penalty``.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> ctx = StepContext(1, 3, uses=frozenset({"generated", "counts"}), max_new_tokens=4)
    >>> for t in (1, 1, 2):
    ...     ctx.append(torch.tensor([t]))
    >>> FrequencyPenalty([FrequencyPenalty.Params(frequency_penalty=0.5)]).apply(torch.zeros(1, 3), ctx)
    tensor([[ 0.0000, -1.0000, -0.5000]])
    """

    name = "frequency_penalty"
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True
    uses = frozenset({"generated", "counts"})

    class Params(StepParams):
        frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0,
                                         description="subtracted once per occurrence among generated tokens; 0 disables")

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return _subtract_(logits, ctx, self.p.frequency_penalty, self.active, per_count=True)


class PresencePenalty(Processor):
    """Subtract a fixed penalty from every token generated at least once: ``x_i -= p * [c_i > 0]``.

    Counts the **generated** tokens only (vLLM, OpenAI). ``p = 0`` is neutral; ``p`` in
    ``[-2, 2]`` as OpenAI. Often combined with ``frequency_penalty``.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> ctx = StepContext(1, 3, uses=frozenset({"generated"}), max_new_tokens=4)
    >>> for t in (1, 1, 2):
    ...     ctx.append(torch.tensor([t]))
    >>> PresencePenalty([PresencePenalty.Params(presence_penalty=0.5)]).apply(torch.zeros(1, 3), ctx)
    tensor([[ 0.0000, -0.5000, -0.5000]])
    """

    name = "presence_penalty"
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True
    uses = frozenset({"generated"})

    class Params(StepParams):
        presence_penalty: float = Field(0.0, ge=-2.0, le=2.0,
                                        description="subtracted from every token generated at least once; 0 disables")

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return _subtract_(logits, ctx, self.p.presence_penalty, self.active, per_count=False)
