"""samplerkit-toybackend: the backend tutorial plugin (see docs/plugins.md, "A backend").

It registers one backend, ``trigram``: a byte-level trigram language model trained on a text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

import samplerkit
from samplerkit import Backend, PrefillOutput, StepParams

__all__ = ["BOS_ID", "EOS_ID", "TrigramBackend", "register_backends"]

BOS_ID = 256            # token ids 0..255 are the bytes of UTF-8 text
EOS_ID = 257
VOCAB_SIZE = 258

DEFAULT_TEXT = ("The cat sat on the mat. The dog sat on the log. The cat saw the dog.\n\n"
                "A bird in the hand is worth two in the bush.\n\n")


class TrigramBackend(Backend):
    """A byte trigram model: ``P(c | a, b) = (n(a, b, c) + s) / (n(a, b) + s |A|)`` over the
    alphabet ``A`` of the text (its bytes and EOS), backing off to the bigram ``P(c | b)`` for
    a context ``(a, b)`` the text never shows. Each document (split on blank lines) is framed
    by BOS and EOS. The cache of a row is its last two tokens.

    >>> backend = TrigramBackend(TrigramBackend.Params(text="abcabc"))
    >>> ids = backend.tokenize("ab")
    >>> ids
    [256, 97, 98]
    >>> backend.detokenize([backend.prefill([ids]).last.argmax(-1).item()])    # after "ab" comes "c"
    'c'
    """

    name = "trigram"

    class Params(StepParams):
        text: str = Field(DEFAULT_TEXT, min_length=1, description="training text; blank lines separate documents")
        smoothing: float = Field(0.1, gt=0.0, le=10.0, description="additive smoothing of the counts")

    # -- the model: one row of log-probabilities per context ------------------------------
    def __init__(self, params: StepParams | None = None):
        super().__init__(params)
        docs = [[BOS_ID, BOS_ID, *d.encode("utf-8"), EOS_ID] for d in self.params.text.split("\n\n") if d]
        trigrams = torch.tensor([d[i:i + 3] for d in docs for i in range(len(d) - 2)], dtype=torch.int64)
        contexts, row_of = torch.unique(trigrams[:, :2], dim=0, return_inverse=True)
        counts = torch.zeros(len(contexts) + VOCAB_SIZE, VOCAB_SIZE, dtype=torch.float64)
        counts.index_put_((row_of, trigrams[:, 2]), torch.ones(len(trigrams), dtype=torch.float64), accumulate=True)
        # Rows len(contexts) + b: the bigram P(c | b), the back-off for unseen contexts.
        counts.index_put_((len(contexts) + trigrams[:, 1], trigrams[:, 2]),
                          torch.ones(len(trigrams), dtype=torch.float64), accumulate=True)
        # Smooth towards the text's own bytes only, so sampled text stays valid UTF-8.
        alphabet = sorted({t for d in docs for t in d} - {BOS_ID})
        counts[:, alphabet] += self.params.smoothing
        self.table = (counts / counts.sum(-1, keepdim=True)).log().to(torch.float32)
        # The row of each context (a, b): its trigram row if seen, else b's bigram row.
        self.row = (len(contexts) + torch.arange(VOCAB_SIZE)).repeat(VOCAB_SIZE, 1)
        self.row[contexts[:, 0], contexts[:, 1]] = torch.arange(len(contexts))
        self._cache = torch.zeros(0, 2, dtype=torch.int64)       # [B, 2]: each row's last two tokens

    # -- vocabulary and tokenizer ----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({EOS_ID})

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return ([BOS_ID] if add_special else []) + list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    # -- compute: prefill, step, select_rows -----------------------------------------------
    def _logits(self, cache: torch.Tensor) -> torch.Tensor:
        return self.table[self.row[cache[:, 0], cache[:, 1]]]

    def prefill(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("trigram backend: every prompt needs at least one token")
        # The context of position t is (x[t-1], x[t]), with BOS before the prompt.
        padded = [torch.tensor([BOS_ID, *p], dtype=torch.int64) for p in prompts]
        self._cache = torch.stack([x[-2:] for x in padded])
        everything = None
        if keep_all_logits:
            everything = [self._logits(torch.stack([x[:-1], x[1:]], dim=-1)) for x in padded]
        return PrefillOutput(self._logits(self._cache), everything)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        self._cache = torch.stack([self._cache[:, 1], next_ids.to(torch.int64)], dim=-1)
        return self._logits(self._cache)

    def select_rows(self, keep: Sequence[int]) -> None:
        self._cache = self._cache[torch.as_tensor(list(keep), dtype=torch.int64)]


@samplerkit.hookimpl
def register_backends():
    return [TrigramBackend]
