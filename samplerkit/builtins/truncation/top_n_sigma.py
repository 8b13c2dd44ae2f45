"""Top-n-sigma truncation."""

from __future__ import annotations

from pydantic import Field

from samplerkit.fastpath import ThresholdProcessor
from samplerkit.ops.shaping import top_n_sigma_threshold
from samplerkit.params import StepParams


class TopNSigma(ThresholdProcessor):
    """Keep logits within ``n`` standard deviations of the top: ``x_i >= max(x) - n * std(x)``.

    llama.cpp's ``top_n_sigma`` (Tang et al. 2024): mean and population standard deviation over
    the row's finite logits, on raw logits (so it is temperature-invariant in what it keeps when
    placed before ``temperature``). ``top_n_sigma = 0`` is neutral (llama.cpp disables it with
    any value ``<= 0``; its default is ``-1``). Usually followed by ``temperature``.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> TopNSigma([TopNSigma.Params(top_n_sigma=1.0)]).apply(torch.tensor([[4.0, 3.0, 1.0, 0.0]]), StepContext(1))
    tensor([[4., 3., -inf, -inf]])
    """

    name = "top_n_sigma"
    truncates = True
    scale_invariant = True  # max - n * sigma scales with the logits

    class Params(StepParams):
        top_n_sigma: float = Field(0.0, ge=0.0, description="standard deviations below the top logit kept; 0 disables")

    def threshold(self, logits):
        return top_n_sigma_threshold(logits, self.p.top_n_sigma)
