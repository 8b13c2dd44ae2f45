"""The step context: per-row history the decode loop maintains for the steps that need it.

Plugin authors read from it; they never do batch add/remove bookkeeping. When rows finish
or fan out (``n`` samples), the loop calls :meth:`StepContext.select_rows` and every tensor
here, including plugin state in :attr:`StepContext.state`, follows its row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StepContext:
    """History for one batch.

    Attributes:
        prompt_ids: per row, the prompt's token ids (a Python list; read-only).
        generated: ``[B, T]`` int64, the tokens generated so far (columns past ``num_generated``
            of a row are ``-1``); only filled when a step ``uses`` ``"generated"``.
        num_generated: ``[B]`` int64, how many tokens each row has generated; also the
            per-row counter of the random streams.
        counts: ``[B, V]`` int32 occurrences of each token among the generated ones (only when
            a step ``uses`` ``"counts"``; otherwise ``None``).
        state: per-row tensors owned by steps (first dimension ``B``), e.g. mirostat's ``mu``;
            kept aligned with rows by the loop.
    """

    def __init__(self, batch_size: int, vocab_size: int | None = None, *,
                 prompt_ids: Sequence[Sequence[int]] | None = None,
                 uses: frozenset[str] = frozenset(), max_new_tokens: int = 0,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.prompt_ids: list[list[int]] = [list(p) for p in prompt_ids] if prompt_ids else [[] for _ in range(batch_size)]
        self.num_generated = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self._keep_generated = "generated" in uses
        self.generated = (torch.full((batch_size, max(max_new_tokens, 0)), -1, dtype=torch.int64, device=self.device)
                          if self._keep_generated else None)
        self.counts = (torch.zeros(batch_size, vocab_size, dtype=torch.int32, device=self.device)
                       if "counts" in uses and vocab_size else None)
        self.state: dict[str, torch.Tensor] = {}

    @property
    def batch_size(self) -> int:
        return int(self.num_generated.shape[0])

    def append(self, ids: torch.Tensor) -> None:
        """Record one new token per row (``[B]`` int64)."""
        if self.generated is not None:
            col = self.num_generated.clamp(max=self.generated.shape[1] - 1).unsqueeze(1)
            self.generated.scatter_(1, col, ids.unsqueeze(1))
        if self.counts is not None:
            self.counts.scatter_add_(1, ids.unsqueeze(1), torch.ones_like(ids, dtype=torch.int32).unsqueeze(1))
        self.num_generated += 1

    def select_rows(self, keep: Sequence[int]) -> None:
        """Keep these rows, in this order (repeats duplicate a row): mirrors the backend."""
        index = torch.as_tensor(list(keep), dtype=torch.int64, device=self.device)
        self.prompt_ids = [self.prompt_ids[i] for i in keep]
        self.num_generated = self.num_generated.index_select(0, index)
        if self.generated is not None:
            self.generated = self.generated.index_select(0, index)
        if self.counts is not None:
            self.counts = self.counts.index_select(0, index)
        self.state = {k: v.index_select(0, index) for k, v in self.state.items()}
