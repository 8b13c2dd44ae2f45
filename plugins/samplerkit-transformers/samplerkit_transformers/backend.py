"""The ``transformers`` backend: any local ``AutoModelForCausalLM`` directory as a samplerkit backend.

What: batched prefill of prompts of different lengths (left padding, an attention mask and
position ids that skip the padding), one token per row per :meth:`~TransformersBackend.step`
through the model's own KV cache (the ``cache`` argument, ``past_key_values`` before
transformers 5.24), and :meth:`~TransformersBackend.select_rows`
reordering the cache's batch dimension so finished rows cost nothing and ``n`` samples share
one prefill.

Why here and not in core: samplerkit's core must not depend on transformers. This module
imports it only when a backend is built (the registry imports this module to list the class).
Nothing is downloaded: model and tokenizer load with ``local_files_only=True``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from samplerkit.backend import Backend, PrefillOutput, resolve_device
from samplerkit.errors import GenerationError, ModelNotFoundError, SamplerkitError
from samplerkit.params import StepParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TransformersParams(StepParams):
    """Options of the ``transformers`` backend."""

    model: str = Field(..., min_length=1, description="Path to a local Hugging Face model directory "
                                                      "(config.json, weights, tokenizer files); never downloaded.")
    device: str = Field("cpu", description="Torch device to run on: 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype the weights are loaded in. Logits are always returned as float32.")
    max_context: int | None = Field(
        None, gt=0, description="Longest sequence (prompt + generated tokens); null means the model's "
                                "max_position_embeddings (unbounded when the config has none).")


class TransformersBackend(Backend):
    """A transformers causal LM with its KV cache, tokenizer and chat template.

    After :meth:`select_rows` row ``j`` is the old row ``keep[j]`` (repeats duplicate a row), in the
    cache, the attention mask and the position counters alike.
    """

    name = "transformers"
    Params = TransformersParams

    def __init__(self, params: TransformersParams | None = None):
        if params is None:
            raise SamplerkitError("transformers backend: `model` (a local model directory) is required")
        super().__init__(params)
        p: TransformersParams = self.params
        path = Path(p.model).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"transformers backend: no model directory at {path} (expected config.json "
                                     "and weights; models are never downloaded)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(p.device, "transformers")
        self.model_path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[p.dtype], local_files_only=True)
        self.model.to(self.device).eval()
        self._eos = model_eos_ids(self.model, self.tokenizer)
        text_config = self.model.config.get_text_config()
        self._max_context = p.max_context or getattr(text_config, "max_position_embeddings", None)
        head = self.model.get_output_embeddings()
        self._vocab = int(head.weight.shape[0]) if head is not None else int(text_config.vocab_size)
        pad = self.tokenizer.pad_token_id
        # Any valid id works: padded positions are masked out and never attended to.
        self._pad_id = int(pad if pad is not None else min(self._eos, default=0))
        self._bos_id = self.tokenizer.bos_token_id
        # Most models accept `logits_to_keep`; with it a prefill computes one row of logits, not L.
        accepted = inspect.signature(self.model.forward).parameters
        self._can_keep_last = "logits_to_keep" in accepted
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, then goes).
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._cache: Any = None
        self._mask: torch.Tensor | None = None       # [B, L] int64, 0 on left padding
        self._next_pos: torch.Tensor | None = None   # [B] int64, position id of each row's next token

    # -- vocabulary -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=add_special))
        # A chat template that writes BOS itself plus the tokenizer's BOS would give two.
        if add_special and self._bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == self._bos_id:
            ids = ids[1:]
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_vocabulary(self):
        """The fast tokenizer's JSON (what llguidance reads), for constrained steps."""
        if getattr(self, "_vocabulary", None) is None:
            import copy

            from samplerkit.backend import TokenVocabulary

            fast = getattr(self.tokenizer, "backend_tokenizer", None)
            if fast is None:
                raise GenerationError(f"transformers backend: {type(self.tokenizer).__name__} is a slow (Python) "
                                      "tokenizer; constrained steps need a fast one (tokenizer.json)")
            fast = copy.copy(fast)          # padding and truncation off, on a copy
            fast.no_padding()
            fast.no_truncation()
            self._vocabulary = TokenVocabulary(vocab_size=self.vocab_size, eos_token_ids=tuple(sorted(self._eos)),
                                               hf_tokenizer_json=fast.to_str(), bos_token_id=self._bos_id)
        return self._vocabulary

    def apply_chat_template(self, messages) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return super().apply_chat_template(messages)
        if isinstance(messages, str):          # one user turn
            messages = [{"role": "user", "content": messages}]
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    # -- compute ----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        lengths = [len(p) for p in prompts]
        if not lengths or min(lengths) == 0:
            raise SamplerkitError("transformers backend: prefill needs at least one token in every prompt")
        width = max(lengths)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.int64)
        mask = torch.zeros((len(prompts), width), dtype=torch.int64)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.int64)
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # As transformers' generate: positions count real tokens only, so a padded row sees the
        # same positions as the prompt alone (pads get 0; they are masked anyway).
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        extra = {"logits_to_keep": 1} if self._can_keep_last and not keep_all_logits else {}
        # No cache is passed: the model builds the one its config needs (sliding window, ...).
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        self._cache, self._mask = _cache_of(out), mask
        self._next_pos = torch.as_tensor(lengths, dtype=torch.int64, device=self.device)
        logits = out.logits
        every = [logits[i, width - n:].float() for i, n in enumerate(lengths)] if keep_all_logits else None
        return PrefillOutput(last=logits[:, -1].float(), all=every)

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        if self._cache is None:
            raise SamplerkitError("transformers backend: step() before prefill()")
        rows = self._mask.shape[0]
        mask = torch.cat([self._mask, self._mask.new_ones(rows, 1)], dim=1)
        extra = {"logits_to_keep": 1} if self._can_keep_last else {}
        out = self.model(input_ids=next_ids.to(self.device, torch.int64).view(rows, 1), attention_mask=mask,
                         position_ids=self._next_pos.view(rows, 1), use_cache=True,
                         **{self._cache_arg: self._cache}, **extra)
        self._cache, self._mask = _cache_of(out), mask
        self._next_pos = self._next_pos + 1
        return out.logits[:, -1].float()

    def select_rows(self, keep: Sequence[int]) -> None:
        if self._cache is None:
            return
        index = torch.as_tensor(list(keep), dtype=torch.int64, device=self.device)
        self._cache = select_cache_rows(self._cache, index)
        self._mask = self._mask.index_select(0, index)
        self._next_pos = self._next_pos.index_select(0, index)


def select_cache_rows(cache: Any, index: torch.Tensor) -> Any:
    """``cache`` with batch rows ``index`` (repeats duplicate a row); returns the cache to use.

    ``Cache.reorder_cache`` first: beam search needs it, so every transformers cache type
    implements it (attention, sliding-window, linear-attention and quantized layers) with
    ``index_select``, which also takes a different length and repeated indices.
    ``batch_select_indices`` next, then the legacy tuple-of-tensors format.
    """
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
        return cache
    if isinstance(cache, torch.Tensor):
        return cache.index_select(0, index.to(cache.device))
    if isinstance(cache, (tuple, list)):
        return type(cache)(select_cache_rows(part, index) for part in cache)
    raise SamplerkitError(f"transformers backend: cannot select rows of a {type(cache).__name__} cache")


def _cache_of(output: Any) -> Any:
    """The KV cache a forward pass returned (``cache``, or ``past_key_values`` before 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def model_eos_ids(model: Any, tokenizer: Any = None) -> frozenset[int]:
    """End-of-sequence ids of a model: its generation config's and its config's (chat models
    often list several, e.g. Llama 3's ``<|eot_id|>``), else the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config.get_text_config()):
        ids |= set(_as_ids(getattr(source, "eos_token_id", None)))
    if not ids and tokenizer is not None:
        ids |= set(_as_ids(tokenizer.eos_token_id))
    return frozenset(ids)


def _as_ids(value: int | Iterable[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


__all__ = ["TransformersBackend", "TransformersParams", "model_eos_ids", "select_cache_rows"]
