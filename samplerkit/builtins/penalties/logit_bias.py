"""Per-token additive logit bias (OpenAI ``logit_bias``)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from samplerkit.builtins.penalties._common import check_vocab
from samplerkit.context import StepContext
from samplerkit.params import StepParams
from samplerkit.steps import Processor


class LogitBias(Processor):
    """Add a fixed bias to chosen tokens' logits: ``x_i += bias[i]``.

    ``bias`` maps token ids to values in ``[-100, 100]`` (the OpenAI range: ``-100``
    effectively bans a token, ``100`` effectively forces it; use ``bad_words`` or
    ``allowed_tokens`` to ban or force exactly). ``{}`` is neutral. An id outside the
    vocabulary is an error naming the id and the vocabulary size. Usually placed first (vLLM
    and llama.cpp apply it before penalties and truncation).

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> LogitBias([LogitBias.Params(bias={0: 2.5, 2: -1.0})]).apply(torch.zeros(1, 3), StepContext(1))
    tensor([[ 2.5000,  0.0000, -1.0000]])
    """

    name = "logit_bias"
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True

    class Params(StepParams):
        bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(
            default_factory=dict, description="token id -> value added to its logit (in [-100, 100]); {} disables")

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        triples = [(r, t, b) for r, row in enumerate(self.rows) for t, b in row.bias.items()]
        self._rows = torch.tensor([r for r, _, _ in triples], dtype=torch.int64, device=self.device)
        self._toks = torch.tensor([t for _, t, _ in triples], dtype=torch.int64, device=self.device)
        self._bias = torch.tensor([b for _, _, b in triples], dtype=torch.float32, device=self.device)
        self._largest = max((t for _, t, _ in triples), default=-1)

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        check_vocab(self.name, self._largest, logits.shape[-1])
        # Each (row, id) appears once (a dict), so accumulate only guards against aliasing.
        return logits.index_put_((self._rows, self._toks), self._bias, accumulate=True)
