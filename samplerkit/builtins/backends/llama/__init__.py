"""The ``llama`` backend: a pure-PyTorch Llama-family decoder with a KV cache.

Loads GGUF files (dequantized at load) and Hugging Face directories (``config.json`` +
safetensors); without a ``model`` it runs the embedded SmolLM2-135M-Instruct. Heavy libraries
(gguf, tokenizers, sentencepiece, jinja2) are imported only when a model is loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from samplerkit.backend import Backend, PrefillOutput, resolve_device
from samplerkit.errors import ModelNotFoundError
from samplerkit.params import StepParams

#: Cap on the KV cache when ``max_context`` is not given. The cache grows on demand (in chunks,
#: then doubling), so this bounds memory for runaway generations; it does not allocate it.
DEFAULT_MAX_CONTEXT = 8192

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LlamaParams(StepParams):
    """Options of the ``llama`` backend."""

    model: str | None = Field(
        None, description="Path to a GGUF file or a Hugging Face model directory (config.json + "
                          "*.safetensors); null runs the embedded SmolLM2-135M-Instruct.")
    device: str = Field("cpu", description="Torch device to run on: 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Compute dtype; quantized weights are dequantized to it at load. "
                               "Logits are always returned as float32.")
    max_context: int | None = Field(
        None, gt=0, description=f"Longest sequence (prompt + generated tokens); null means the model's "
                                f"context length, capped at {DEFAULT_MAX_CONTEXT}. The KV cache grows on "
                                "demand up to this.")
    threads: int | None = Field(
        None, gt=0, description="CPU threads for torch (torch.set_num_threads, process-wide); null "
                                "keeps torch's default (one per core).")


def _default_progress() -> Callable[[int, int], None] | None:
    """A tqdm bar on an interactive stderr, nothing when piped or ``SAMPLERKIT_QUIET=1``."""
    if os.environ.get("SAMPLERKIT_QUIET") == "1" or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="loading weights", unit="tensor", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


class LlamaBackend(Backend):
    """Llama-family decoder (SmolLM2, Llama 1-3, Mistral-style GQA models) in plain PyTorch.

    ``progress(done, total)`` is called while weights are loaded; by default a tqdm bar is shown
    when stderr is a terminal.
    """

    name = "llama"
    Params = LlamaParams

    def __init__(self, params: LlamaParams | None = None, *,
                 progress: Callable[[int, int], None] | None = None):
        super().__init__(params)
        p: LlamaParams = self.params
        if p.threads is not None:
            torch.set_num_threads(p.threads)
        device = resolve_device(p.device, "llama")
        dtype = _DTYPES[p.dtype]
        if progress is None:
            progress = _default_progress()
        self.model_path, config, weights, tokenizer = _load(p.model, dtype, progress)
        if tokenizer is None:
            raise ModelNotFoundError(f"{self.model_path}: no tokenizer (tokenizer.json or tokenizer.model)")
        from samplerkit.builtins.backends.llama.model import LlamaModel

        max_context = p.max_context or min(config.max_position, DEFAULT_MAX_CONTEXT)
        self.config = config
        self.tokenizer = tokenizer
        self.model = LlamaModel(config, weights, device=device, dtype=dtype, max_context=max_context)

    # -- vocabulary -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.tokenizer.eos_ids

    @property
    def max_context(self) -> int | None:
        return self.model.max_context

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, user_message: str) -> str:
        if not self.tokenizer.chat_template:
            return super().apply_chat_template(user_message)
        return self.tokenizer.apply_chat_template(user_message)

    # -- compute ----------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        last, every = self.model.prefill(prompts, keep_all_logits=keep_all_logits)
        return PrefillOutput(last=last, all=every)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        return self.model.step(next_ids)

    def select_rows(self, keep: Sequence[int]) -> None:
        self.model.select_rows(keep)


def _load(model: str | None, dtype: torch.dtype, progress):
    """(path, config, canonical weights, tokenizer) for a GGUF file, an HF directory or the default."""
    from samplerkit.builtins.backends.llama import gguf_loader, hf_loader

    if model is None:
        from samplerkit.builtins.backends.llama.default_model import find_default_model

        path = find_default_model()
    else:
        path = Path(model).expanduser()
    if path.is_dir():
        return (path, *hf_loader.load_hf_dir(path, dtype))
    if not path.exists():
        raise ModelNotFoundError(f"llama backend: model not found: {path} (expected a .gguf file or a "
                                 "Hugging Face model directory)")
    return (path, *gguf_loader.load_gguf(path, dtype, progress))


__all__ = ["DEFAULT_MAX_CONTEXT", "LlamaBackend", "LlamaParams"]
