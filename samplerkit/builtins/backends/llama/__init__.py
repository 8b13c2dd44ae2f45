"""The ``llama`` backend: a pure-PyTorch Llama-family decoder with a KV cache.

Loads GGUF files (4-bit and 8-bit matrices kept in the file's blocks on the CPU and multiplied by
samplerkit's compiled kernels, see :mod:`.blocks` and :mod:`.native`, or torch's int4 kernel, see
:mod:`.quant`; others dequantized at load; prepared once and cached, see :mod:`.cache`) and Hugging Face directories
(``config.json`` + safetensors); without a ``model`` it runs the embedded SmolLM2-135M-Instruct. Heavy libraries
(gguf, tokenizers, sentencepiece, jinja2) are imported only when a model is loaded.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from samplerkit.backend import Backend, PrefillOutput, resolve_device
from samplerkit.errors import ConfigError, ModelNotFoundError
from samplerkit.params import StepParams
from samplerkit.strict import TorchDevice

#: Cap on the KV cache when ``max_context`` is not given. The cache grows on demand (in chunks,
#: then doubling), so this bounds memory for runaway generations; it does not allocate it.
DEFAULT_MAX_CONTEXT = 8192

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LlamaParams(StepParams):
    """Options of the ``llama`` backend."""

    model: str | None = Field(
        None, description="Path to a GGUF file or a Hugging Face model directory (config.json + "
                          "*.safetensors); null runs the embedded SmolLM2-135M-Instruct.")
    device: TorchDevice = Field("cpu", description="Torch device to run on: 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Compute dtype of activations, the KV cache and every matrix not kept packed "
                               "(see weights). Logits are always returned as float32.")
    weights: Literal["auto", "blocks", "packed", "dequantize", "fp16"] = Field(
        "auto", description="How GGUF Q4_0/Q4_1/Q4_K/Q8_0 matrices are multiplied. 'blocks': from the file's "
                            "codes and scales by samplerkit's compiled AVX2 kernels (built on first use with "
                            "the system C compiler; float32 activations, each weight dequantized exactly: "
                            "the exact model's products up to float32 summation order, and the fastest form "
                            "on such CPUs, docs/performance.md). 'packed': from the "
                            "file's 4-bit codes with torch's int4 CPU kernel (about 4-7x fewer bytes per "
                            "token; activations rounded to bfloat16 for each product, like llama.cpp's "
                            "quantized dot products); 'dequantize': dequantized to dtype at load (the exact "
                            "model, e.g. to compare with transformers); 'fp16': dequantized exactly and "
                            "rounded once to float16, multiplied by fbgemm's float16 GEMM on the CPU (2 bytes "
                            "per weight, closer to the exact model than packed, faster than packed for "
                            "batches of 4 rows or more on AVX2, slower to start: docs/performance.md); "
                            "'auto': blocks where the compiled kernels load (an x86-64 CPU with AVX2, FMA "
                            "and F16C, and a C compiler); else packed on a CPU whose torch has the int4 "
                            "kernel, with the output matrix in float16 as 'fp16' has it where fbgemm's "
                            "float16 GEMM runs; dequantize where neither runs.")
    max_context: int | None = Field(
        None, gt=0, description=f"Longest sequence (prompt + generated tokens); null means the model's "
                                f"context length, capped at {DEFAULT_MAX_CONTEXT}. The KV cache grows on "
                                "demand up to this.")
    cache: bool | None = Field(
        None, description="Keep a GGUF model's prepared weights, config and tokenizer in the cache directory "
                          "($SAMPLERKIT_CACHE, else ~/.cache/samplerkit; keyed by the file's sha256 and these "
                          "options) so later starts skip parsing, dequantizing and packing. null: only when "
                          "the matrices stay packed (a dequantized float32 model is 4-8x its file's size on "
                          "disk); true/false: always/never.")
    batch_invariant: bool = Field(
        True, description="A row's logits are the same bits alone and at any position of any batch (seeded "
                          "rows then give the same tokens whatever the batch; see docs/cli.md). false: one "
                          "fused attention call over rows with different paddings (faster decode at batch > 1 "
                          "with prompts of different lengths, see docs/performance.md), and a row's tokens may "
                          "then depend on its batch.")
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
        blocks = _use_blocks(p.weights, device)
        keep_packed = blocks or _keep_packed(p.weights, device)
        fp16 = p.weights == "fp16"
        fp16_head = p.weights == "auto" and keep_packed and not blocks and _fp16_head_available(device)
        from samplerkit.builtins.backends.llama import cache
        from samplerkit.builtins.backends.llama.model import LlamaModel

        self.model_path = _model_path(p.model)
        entry = None
        use_cache = keep_packed if p.cache is None else p.cache
        if use_cache and self.model_path.is_file():   # GGUF files; HF directories load fast already
            entry = cache.entry_path(self.model_path, dtype=dtype, packed=keep_packed, fp16=fp16, fp16_head=fp16_head,
                                     blocks=blocks)
            cached = cache.load(entry)
            if cached is not None:
                config, self.tokenizer, tensors, layout = cached
                self.config = config
                self.model = LlamaModel.from_state(config, tensors, layout, device=device, dtype=dtype,
                                                   max_context=_max_context(p, config))
                self.model.batch_invariant = p.batch_invariant
                return
        config, weights, tokenizer = _load(self.model_path, dtype, progress, keep_packed)
        if tokenizer is None:
            raise ModelNotFoundError(f"{self.model_path}: no tokenizer (tokenizer.json or tokenizer.model)")
        self.config = config
        self.tokenizer = tokenizer
        self.model = LlamaModel(config, weights, device=device, dtype=dtype, max_context=_max_context(p, config),
                                fp16_weights=fp16, fp16_head=fp16_head, block_weights=blocks)
        self.model.batch_invariant = p.batch_invariant
        if entry is not None:
            cache.save(entry, config, tokenizer, self.model)

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

    def token_vocabulary(self):
        vocab = getattr(self, "_vocabulary", None)
        if vocab is None:       # the same object every call: engines cache their tokenizer by it
            vocab = self._vocabulary = self.tokenizer.token_vocabulary(self.vocab_size)
        return vocab

    def apply_chat_template(self, user_message: str) -> str:
        if not self.tokenizer.chat_template:
            return super().apply_chat_template(user_message)
        return self.tokenizer.apply_chat_template(user_message)

    # -- compute ----------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        last, every = self.model.prefill(prompts, keep_all_logits=keep_all_logits)
        return PrefillOutput(last=last, all=every)

    can_join = True
    join_is_atomic = True       # LlamaModel.join restores the running rows' cache if it raises

    def join(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        last, every = self.model.join(prompts, keep_all_logits=keep_all_logits)
        return PrefillOutput(last=last, all=every)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        return self.model.step(next_ids)

    def select_rows(self, keep: Sequence[int]) -> None:
        self.model.select_rows(keep)


def _use_blocks(mode: str, device: torch.device) -> bool:
    """Whether ``weights: mode`` runs the compiled kernels (:mod:`.blocks`): 'blocks' always (an
    error where they cannot load, rather than a silent fallback), 'auto' where they load."""
    if mode not in ("blocks", "auto"):
        return False
    from samplerkit.builtins.backends.llama import native

    if device.type == "cpu" and native.kernels() is not None:
        return True
    if mode == "blocks":
        why = f"device is {device}" if device.type != "cpu" else native.unavailable_reason()
        raise ConfigError(f"backend.weights: 'blocks' needs samplerkit's compiled CPU kernels, which are unavailable "
                          f"here ({why}); use weights: auto, packed or dequantize")
    if device.type == "cpu" and native.fixable():
        warnings.warn(f"llama backend: samplerkit's compiled CPU kernels are unavailable ({native.unavailable_reason()}); "
                      "weights: auto runs torch's int4 kernel instead, about 3x slower per token "
                      "(docs/performance.md). Install a C compiler (gcc or clang) or set CC to use them.",
                      UserWarning, stacklevel=3)
    return False


def _keep_packed(mode: str, device: torch.device) -> bool:
    """Resolve ``weights: auto|packed|dequantize`` for ``device``; 'packed' where it cannot run is
    an error rather than a silent fallback."""
    if mode == "dequantize":
        return False
    from samplerkit.builtins.backends.llama.quant import int4_kernel_available

    if mode == "fp16":
        if not _fp16_head_available(device):
            why = (f"device is {device}" if device.type != "cpu"
                   else f"torch {torch.__version__} has no usable fbgemm float16 GEMM (quantized.linear_dynamic_fp16)")
            raise ConfigError(f"backend.weights: 'fp16' runs only on the CPU with fbgemm's float16 GEMM ({why}); "
                              "use weights: packed, dequantize or auto")
        return True     # the file's blocks stay as they are until each matrix is dequantized and rounded

    possible = device.type == "cpu" and int4_kernel_available()
    if mode == "packed" and not possible:
        why = (f"device is {device}" if device.type != "cpu"
               else f"torch {torch.__version__} has no int4 CPU kernel (needs torch >= 2.5)")
        raise ConfigError(f"backend.weights: 'packed' runs only on the CPU with torch's int4 kernel ({why}); "
                          "use weights: dequantize or auto")
    return possible


def _fp16_head_available(device: torch.device) -> bool:
    """Whether fbgemm's float16 GEMM runs here (``weights: fp16``; ``auto``'s output matrix)."""
    from samplerkit.builtins.backends.llama.quant import fp16_kernel_available

    return device.type == "cpu" and fp16_kernel_available()


def _max_context(p: LlamaParams, config) -> int:
    return p.max_context or min(config.max_position, DEFAULT_MAX_CONTEXT)


def _model_path(model: str | None) -> Path:
    """The GGUF file or HF directory to load: ``model``, or the verified default."""
    if model is None:
        from samplerkit.builtins.backends.llama.default_model import find_default_model

        return find_default_model()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"llama backend: model not found: {path} (expected a .gguf file or a "
                                 "Hugging Face model directory)")
    return path


def _load(path: Path, dtype: torch.dtype, progress, keep_packed: bool = False):
    """(config, canonical weights, tokenizer) of a GGUF file or an HF directory."""
    from samplerkit.builtins.backends.llama import gguf_loader, hf_loader

    if path.is_dir():
        return hf_loader.load_hf_dir(path, dtype)
    return gguf_loader.load_gguf(path, dtype, progress, keep_packed=keep_packed)


__all__ = ["DEFAULT_MAX_CONTEXT", "LlamaBackend", "LlamaParams"]
