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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from samplerkit.errors import GenerationError, PluginError, SamplerkitError
from samplerkit.params import NoParams, StepParams


def resolve_device(device: str, backend_name: str) -> torch.device:
    """``torch.device(device)``, with a clear error for a malformed name or missing CUDA."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise SamplerkitError(f"{backend_name} backend: invalid device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SamplerkitError(f"{backend_name} backend: device {device!r} requested but CUDA is not available")
    return dev


@dataclass(frozen=True, eq=False)
class TokenVocabulary:
    """What a constraint engine needs to know about a backend's tokenizer: the bytes of every
    token. The structured-output steps (:mod:`samplerkit.builtins.structured`) build their
    token masks from it; backends describe their tokenizer here and import no engine.

    ``vocab_size``: the logits' width (ids from ``len(tokens)`` up to it are never allowed).
    ``tokens``: the UTF-8 bytes each id stands for (byte-level BPE and sentencepiece pieces
    decoded to bytes; ``b""`` for ids that are no text), unless ``hf_tokenizer_json`` is given.
    ``hf_tokenizer_json``: a serialised HF ``tokenizers`` tokenizer (``Tokenizer.to_str()``), which
    the engine reads directly (it knows byte-level and metaspace vocabularies). ``eos_token_ids``:
    the ids that end a row, allowed where the constraint is complete. ``special_token_ids``: ids
    that are never text (BOS, chat markers): a constraint never allows them.
    ``encode``: text bytes to ids (the engine tokenizes text the grammar forces); required with
    ``tokens``.
    """

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tokens: Sequence[bytes] = ()
    special_token_ids: tuple[int, ...] = ()
    hf_tokenizer_json: str | None = None
    encode: Callable[[bytes], list[int]] | None = None
    bos_token_id: int | None = None


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

    def apply_chat_template(self, messages: str | Sequence[Mapping[str, Any]]) -> str:
        """Render a conversation (``[{"role": "system" | "user" | "assistant", "content": str}, ...]``;
        a string is one user turn) through the model's chat template, ending where the
        assistant's reply starts. Base models have none: the default raises
        :class:`~samplerkit.errors.GenerationError` (the CLI exits 2). Templates from model files
        should be rendered with :class:`samplerkit.chat_template.ChatTemplate` (sandboxed, bounded)."""
        raise GenerationError(f"backend {self.name!r} has no chat template; run without chat (--chat) or use a "
                              "model that ships one")

    def token_vocabulary(self) -> TokenVocabulary:
        """The tokenizer as bytes per token (:class:`TokenVocabulary`), for constrained decoding
        (``json_schema``, ``regex``, ``grammar``, ``choice``). Optional: the default raises
        :class:`~samplerkit.errors.GenerationError`; backends that can describe their tokenizer
        override it (and should return the same object on every call: engines cache by it)."""
        raise GenerationError(_no_vocabulary(f"backend {self.name!r}"))

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

    #: Whether :meth:`join` is implemented. Without it, an :class:`~samplerkit.engine.Engine`
    #: adds rows to a running batch by prefilling every row's whole sequence again.
    can_join: ClassVar[bool] = False
    #: Whether a :meth:`join` that raises leaves the running rows exactly as they were (their
    #: count and their cache). Then an :class:`~samplerkit.engine.Engine` fails only the requests
    #: that were joining and the running ones go on; otherwise every running request ends too.
    join_is_atomic: ClassVar[bool] = False

    def join(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        """Prefill ``prompts`` and append them as new rows after the current ones (continuous
        batching): the running rows keep their cache, and the next :meth:`step` takes one token
        for every row, old and new. Returns the new rows' logits as :meth:`prefill` does. On an
        empty batch it is :meth:`prefill`. Backends that implement it set ``can_join = True``."""
        raise NotImplementedError(f"backend {self.name!r} cannot add rows to a running batch (no join())")


def _no_vocabulary(who: str) -> str:
    return (f"{who} does not describe its tokenizer (Backend.token_vocabulary), which the constrained steps "
            "(json_schema, json_object, regex, grammar, choice) need; use the llama, transformers or llamacpp "
            "backend, or implement token_vocabulary() in this backend")


def backend_label(cls: type, plugin: str | None = None) -> str:
    """``backend 'name' (module.Class, distribution dist)`` for messages that blame a backend.

    The distribution is ``plugin`` when the registry knows it, else looked up from the class's
    top-level module (``importlib.metadata.packages_distributions``)."""
    name = getattr(cls, "name", cls.__name__)
    dist = plugin
    if not dist:
        import importlib.metadata

        top = cls.__module__.split(".")[0]
        dist = ", ".join(importlib.metadata.packages_distributions().get(top, [])) or f"module {top}"
    return f"backend {name!r} ({cls.__module__}.{cls.__qualname__}, distribution {dist})"


class CheckedBackend:
    """A backend whose every output the decode loop relies on is checked at the boundary.

    Wraps any :class:`Backend` (attributes pass through). A backend that returns logits whose
    width is not ``vocab_size``, a batch of the wrong size, something that is not a float tensor,
    a prefill result that is not a :class:`PrefillOutput`, ``eos_token_ids`` that are not a
    collection of ints, NaN logits (with ``check_nan``), or that raises anything but a
    :class:`~samplerkit.errors.SamplerkitError`, is reported as a
    :class:`~samplerkit.errors.PluginError` naming the backend and its distribution, instead of
    an obscure failure later in the pipeline. The checks cost one reduction per step.
    """

    def __init__(self, backend: Backend, *, plugin: str | None = None, check_nan: bool = True):
        self.inner = backend
        self._plugin = plugin
        self.check_nan = check_nan
        self._rows = 0
        self._label: str | None = None
        #: Set by a failed :meth:`join`: True when the backend's own join raised and it declares
        #: ``join_is_atomic`` (the running rows are intact), False for any other failure.
        self.join_kept_rows = False

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    @property
    def label(self) -> str:
        if self._label is None:
            self._label = backend_label(type(self.inner), self._plugin)
        return self._label

    def _fail(self, what: str) -> None:
        raise PluginError(f"{self.label} {what}")

    def _attr(self, name: str):
        try:
            return getattr(self.inner, name)
        except SamplerkitError:
            raise
        except Exception as exc:
            self._fail(f"failed reading {name}: {type(exc).__name__}: {exc}")

    def _call(self, method: str, *args, **kwargs):
        try:
            return getattr(self.inner, method)(*args, **kwargs)
        except (SamplerkitError, NotImplementedError):      # NotImplementedError: "no chat template" (old protocol)
            raise
        except Exception as exc:
            self._fail(f"failed in {method}(): {type(exc).__name__}: {exc}")

    @property
    def vocab_size(self) -> int:
        v = self._attr("vocab_size")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            self._fail(f"has vocab_size {v!r:.60}; it must be a positive int")
        return v

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = self._attr("eos_token_ids")
        if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Collection):
            self._fail(f"has eos_token_ids {ids!r:.60} ({type(ids).__name__}); it must be a collection of ints "
                       "(e.g. frozenset({2}))")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            self._fail(f"has eos_token_ids {sorted(map(repr, ids))[:8]}: every id must be an int")
        return frozenset(ids)

    @property
    def max_context(self) -> int | None:
        m = self._attr("max_context")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            self._fail(f"has max_context {m!r:.60}; it must be a positive int or None")
        return m

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        ids = self._call("tokenize", text, add_special=add_special)
        if not isinstance(ids, Sequence) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            self._fail(f"tokenize() returned {type(ids).__name__}, not a list of int token ids")
        vocab = self.vocab_size
        if bad := [i for i in ids if not 0 <= i < vocab]:
            self._fail(f"tokenize() returned ids outside [0, vocab_size={vocab}): {bad[:5]}")
        return list(ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        text = self._call("detokenize", ids)
        if not isinstance(text, str):
            self._fail(f"detokenize() returned {type(text).__name__}, not str")
        return text

    def apply_chat_template(self, messages) -> str:
        return self._call("apply_chat_template", messages)

    def token_vocabulary(self) -> TokenVocabulary:
        method = getattr(self.inner, "token_vocabulary", None)
        if method is None:             # a duck-typed backend that does not derive from Backend
            raise GenerationError(_no_vocabulary(self.label))
        vocab = self._call("token_vocabulary")
        if not isinstance(vocab, TokenVocabulary):
            self._fail(f"token_vocabulary() returned {type(vocab).__name__}; it must return a samplerkit.backend.TokenVocabulary")
        return vocab

    def _check_logits(self, logits: Any, rows: int, method: str) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor):
            self._fail(f"{method}() returned {type(logits).__name__}; expected a [B, V] float tensor")
        vocab = self.vocab_size
        if logits.dim() != 2 or logits.shape[0] != rows or logits.shape[1] != vocab:
            self._fail(f"{method}() returned logits of shape {tuple(logits.shape)}; expected [{rows}, {vocab}] "
                       f"(one row per {'prompt' if method == 'prefill' else 'running row'}, vocab_size columns)")
        if not logits.is_floating_point():
            self._fail(f"{method}() returned {logits.dtype} logits; expected a float tensor")
        if self.check_nan and bool(torch.isnan(logits).any()):
            bad = torch.isnan(logits).any(-1).nonzero().squeeze(-1).tolist()
            self._fail(f"{method}() returned NaN logits in row(s) {bad[:8]} (the model's output is broken: "
                       "weights, dtype overflow or a kernel bug)")
        return logits

    def prefill(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        out = self._check_prefill_output("prefill", prompts, keep_all_logits,
                                         self._call("prefill", prompts, keep_all_logits=keep_all_logits))
        self._rows = len(prompts)
        return out

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        return self._check_logits(self._call("step", next_ids), int(next_ids.shape[0]), "step")

    def select_rows(self, keep: Sequence[int]) -> None:
        self._call("select_rows", keep)
        self._rows = len(keep)

    @property
    def can_join(self) -> bool:
        return getattr(self.inner, "can_join", False) is True

    def join(self, prompts: Sequence[Sequence[int]], *, keep_all_logits: bool = False) -> PrefillOutput:
        self.join_kept_rows = False
        try:
            out = self._call("join", prompts, keep_all_logits=keep_all_logits)
        except BaseException:
            self.join_kept_rows = getattr(self.inner, "join_is_atomic", False) is True
            raise
        out = self._check_prefill_output("join", prompts, keep_all_logits, out)   # a bad output: rows unknown
        self._rows += len(prompts)
        return out

    def _check_prefill_output(self, method: str, prompts: Sequence[Sequence[int]], keep_all_logits: bool,
                              out: object) -> PrefillOutput:
        """Check what ``prefill`` or ``join`` returned (``out``): a PrefillOutput whose ``last``
        has one row per prompt and, when asked for, one ``[L_i, V]`` tensor per prompt."""
        if not isinstance(out, PrefillOutput):
            self._fail(f"{method}() returned {type(out).__name__}; it must return a samplerkit.PrefillOutput")
        self._check_logits(out.last, len(prompts), method)
        if keep_all_logits:
            if not isinstance(out.all, Sequence) or len(out.all) != len(prompts):
                self._fail(f"{method}(keep_all_logits=True) returned PrefillOutput.all={type(out.all).__name__}; "
                           f"expected a list of {len(prompts)} [L_i, V] tensors")
            for p, t in zip(prompts, out.all):
                self._check_logits(t, len(p), f"{method} (all positions)")
        return out


__all__ = ["Backend", "CheckedBackend", "PrefillOutput", "TokenVocabulary", "backend_label", "resolve_device"]
