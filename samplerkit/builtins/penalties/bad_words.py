"""Banned token sequences (transformers ``bad_words_ids``)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from samplerkit.builtins.penalties._common import ban_, check_vocab
from samplerkit.context import StepContext
from samplerkit.errors import SamplerkitError, short_repr
from samplerkit.params import StepParams
from samplerkit.steps import Processor

TokenSequence = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class BadWords(Processor):
    """Never complete a banned token sequence: ``x_t = -inf`` for the last token ``t`` of each
    sequence whose other tokens are the newest tokens of the context.

    A one-token sequence is always banned; ``[a, b, c]`` bans ``c`` only right after ``a b``
    (prompt and generated tokens both count, as transformers' ``NoBadWordsLogitsProcessor``).
    ``bad_words: []`` and ``words: []`` are neutral. ``bad_words`` are token-id sequences;
    ``words`` are strings, tokenized once per batch with the backend's tokenizer (no special
    tokens; a word after a space is usually another sequence, so list ``" word"`` too). Ids
    outside the vocabulary are an error. A row whose every remaining token would be banned is left unchanged. Usually
    first in the pipeline.

    >>> import torch
    >>> from samplerkit.context import StepContext
    >>> ctx = StepContext(1, 4, prompt_ids=[[1]], uses=frozenset({"generated"}), max_new_tokens=2)
    >>> step = BadWords([BadWords.Params(bad_words=[[3], [1, 2], [0, 2]])])
    >>> step.apply(torch.zeros(1, 4), ctx)
    tensor([[0., 0., -inf, -inf]])
    """

    name = "bad_words"
    constrains = True
    # NaN/+inf never written on valid rows (tests/test_properties.py, extreme values).
    keeps_finite = True
    uses = frozenset({"generated"})

    class Params(StepParams):
        bad_words: list[TokenSequence] = Field(
            default_factory=list,
            description="token-id sequences never completed; [[t]] bans t always; [] disables")
        words: list[Annotated[str, Field(min_length=1)]] = Field(
            default_factory=list,
            description="strings never completed, tokenized with the model's tokenizer; [] disables")

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        self._needs_tokenizer = any(row.words for row in self.rows)
        if not self._needs_tokenizer:
            self._pack([row.bad_words for row in self.rows])

    def _tokenized(self, tokenize) -> list[list[list[int]]]:
        if tokenize is None:
            raise SamplerkitError(
                "bad_words.words needs the model's tokenizer, which only the decode loop "
                "(samplerkit.generate) provides; outside it, give token ids in bad_words")
        per_row = []
        for row in self.rows:
            sequences = [list(s) for s in row.bad_words]
            for word in row.words:
                ids = list(tokenize(word))
                if not ids:
                    raise SamplerkitError(f"bad_words.words: {short_repr(word)} tokenizes to no tokens")
                sequences.append(ids)
            per_row.append(sequences)
        return per_row

    def _pack(self, sequences_per_row) -> None:
        words = [[list(s) for s in dict.fromkeys(tuple(s) for s in row)] for row in sequences_per_row]
        self._largest = max((t for ws in words for s in ws for t in s), default=-1)
        # Per row, one slot per sequence: the id it bans ([B, N]) and its prefix right-aligned
        # in a [B, N, M] table (padding -2 never matches; a one-token word has no prefix, so
        # it always matches). Packed once; each step is one comparison with the context's tail.
        n = max((len(ws) for ws in words), default=0) or 1
        self._width = max((len(s) - 1 for ws in words for s in ws), default=0)
        last = torch.zeros(self.batch_size, n, dtype=torch.int64)
        valid = torch.zeros(self.batch_size, n, dtype=torch.bool)
        prefixes = torch.full((self.batch_size, n, self._width), -2, dtype=torch.int64)
        for i, ws in enumerate(words):
            for j, s in enumerate(ws):
                last[i, j], valid[i, j] = s[-1], True
                if len(s) > 1:
                    prefixes[i, j, self._width - len(s) + 1:] = torch.tensor(s[:-1])
        self._last, self._valid, self._prefixes = last.to(self.device), valid.to(self.device), prefixes.to(self.device)

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self._needs_tokenizer:            # strings: tokenized once, on the first step
            self._pack(self._tokenized(ctx.tokenize))
            self._needs_tokenizer = False
        check_vocab(self.name, self._largest, logits.shape[-1])
        on = self._valid
        if self._width:
            ids = ctx.context_ids(include_prompt=True)      # right-aligned: newest last
            if ids.shape[1] < self._width:
                ids = torch.nn.functional.pad(ids, (self._width - ids.shape[1], 0), value=-1)
            tail = ids[:, ids.shape[1] - self._width:].unsqueeze(1)       # [B, 1, M]
            on = on & ((tail == self._prefixes) | (self._prefixes == -2)).all(-1)
        return ban_(logits, self._last, on)
