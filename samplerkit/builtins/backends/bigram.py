"""A deterministic byte-level bigram model: the decode loop's test backend.

It needs no files and runs in microseconds, yet behaves like a language model: a vocabulary
(256 bytes plus BOS and EOS), a tokenizer, a "cache" (the last token of each row), batched
prefill of prompts of different lengths, and logits ``log P(next | previous)`` estimated
from a text with additive smoothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from samplerkit.backend import Backend, PrefillOutput, TokenVocabulary, resolve_device
from samplerkit.params import StepParams
from samplerkit.strict import TorchDevice

DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog. A bird in the hand is worth two in the bush. "
    "The capital of France is Paris. The capital of Italy is Rome. The sun rises in the east "
    "and sets in the west. Time flies like an arrow; fruit flies like a banana. "
    "She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.\n\n"
)

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258


class BigramBackend(Backend):
    """Byte bigram language model estimated from ``text`` (default: a few English sentences).

    ``P(b | a) = (count(a, b) + smoothing) / (count(a) + smoothing * V)``. Each document of
    ``text`` (split on blank lines) is framed by BOS and EOS, so EOS has real probability.
    """

    name = "bigram"

    class Params(StepParams):
        text: str = Field(DEFAULT_TEXT, min_length=1, description="training text; blank lines separate documents")
        smoothing: float = Field(0.1, gt=0.0, description="additive smoothing of the bigram counts")
        max_context: int | None = Field(None, ge=1, description="longest prompt + generation allowed; null is unbounded")
        device: TorchDevice = Field("cpu", description="torch device of the logits")

    def __init__(self, params: StepParams | None = None):
        super().__init__(params)
        p = self.params
        counts = torch.zeros(VOCAB_SIZE, VOCAB_SIZE, dtype=torch.float64)
        for doc in (d for d in p.text.split("\n\n") if d):
            ids = [BOS_ID, *doc.encode("utf-8"), EOS_ID]
            a = torch.tensor(ids[:-1])
            b = torch.tensor(ids[1:])
            counts.index_put_((a, b), torch.ones(len(ids) - 1, dtype=torch.float64), accumulate=True)
        # Smooth only towards symbols the text uses, so sampled text stays valid UTF-8.
        alphabet = sorted(set(p.text.encode("utf-8")) | {EOS_ID})
        counts[:, alphabet] += p.smoothing
        counts[EOS_ID] = counts[BOS_ID]  # after EOS, as after BOS (only reached with ignore_eos)
        self.table = (counts / counts.sum(-1, keepdim=True)).log().to(torch.float32).to(resolve_device(p.device, "bigram"))
        self._last = torch.zeros(0, dtype=torch.int64, device=self.table.device)
        self._vocabulary: TokenVocabulary | None = None

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({EOS_ID})

    @property
    def max_context(self) -> int | None:
        return self.params.max_context

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return ([BOS_ID] if add_special else []) + list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_vocabulary(self) -> TokenVocabulary:
        """One byte per id below 256; BOS and EOS are no text."""
        if self._vocabulary is None:
            self._vocabulary = TokenVocabulary(
                vocab_size=VOCAB_SIZE, eos_token_ids=(EOS_ID,), tokens=[bytes([i]) for i in range(256)] + [b"", b""],
                special_token_ids=(BOS_ID, EOS_ID), bos_token_id=BOS_ID, encode=lambda data: list(data))
        return self._vocabulary

    def apply_chat_template(self, messages) -> str:
        """A toy template: ``S: system``, ``Q: user``, ``A: assistant`` lines, then ``A:`` for the reply."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        tags = {"system": "S", "user": "Q", "assistant": "A", "tool": "T", "developer": "S"}
        return "".join(f"{tags[m['role']]}: {m['content']}\n" for m in messages) + "A:"

    def prefill(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("bigram backend: every prompt needs at least one token")
        self._last = torch.tensor([p[-1] for p in prompts], dtype=torch.int64, device=self.table.device)
        everything = None
        if keep_all_logits:
            everything = [self.table[torch.as_tensor(list(p), device=self.table.device)] for p in prompts]
        return PrefillOutput(self.table[self._last], everything)

    can_join = True
    join_is_atomic = True

    def join(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        """New rows after the current ones: a bigram's only state per row is its last token
        (restored if the new prompts fail, so the running rows go on)."""
        old = self._last
        try:
            out = self.prefill(prompts, keep_all_logits=keep_all_logits)
        except BaseException:
            self._last = old
            raise
        self._last = torch.cat([old, self._last])
        return out

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        self._last = next_ids.to(self.table.device, torch.int64)
        return self.table[self._last]

    def select_rows(self, keep: Sequence[int]) -> None:
        self._last = self._last[torch.as_tensor(list(keep), dtype=torch.int64, device=self._last.device)]
