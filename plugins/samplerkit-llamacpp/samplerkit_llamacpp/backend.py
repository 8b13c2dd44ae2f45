"""The ``llamacpp`` backend: a GGUF model on llama.cpp's kernels, every token chosen by samplerkit.

What: llama-cpp-python's low-level (ctypes) API. One llama.cpp context with a *unified* KV
cache (``kv_unified``: one pool of ``n_ctx`` cells that all sequences share) and one KV sequence
id per batch row. A prefill packs every prompt into ``llama_batch`` es of up to ``n_batch`` tokens
(each token tagged with its row's sequence id and position); a :meth:`~LlamaCppBackend.step`
decodes one token per row in a single ``llama_decode`` and reads each row's logits with
``llama_get_logits_ith``. :meth:`~LlamaCppBackend.select_rows` drops finished rows
(``llama_memory_seq_rm``) and duplicates rows for ``n`` samples with ``llama_memory_seq_cp``,
which in a unified cache only tags the shared cells with the new sequence id (no copy).

Why: llama.cpp's quantized CPU kernels are much faster than dequantized PyTorch on small
machines, and samplerkit's pipeline (any order, per-row seeds, plugins) then decides the tokens;
llama.cpp's own samplers are not used. llama_cpp is imported only when a backend is built.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from samplerkit.backend import Backend, PrefillOutput
from samplerkit.errors import GenerationError, ModelNotFoundError, SamplerkitError
from samplerkit.params import StepParams


class LlamaCppParams(StepParams):
    """Options of the ``llamacpp`` backend."""

    model: str | None = Field(
        None, description="Path to a GGUF file; null runs samplerkit's embedded SmolLM2-135M-Instruct GGUF.")
    n_ctx: int = Field(
        4096, gt=0, description="KV cache cells shared by all rows of a batch (llama.cpp's unified cache); "
                                "also the longest single sequence, capped at the model's training context.")
    n_seq: int = Field(16, ge=1, le=256, description="Most rows at once (KV sequence ids), n samples included.")
    n_batch: int = Field(512, ge=1, description="Most tokens per llama_decode call while prefilling.")
    n_threads: int | None = Field(None, gt=0, description="CPU threads for llama.cpp; null means one per core.")


def _lib():
    """The llama_cpp ctypes module, initialised once, with llama.cpp's logging silenced."""
    try:
        import llama_cpp.llama_cpp as lib
    except ImportError as exc:
        raise SamplerkitError("llamacpp backend: llama-cpp-python is not installed "
                              "(pip install llama-cpp-python)") from exc
    if not getattr(_lib, "ready", False):
        lib.llama_backend_init()
        if not os.environ.get("SAMPLERKIT_LLAMACPP_VERBOSE"):
            _lib.quiet = lib.llama_log_callback(lambda level, text, data: None)  # kept alive here
            lib.llama_log_set(_lib.quiet, ctypes.c_void_p(0))
        _lib.ready = True
    return lib


def _free(lib, batch, ctx, model) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)


class LlamaCppBackend(Backend):
    """A GGUF model run by llama.cpp (CPU), batched over KV sequences; see the module docstring.

    After :meth:`select_rows` row ``j`` is the old row ``keep[j]`` (repeats duplicate a row).
    """

    name = "llamacpp"
    Params = LlamaCppParams

    def __init__(self, params: LlamaCppParams | None = None):
        super().__init__(params)
        p: LlamaCppParams = self.params
        lib = self._lib = _lib()
        self.model_path = _model_path(p.model)
        model = lib.llama_model_load_from_file(str(self.model_path).encode(), lib.llama_model_default_params())
        if not model:
            raise ModelNotFoundError(f"llamacpp backend: llama.cpp could not load {self.model_path} (not a GGUF "
                                     "model it supports?)")
        self._max_context = min(p.n_ctx, lib.llama_model_n_ctx_train(model) or p.n_ctx)
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified, cp.no_perf = p.n_ctx, p.n_seq, True, True
        cp.n_batch = cp.n_ubatch = max(p.n_batch, p.n_seq)
        threads = p.n_threads or os.cpu_count() or 1
        cp.n_threads = cp.n_threads_batch = threads
        ctx = lib.llama_init_from_model(model, cp)
        if not ctx:
            lib.llama_model_free(model)
            raise SamplerkitError(f"llamacpp backend: llama.cpp could not create a context (n_ctx={p.n_ctx}, "
                                  f"n_seq={p.n_seq}); lower them")
        self._model, self._ctx, self._n_batch = model, ctx, int(cp.n_batch)
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        self._finalizer = weakref.finalize(self, _free, lib, self._batch, ctx, model)
        self._mem = lib.llama_get_memory(ctx)
        self._vocab = lib.llama_model_get_vocab(model)
        self._n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self._seqs: list[int] = []               # KV sequence id of each row
        self._pos: list[int] = []                # next position of each row

    # -- vocabulary -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Every end-of-generation id of the model (llama.cpp's ``is_eog``: EOS, EOT, ...)."""
        lib, vocab = self._lib, self._vocab
        return frozenset(i for i in range(self._n_vocab) if lib.llama_vocab_is_eog(vocab, i))

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """llama.cpp's tokenizer; special-token text (``<|im_start|>``) maps to its id."""
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            buf = (ctypes.c_int32 * size)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, size, add_special, True)
            if n >= 0:
                return list(buf[:n])
            size = -n
        raise SamplerkitError("llamacpp backend: tokenization failed")

    def detokenize(self, ids: Sequence[int]) -> str:
        """Control tokens (BOS, EOS, chat markers) are not rendered, as in the ``llama`` backend."""
        if not ids:
            return ""
        arr = (ctypes.c_int32 * len(ids))(*ids)
        size = 8 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self._vocab, arr, len(ids), buf, size, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n
        raise SamplerkitError("llamacpp backend: detokenization failed")

    @cached_property
    def _token_vocabulary(self):
        from samplerkit.backend import TokenVocabulary

        lib, vocab = self._lib, self._vocab
        tokens: list[bytes] = []
        special: list[int] = []
        buf = ctypes.create_string_buffer(256)
        for i in range(self._n_vocab):
            if lib.llama_vocab_is_control(vocab, i) or lib.llama_vocab_is_eog(vocab, i):
                tokens.append(b"")          # no text: never allowed inside a constraint
                special.append(i)
                continue
            n = lib.llama_token_to_piece(vocab, i, buf, len(buf), 0, False)
            if n < 0:
                raise SamplerkitError(f"llamacpp backend: token {i} has a piece longer than {len(buf)} bytes")
            tokens.append(buf.raw[:n])
        bos = int(lib.llama_vocab_bos(vocab))
        return TokenVocabulary(vocab_size=self._n_vocab, eos_token_ids=tuple(sorted(self.eos_token_ids)), tokens=tokens,
                               special_token_ids=tuple(special), bos_token_id=bos if bos >= 0 else None,
                               encode=lambda data: self.tokenize(data.decode("utf-8", errors="replace"), add_special=False))

    def token_vocabulary(self):
        """Each token's bytes as llama.cpp renders them (``llama_token_to_piece``), for constrained steps."""
        return self._token_vocabulary

    def apply_chat_template(self, user_message: str) -> str:
        """The GGUF's Jinja chat template, rendered as the ``llama`` backend does."""
        template = self._lib.llama_model_chat_template(self._model, None)
        if not template:
            return super().apply_chat_template(user_message)
        from samplerkit.builtins.backends.llama.tokenizer import Tokenizer

        def text(token: int) -> str:
            return (self._lib.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", "replace")

        bos, eos = self._lib.llama_vocab_bos(self._vocab), self._lib.llama_vocab_eos(self._vocab)
        renderer = Tokenizer(bos_id=None, eos_ids=(), add_bos=False, chat_template=template.decode("utf-8"),
                             bos_token=text(bos) if bos >= 0 else "", eos_token=text(eos) if eos >= 0 else "")
        return renderer.apply_chat_template(user_message)

    # -- compute ----------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        if len(prompts) > self.params.n_seq:
            raise GenerationError(f"llamacpp backend: {len(prompts)} rows but n_seq={self.params.n_seq}; "
                                  "raise backend.n_seq")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise GenerationError(f"llamacpp backend: prompt {i} has no tokens")
        self._lib.llama_memory_clear(self._mem, True)
        self._seqs, self._pos = list(range(len(prompts))), [len(p) for p in prompts]
        # (token, position, sequence, logits wanted) for every prompt token, rows one after another.
        work = [(int(tok), t, row, keep_all_logits or t == len(prompt) - 1)
                for row, prompt in enumerate(prompts) for t, tok in enumerate(prompt)]
        outputs: list[np.ndarray] = []
        for start in range(0, len(work), self._n_batch):
            outputs += self._decode(work[start:start + self._n_batch])
        if keep_all_logits:
            every, at = [], 0
            for prompt in prompts:
                every.append(torch.from_numpy(np.stack(outputs[at:at + len(prompt)])))
                at += len(prompt)
            last = torch.stack([rows[-1] for rows in every])
            return PrefillOutput(last=last, all=every)
        return PrefillOutput(last=torch.from_numpy(np.stack(outputs)))

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        ids = next_ids.tolist()
        if len(ids) != len(self._seqs):
            raise GenerationError(f"llamacpp backend: step got {len(ids)} tokens for {len(self._seqs)} rows")
        work = [(int(tok), self._pos[j], self._seqs[j], True) for j, tok in enumerate(ids)]
        logits = self._decode(work)
        self._pos = [p + 1 for p in self._pos]
        return torch.from_numpy(np.stack(logits))

    def select_rows(self, keep: Sequence[int]) -> None:
        lib, mem = self._lib, self._mem
        kept = {self._seqs[k] for k in keep}
        free = sorted(set(range(self.params.n_seq)) - kept)
        for seq in set(self._seqs) - kept:
            lib.llama_memory_seq_rm(mem, seq, -1, -1)
        seqs, used = [], set()
        for k in keep:
            seq = self._seqs[k]
            if seq in used:                      # a duplicate: share the cells under a new id
                if not free:
                    raise GenerationError(f"llamacpp backend: {len(keep)} rows but n_seq={self.params.n_seq}; "
                                          "raise backend.n_seq")
                new = free.pop(0)
                lib.llama_memory_seq_cp(mem, seq, new, -1, -1)
                seq = new
            used.add(seq)
            seqs.append(seq)
        self._seqs, self._pos = seqs, [self._pos[k] for k in keep]

    def _decode(self, work: Sequence[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """One ``llama_decode`` of ``(token, pos, seq, want_logits)`` entries; the wanted logits, in order."""
        lib, batch = self._lib, self._batch
        for i, (tok, pos, seq, want) in enumerate(work):
            if pos >= self._max_context:
                raise GenerationError(f"llamacpp backend: a row reached n_ctx={self._max_context} tokens; "
                                      "raise backend.n_ctx")
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        batch.n_tokens = len(work)
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:
            why = "the KV cache is full (raise backend.n_ctx)" if status == 1 else f"status {status}"
            raise GenerationError(f"llamacpp backend: llama_decode failed: {why}")
        return [np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, i), shape=(self._n_vocab,)).copy()
                for i, entry in enumerate(work) if entry[3]]


def _model_path(model: str | None) -> Path:
    if model is None:
        from samplerkit.builtins.backends.llama.default_model import find_default_model

        return find_default_model()
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"llamacpp backend: model not found: {path} (expected a .gguf file)")
    return path


__all__ = ["LlamaCppBackend", "LlamaCppParams"]
