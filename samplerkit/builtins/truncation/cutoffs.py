"""Epsilon and eta sampling: absolute and entropy-adaptive probability floors."""

from __future__ import annotations

from pydantic import Field

from samplerkit.builtins.truncation.min_keep import KeepsMinTokens
from samplerkit.fastpath import MaskProcessor
from samplerkit.ops.shaping import epsilon_mask, eta_threshold, keep_top_count
from samplerkit.params import StepParams


class EpsilonCutoff(KeepsMinTokens, MaskProcessor):
    """Remove tokens with ``p_i < epsilon_cutoff``, keeping at least the ``min_tokens_to_keep`` most probable.

    transformers' ``EpsilonLogitsWarper`` (Hewitt et al. 2022, truncation sampling).
    ``epsilon_cutoff = 0`` is neutral; useful values are about ``3e-4``. Usually combined with
    ``temperature``; tokens tied with the last kept of the ``min_tokens_to_keep`` stay too.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> x = torch.log(torch.tensor([[0.6, 0.3, 0.08, 0.02]]))
    >>> EpsilonCutoff([EpsilonCutoff.Params(epsilon_cutoff=0.05)]).apply(x, StepContext(1)).exp()
    tensor([[0.6000, 0.3000, 0.0800, 0.0000]])
    """

    name = "epsilon_cutoff"
    truncates = True

    class Params(StepParams):
        epsilon_cutoff: float = Field(0.0, ge=0.0, lt=1.0, description="tokens below this probability are removed; 0 disables")
        min_tokens_to_keep: int = Field(1, ge=1, description="keep at least this many of the most probable tokens")

        def is_neutral(self) -> bool:
            return self.epsilon_cutoff == 0.0

    def keep(self, logits, ctx):
        return epsilon_mask(logits, self.p.epsilon_cutoff) | keep_top_count(logits, self.p.min_tokens_to_keep, self._min_keep_max)


class EtaCutoff(KeepsMinTokens, MaskProcessor):
    """Remove tokens with ``p_i < min(eta_cutoff, sqrt(eta_cutoff) * exp(-H))``, ``H`` the entropy.

    transformers' ``EtaLogitsWarper`` (Hewitt et al. 2022): the floor drops when the
    distribution is flat (high entropy), so creative continuations survive.
    ``eta_cutoff = 0`` is neutral; useful values are about ``3e-4`` to ``2e-3``. At least the
    ``min_tokens_to_keep`` most probable tokens stay. Usually combined with ``temperature``.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> x = torch.log(torch.tensor([[0.9, 0.09, 0.009, 0.001]]))
    >>> EtaCutoff([EtaCutoff.Params(eta_cutoff=0.05)]).apply(x, StepContext(1)).exp()
    tensor([[0.9000, 0.0900, 0.0000, 0.0000]])
    """

    name = "eta_cutoff"
    truncates = True

    class Params(StepParams):
        eta_cutoff: float = Field(0.0, ge=0.0, lt=1.0, description="epsilon of eta sampling (the floor is min(eta, sqrt(eta) exp(-H))); 0 disables")
        min_tokens_to_keep: int = Field(1, ge=1, description="keep at least this many of the most probable tokens")

        def is_neutral(self) -> bool:
            return self.eta_cutoff == 0.0

    def keep(self, logits, ctx):
        keep = logits.softmax(dim=-1) >= eta_threshold(logits, self.p.eta_cutoff)
        return keep | keep_top_count(logits, self.p.min_tokens_to_keep, self._min_keep_max)
