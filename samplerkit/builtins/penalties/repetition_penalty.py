"""CTRL-style multiplicative repetition penalty."""

from __future__ import annotations

import torch
from pydantic import Field

from samplerkit.builtins.penalties._common import fill_padding
from samplerkit.context import StepContext
from samplerkit.ops.shaping import saturate
from samplerkit.params import StepParams
from samplerkit.steps import Processor


class RepetitionPenalty(Processor):
    """Make tokens already in the context less likely by dividing (or multiplying) their logit.

    For every token ``i`` seen in the window: ``x_i / r`` if ``x_i > 0``, else ``x_i * r``
    (CTRL, Keskar et al. 2019; transformers' ``RepetitionPenaltyLogitsProcessor``, llama.cpp's
    ``repeat_penalty``). A token counts once however often it occurred. ``r = 1`` is neutral;
    ``r > 1`` discourages repeats, ``r < 1`` encourages them. The window is the prompt plus
    the generated tokens (``include_prompt: false``: the generated ones only, like
    transformers' ``prompt_ignore_length``), cut to the most recent ``last_n`` (0: all).
    Usually placed first, before ``temperature`` and truncation; often combined with
    ``frequency_penalty``/``presence_penalty`` or replaced by ``dry``.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> ctx = StepContext(1, 4, prompt_ids=[[0]], uses=frozenset({"generated"}), max_new_tokens=4)
    >>> ctx.append(torch.tensor([2]))
    >>> step = RepetitionPenalty([RepetitionPenalty.Params(repetition_penalty=2.0)])
    >>> step.apply(torch.tensor([[1.0, 1.0, -1.0, 1.0]]), ctx)
    tensor([[ 0.5000,  1.0000, -2.0000,  1.0000]])
    """

    name = "repetition_penalty"
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True
    uses = frozenset({"generated"})

    class Params(StepParams):
        repetition_penalty: float = Field(1.0, gt=0.0, description="divisor of positive (multiplier of negative) logits of seen tokens; 1 disables")
        last_n: int = Field(0, ge=0, description="only the most recent last_n tokens of the context count; 0 = all")
        include_prompt: bool = Field(True, description="count the prompt's tokens too (as transformers); false = generated tokens only")

        def is_neutral(self) -> bool:
            return self.repetition_penalty == 1.0

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        active = [r for r in self.rows if not r.is_neutral()]
        # Host flags: which history to build, whether any row cuts a window.
        self._any_prompt = any(r.include_prompt for r in active)
        self._cut = any(r.last_n > 0 for r in active) or (self._any_prompt and not all(r.include_prompt for r in active))

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        ids = ctx.context_ids(include_prompt=self._any_prompt)
        if ids.shape[1] == 0:
            return logits
        if self._cut:
            # Per-row window, counted from the right (the history is right-aligned).
            width = ids.shape[1]
            n_gen = ctx.num_generated.clamp(max=ctx.generated.shape[1]) if ctx.generated is not None \
                else torch.zeros_like(ctx.num_generated)
            window = torch.where(self.p.include_prompt, (ids >= 0).sum(1), n_gen)
            window = torch.where(self.p.last_n > 0, torch.minimum(window, self.p.last_n), window)
            ids = ids.masked_fill(torch.arange(width, device=ids.device) < (width - window).unsqueeze(1), -1)
        # Only the seen tokens are touched: gather, penalise, scatter back (O(B * L), not O(B * V)).
        index, present = fill_padding(ids)
        values = logits.gather(1, index)
        r = self.p.repetition_penalty.unsqueeze(1)
        # The same expression as transformers, so the two agree bitwise.
        penalized = torch.where(values < 0, values * r, values / r)
        # A finite logit divided by a tiny penalty would overflow: saturate at the float32 range.
        penalized = saturate(penalized, values)
        return logits.scatter_(1, index, torch.where(present & self.active.unsqueeze(1), penalized, values))
