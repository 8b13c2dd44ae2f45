"""The step context: per-row history the decode loop maintains for the steps that need it.

Plugin authors read from it; they never do batch add/remove bookkeeping. When rows finish
or fan out (``n`` samples), the loop calls :meth:`StepContext.select_rows` and every tensor
here, including plugin state in :attr:`StepContext.state`, follows its row.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from samplerkit.errors import GenerationError

#: Columns of ``generated`` before its first doubling.
_INITIAL_WIDTH = 64


class StepContext:
    """History for one batch.

    Attributes:
        prompt_ids: per row, the prompt's token ids (a Python list; read-only).
        generated: ``[B, T]`` int64, the tokens generated so far (columns past ``num_generated``
            of a row are ``-1``); only filled when a step ``uses`` ``"generated"``. ``T`` grows
            with the text actually generated (doubling, so appends cost amortised O(B) each)
            and never exceeds ``max_new_tokens``: a huge ``max_new_tokens`` allocates nothing
            up front. Code that needs the buffer to stay the same tensor (a CUDA graph reading
            it in place) calls :meth:`reserve` first.
        num_generated: ``[B]`` int64, how many tokens each row has generated; also the
            per-row counter of the random streams.
        counts: ``[B, V]`` int32 occurrences of each token among the generated ones (only when
            a step ``uses`` ``"counts"``; otherwise ``None``).
        state: per-row tensors owned by steps (first dimension ``B``), e.g. mirostat's ``mu``;
            kept aligned with rows by the loop.
        eos_token_ids: the ids that end a row (the backend's EOS ids plus the run's
            ``stop_token_ids``), filled by the decode loop; empty when unknown (``min_tokens``
            reads it).
        tokenize: text to token ids without special tokens (the backend's tokenizer), set by
            the decode loop; ``None`` outside it. Steps that take strings (``bad_words.words``)
            tokenize through it once per batch.
        token_vocabulary: a zero-argument callable returning the backend's
            :class:`~samplerkit.backend.TokenVocabulary` (the bytes of every token), set by the
            decode loop; ``None`` outside it. Constrained steps (``json_schema``, ``regex``...)
            call it once per batch to build their token masks; nobody else pays for it.
    """

    def __init__(self, batch_size: int, vocab_size: int | None = None, *,
                 prompt_ids: Sequence[Sequence[int]] | None = None,
                 uses: frozenset[str] = frozenset(), max_new_tokens: int = 0,
                 eos_token_ids: Sequence[int] = (), tokenize: Callable[[str], list[int]] | None = None,
                 token_vocabulary: Callable[[], Any] | None = None, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(set(eos_token_ids)))
        if vocab_size is not None and (bad := [i for i in self.eos_token_ids if not 0 <= i < vocab_size]):
            # A stop id the model cannot produce would never end a row (and min_tokens would
            # index past the logits): refuse it before the first token, naming where it came from.
            raise GenerationError(f"generation.stop_token_ids (or the backend's EOS ids) holds "
                                  f"{', '.join(map(str, bad))}, outside the model's vocabulary of {vocab_size} ids "
                                  f"(0..{vocab_size - 1}); no such token can be generated, so it would never end a "
                                  "row: remove it or give the id of a token the model has")
        self.tokenize = tokenize
        self.token_vocabulary = token_vocabulary
        self.vocab_size = vocab_size
        self.prompt_ids: list[list[int]] = [list(p) for p in prompt_ids] if prompt_ids else [[] for _ in range(batch_size)]
        self.num_generated = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self._keep_generated = "generated" in uses
        #: Upper bound on ``generated``'s width (the run's token budget).
        self.max_new_tokens = max(int(max_new_tokens), 0)
        # Host-side count of appends: no row has generated more (rows only leave or repeat),
        # so growth is decided without reading num_generated back from the device.
        self._appended = 0
        self.generated = (torch.full((batch_size, min(self.max_new_tokens, _INITIAL_WIDTH)), -1, dtype=torch.int64,
                                     device=self.device)
                          if self._keep_generated else None)
        self.counts = (torch.zeros(batch_size, vocab_size, dtype=torch.int32, device=self.device)
                       if "counts" in uses and vocab_size else None)
        self.state: dict[str, torch.Tensor] = {}
        #: Set by the decode loop when it reports logprobs: a sampler that draws from something
        #: other than its input logits (its own truncation) then calls :meth:`record_distribution`.
        self.want_distribution = False
        self._distribution: torch.Tensor | None = None
        self._prompt_tensor: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.num_generated.shape[0])

    def record_distribution(self, logits: torch.Tensor) -> None:
        """Sampler hook: the ``[B, V]`` logits this step's tokens are actually drawn from, when
        they differ from the sampler's input (mirostat's own top-k or surprise cut). The decode
        loop reports ``processed_logprob`` under ``softmax`` of them. Free when nobody asked
        (:attr:`want_distribution` is False); a sampler that draws from its input calls nothing."""
        if self.want_distribution:
            self._distribution = logits

    def take_distribution(self) -> torch.Tensor | None:
        """The logits recorded by :meth:`record_distribution` this step (then forgotten), or ``None``."""
        out, self._distribution = self._distribution, None
        return out

    def reserve(self, width: int) -> None:
        """Grow ``generated`` to at least ``width`` columns now (capped at ``max_new_tokens``)."""
        if self.generated is None:
            return
        width = min(int(width), self.max_new_tokens)
        have = self.generated.shape[1]
        if width > have:
            pad = self.generated.new_full((self.generated.shape[0], width - have), -1)
            self.generated = torch.cat([self.generated, pad], dim=1)

    def append(self, ids: torch.Tensor) -> None:
        """Record one new token per row (``[B]`` int64)."""
        if self.generated is not None:
            if self._appended >= self.generated.shape[1]:       # full: double (amortised O(1) per token)
                self.reserve(max(2 * self.generated.shape[1], _INITIAL_WIDTH))
        if self.generated is not None and self.generated.shape[1] > 0:
            col = self.num_generated.clamp(max=self.generated.shape[1] - 1).unsqueeze(1)
            self.generated.scatter_(1, col, ids.unsqueeze(1))
        if self.counts is not None:
            self.counts.scatter_add_(1, ids.unsqueeze(1), torch.ones_like(ids, dtype=torch.int32).unsqueeze(1))
        self.num_generated += 1
        self._appended += 1

    def prompt_tensor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts as ``([B, P] int64 ids right-padded with -1, [B] int64 lengths)``.

        Built from :attr:`prompt_ids` on first use and then kept (and row-selected) with the
        context, so steps that need the prompt on the device pay for it once per batch.
        """
        if self._prompt_tensor is None:
            lengths = [len(p) for p in self.prompt_ids]
            ids = torch.full((len(lengths), max(lengths, default=0)), -1, dtype=torch.int64)
            for i, p in enumerate(self.prompt_ids):
                ids[i, :len(p)] = torch.as_tensor(p, dtype=torch.int64)
            self._prompt_tensor = (ids.to(self.device), torch.tensor(lengths, dtype=torch.int64, device=self.device))
        return self._prompt_tensor

    def context_ids(self, include_prompt: bool = True) -> torch.Tensor:
        """Each row's history ``[B, L]`` int64, **right-aligned**: the prompt (if
        ``include_prompt``) then the generated tokens, the newest in column ``L - 1``; ``-1``
        pads the left. ``L`` is a bound known without a device sync (prompt width plus the
        ``generated`` buffer's width), so some columns may be padding in every row. Aligning
        the ends lets suffix matches (n-grams, DRY) run as whole-batch tensor ops. Without a
        ``generated`` buffer (no step declared ``uses = {"generated"}``), only the prompt.
        """
        batch = self.batch_size
        gen = self.generated if self.generated is not None else torch.full((batch, 0), -1, dtype=torch.int64, device=self.device)
        n_gen = self.num_generated.clamp(max=gen.shape[1]) if self.generated is not None else torch.zeros_like(self.num_generated)
        if include_prompt:
            prompt, p_len = self.prompt_tensor()
        else:
            prompt = gen.new_full((batch, 0), -1)
            p_len = torch.zeros_like(n_gen)
        width = prompt.shape[1]
        joined = torch.cat([prompt, gen], dim=1)
        cols = joined.shape[1]
        if cols == 0:
            return joined
        pos = torch.arange(cols, device=self.device) - (cols - (p_len + n_gen)).unsqueeze(1)   # index in the row's sequence
        src = torch.where(pos < p_len.unsqueeze(1), pos, pos - p_len.unsqueeze(1) + width).clamp_(0, cols - 1)
        return joined.gather(1, src).masked_fill_(pos < 0, -1)

    @classmethod
    def concat(cls, contexts: Sequence[StepContext]) -> StepContext:
        """One context whose rows are those of ``contexts``, in order, each row's history and
        state kept (the engine samples several requests' rows with one call). The contexts come
        from the same pipeline and run settings (``eos_token_ids``, vocabulary, ``uses``) and
        hold the same :attr:`state` keys (a ``ValueError`` otherwise)."""
        first = contexts[0]
        keys = set(first.state)
        if any(set(c.state) != keys for c in contexts) or any(
                (c.generated is None) != (first.generated is None) or (c.counts is None) != (first.counts is None)
                for c in contexts):
            raise ValueError("contexts with different state cannot be concatenated")
        out = copy.copy(first)
        out.prompt_ids = [p for c in contexts for p in c.prompt_ids]
        out.num_generated = torch.cat([c.num_generated for c in contexts])
        out.max_new_tokens = max(c.max_new_tokens for c in contexts)
        out._appended = max(c._appended for c in contexts)
        if first.generated is not None:
            width = max(c.generated.shape[1] for c in contexts)
            out.generated = torch.cat([c.generated if c.generated.shape[1] == width else torch.cat(
                [c.generated, c.generated.new_full((c.generated.shape[0], width - c.generated.shape[1]), -1)], dim=1)
                for c in contexts])
        if first.counts is not None:
            out.counts = torch.cat([c.counts for c in contexts])
        out.state = {k: torch.cat([c.state[k] for c in contexts]) for k in keys}
        out._distribution = None
        out._prompt_tensor = None
        return out

    def rows_copy(self, keep: Sequence[int]) -> StepContext:
        """A new context with these rows (as :meth:`select_rows`), this one unchanged."""
        out = copy.copy(self)
        out.select_rows(keep)
        return out

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
        if self._prompt_tensor is not None:
            self._prompt_tensor = tuple(t.index_select(0, index) for t in self._prompt_tensor)
