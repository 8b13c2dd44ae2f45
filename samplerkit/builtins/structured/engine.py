"""The bridge to llguidance: grammars from schemas, regexes and Lark/GBNF text, the engine's
tokenizer from a backend's :class:`~samplerkit.backend.TokenVocabulary`, and token masks.

llguidance (the extra ``structured``) is imported only here and only when a constrained step
is configured or run. Everything costly is cached: a grammar's validation by its content hash,
the engine tokenizer by the vocabulary object, and a compiled matcher by (tokenizer, grammar
hash), so a schema seen before costs one ``deep_copy`` of its matcher.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch

from samplerkit.errors import GenerationError

EXTRA_HINT = "pip install 'samplerkit[structured]'"

#: Compiled matchers kept (least recently used first out).
MATCHER_CACHE_SIZE = 256

_lock = threading.Lock()
_validated: OrderedDict[str, str] = OrderedDict()             # grammar hash -> "" or the engine's error
_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # TokenVocabulary -> LLTokenizer
_matchers: OrderedDict[tuple[int, str], Any] = OrderedDict()    # (EngineTokenizer.key, grammar hash) -> LLMatcher
_serial = itertools.count()
_executor: Any = None


def llguidance():
    """The llguidance module, or an ImportError naming the extra to install."""
    try:
        # Not llguidance.torch: importing it compiles a kernel with torch.compile (about 10 s
        # here); fill_masks calls the same two engine entry points it wraps.
        import llguidance as llg
    except ImportError as exc:
        raise ImportError(f"constrained decoding (json_schema, json_object, regex, grammar, choice) needs the "
                          f"llguidance package: {EXTRA_HINT} ({exc})") from None
    return llg


def grammar_hash(grammar: str) -> str:
    return hashlib.sha256(grammar.encode("utf-8")).hexdigest()


def build_grammar(kind: str, source: Any, options: dict[str, Any] | None = None) -> str:
    """The llguidance grammar of a JSON schema (a dict), a regex, a Lark or GBNF grammar or a list
    of choices; a ``ValueError`` with the engine's reason when it is invalid. Validation (the
    costly part) is cached by the grammar's content hash."""
    llg = llguidance()
    try:
        if kind == "json_schema":
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(source),
                                                             overrides=options or None)
        elif kind == "choice":
            grammar = llg.grammar_from("choice", list(source))
        else:
            grammar = llg.grammar_from(kind, source)
    except Exception as exc:     # GBNF that does not convert to Lark, a schema that is not an object
        raise ValueError(str(exc) or type(exc).__name__) from None
    key = grammar_hash(grammar)
    with _lock:
        error = _validated.get(key)
    if error is None:
        error = llg.LLMatcher.validate_grammar(grammar)
        with _lock:
            _validated[key] = error
            while len(_validated) > 4 * MATCHER_CACHE_SIZE:
                _validated.popitem(last=False)
    if error and not error.startswith("WARNING"):
        raise ValueError(error.strip())
    return grammar


class EngineTokenizer:
    """An llguidance ``LLTokenizer`` (``.llg``) with a key no later tokenizer reuses (``id()`` can be:
    compiled matchers are cached under it)."""

    __slots__ = ("key", "llg")

    def __init__(self, llg_tokenizer: Any):
        self.llg = llg_tokenizer
        self.key = next(_serial)


def engine_tokenizer(vocab) -> EngineTokenizer:
    """The engine's tokenizer for a :class:`~samplerkit.backend.TokenVocabulary` (built once per object)."""
    with _lock:
        tok = _tokenizers.get(vocab)
    if tok is not None:
        return tok
    llg = llguidance()
    if not vocab.eos_token_ids:
        raise GenerationError("the backend's token vocabulary names no EOS token; constrained steps need one to end "
                              "a row whose constraint is complete")
    eos = list(vocab.eos_token_ids)
    if vocab.hf_tokenizer_json is None and vocab.encode is None:
        raise GenerationError("the backend's token vocabulary has neither hf_tokenizer_json nor encode; constrained "
                              "steps need one of them (the engine tokenizes text the grammar forces)")
    if vocab.hf_tokenizer_json is not None:
        built = llg.LLTokenizer(vocab.hf_tokenizer_json, n_vocab=vocab.vocab_size, eos_token=eos)
    else:
        built = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped(vocab)), n_vocab=vocab.vocab_size, eos_token=eos)
    tok = EngineTokenizer(built)
    with _lock:
        _tokenizers[vocab] = tok
    return tok


class _Wrapped:
    """The attributes llguidance's ``TokenizerWrapper`` reads, from a TokenVocabulary."""

    def __init__(self, vocab):
        self.eos_token_id = vocab.eos_token_ids[0]
        self.bos_token_id = vocab.bos_token_id
        self.tokens = list(vocab.tokens)
        self.special_token_ids = list(vocab.special_token_ids)
        self._encode = vocab.encode

    def __call__(self, data: bytes) -> list[int]:
        return self._encode(data)


def new_matcher(tokenizer: EngineTokenizer, grammar: str) -> Any:
    """A fresh matcher for ``grammar`` at its start state: compiled once per (tokenizer, grammar),
    then copied."""
    llg = llguidance()
    key = (tokenizer.key, grammar_hash(grammar))
    with _lock:
        template = _matchers.get(key)
        if template is not None:
            _matchers.move_to_end(key)
    if template is None:
        template = llg.LLMatcher(tokenizer.llg, grammar, log_level=0)
        if template.is_error():
            raise GenerationError(f"the constraint could not be compiled for this tokenizer: {template.get_error()}")
        with _lock:
            _matchers[key] = template
            while len(_matchers) > MATCHER_CACHE_SIZE:
                _matchers.popitem(last=False)
    return template.deep_copy()


def clear_caches() -> None:
    """Forget every cached grammar validation and compiled matcher (benchmarks time a cold compile)."""
    with _lock:
        _validated.clear()
        _matchers.clear()


def fill_masks(matchers: list[tuple[Any, int]], bitmask: torch.Tensor) -> None:
    """Write each ``(matcher, row)``'s allowed-token bits into ``bitmask[row]`` (``[B, ceil(V/32)]``
    int32, bit ``i % 32`` of word ``i // 32`` is token ``i``), in parallel across rows."""
    global _executor
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ValueError("the bitmask must be a contiguous int32 CPU tensor")
    row_bytes = bitmask.shape[1] * 4
    if len(matchers) == 1:
        matcher, row = matchers[0]
        matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), row_bytes)
        return
    if _executor is None:
        _executor = llguidance().LLExecutor()
    _executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), row_bytes, bitmask.shape[0])


_BIT_VALUES: dict[torch.device, torch.Tensor] = {}


def _bit_values(device: torch.device) -> torch.Tensor:
    """``[256, 8]`` float32: ``table[b, j]`` is 0 when bit ``j`` of byte ``b`` is set, else -inf."""
    table = _BIT_VALUES.get(device)
    if table is None:
        byte = torch.arange(256, dtype=torch.int32).unsqueeze(1)
        bits = ((byte >> torch.arange(8, dtype=torch.int32)) & 1).bool()
        table = _BIT_VALUES[device] = torch.where(bits, 0.0, float("-inf")).to(torch.float32).to(device)
    return table


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None,
                  work: dict | None = None) -> torch.Tensor:
    """``logits[r, i] = -inf`` where bit ``i`` of ``bitmask[r]`` is 0 (in place), for the rows
    ``rows`` (``None``: all). ``bitmask`` has one row per row of ``logits``; ``work`` keeps the
    ``[R, V]`` scratch buffer from call to call.

    The words are read as little-endian bytes (token ``8k + j`` is bit ``j`` of byte ``k``), each
    byte looked up in a table of eight additive values (0 or -inf), and the result added to the
    logits: ``x + 0 = x``, ``x - inf = -inf``. An add is vectorised where a bool ``masked_fill_``
    is not: 0.3 ms instead of 10-27 ms at ``[8, 49152]`` on the 2-core EPYC
    (benchmarks/bench_structured.py)."""
    vocab = logits.shape[-1]
    if rows is not None:
        bitmask = bitmask.index_select(0, rows.to(bitmask.device))
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    count = bitmask.shape[0]
    index = bitmask.contiguous().view(torch.uint8).view(-1).int()
    table = _bit_values(logits.device)
    shape = (index.shape[0], 8)
    out = None if work is None else work.get("mask")
    if out is None or out.shape != shape or out.device != logits.device:
        out = torch.empty(shape, dtype=torch.float32, device=logits.device)
        if work is not None:
            work["mask"] = out
    additive = torch.index_select(table, 0, index, out=out).view(count, -1)[:, :vocab]
    if rows is None:
        return logits.add_(additive)
    return logits.index_add_(0, rows, additive)
