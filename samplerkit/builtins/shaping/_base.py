"""Shared pieces of the shaping processors."""

from __future__ import annotations

import torch

from samplerkit.ops import NEG_INF
from samplerkit.steps import Processor


class MaskProcessor(Processor):
    """A truncation: subclasses return the kept mask from :meth:`keep`; inactive rows are left
    unchanged and removed tokens become ``-inf``."""

    argmax_invariant = True

    def keep(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        keep = self.keep(logits, ctx)
        if not self.all_active:
            keep = keep | ~self.active.unsqueeze(-1)
        return logits.masked_fill_(~keep, NEG_INF)
