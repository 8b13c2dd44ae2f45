"""The backend protocol: how the decode loop talks to a model.

A backend owns a model, its tokenizer and its KV cache. The decode loop (``generate.py``)
is the only caller; backends know nothing about pipelines.

One generation runs as::

    out = backend.prefill(prompts, keep_all_logits=echo)   # out.last: [B, V] float32
    while rows remain:
        ids = pipeline.sample(out.last)                    # [B] int64
        backend.select_rows(still_running)                 # optional compaction
        logits = backend.step(ids[still_running])          # [B', V] float32

Rows are identified by position: after ``select_rows(keep)`` row ``j`` of the backend is the
old row ``keep[j]``. ``select_rows`` may repeat an index, which duplicates that row's cache
(used for ``n`` samples per prompt: prefill once, then fan out).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from samplerkit.params import NoParams, StepParams


def resolve_device(device: str, backend_name: str) -> torch.device:
    """``torch.device(device)``, with a clear error for a malformed name or missing CUDA."""
    from samplerkit.errors import SamplerkitError

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise SamplerkitError(f"{backend_name} backend: invalid device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SamplerkitError(f"{backend_name} backend: device {device!r} requested but CUDA is not available")
    return dev


@dataclass
class PrefillOutput:
    """Logits after a prefill.

    ``last``: ``[B, V]`` float32, the logits at each prompt's last position (next-token
    distribution). ``all``: when asked for, one ``[L_i, V]`` float32 tensor per prompt with
    the logits at every prompt position (row ``t`` predicts token ``t + 1``); used for echo.
    """

    last: torch.Tensor
    all: list[torch.Tensor] | None = None


class Backend(ABC):
    """Base class for model backends (register them with the ``register_backends`` hook).

    Subclasses set ``name`` and ``Params`` (a :class:`~samplerkit.params.StepParams` model for
    their YAML options) and implement the abstract methods.
    """

    name: ClassVar[str]
    Params: ClassVar[type[StepParams]] = NoParams

    def __init__(self, params: StepParams | None = None):
        self.params = params if params is not None else self.Params()

    # -- vocabulary -------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of logits per row (may exceed the tokenizer's vocabulary: padding rows)."""

    @property
    @abstractmethod
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a row (finish reason ``stop``)."""

    @property
    def max_context(self) -> int | None:
        """Longest sequence (prompt + generated) the model supports; None if unbounded."""
        return None

    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Text to token ids; ``add_special`` adds BOS where the model expects one."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids to text (special tokens such as EOS are not rendered)."""

    def apply_chat_template(self, user_message: str) -> str:
        """Wrap a user message in the model's chat template; base models have none."""
        raise NotImplementedError(f"backend {self.name!r} has no chat template")

    # -- compute ----------------------------------------------------------------------
    @abstractmethod
    def prefill(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        """Start a new batch: run every prompt (different lengths allowed) through the model
        in one batched pass, fill the KV cache, and return the next-token logits per row."""

    @abstractmethod
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per current row (``[B]`` int64) and return ``[B, V]`` logits."""

    @abstractmethod
    def select_rows(self, keep: Sequence[int]) -> None:
        """Keep only these rows of the batch, in this order (repeats duplicate a row)."""
