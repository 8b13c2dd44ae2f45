"""The contract every backend must meet, as a plain check plugin authors run: :func:`check_backend`.

The decode loop (``samplerkit/generate.py``) relies on exactly these properties of a backend:

- ``vocab_size`` is a positive int and every logits tensor is ``[B, vocab_size]`` float32,
  one row per prompt / current row, without NaN;
- ``eos_token_ids`` is a collection of token ids in ``[0, vocab_size)`` (not a bare int);
- the tokenizer round-trips: ``detokenize(tokenize(text, add_special=False)) == text``;
- ``prefill`` returns a :class:`~samplerkit.PrefillOutput`; with ``keep_all_logits`` its ``all``
  holds one ``[L_i, V]`` tensor per prompt whose last row is ``last[i]``; a row's logits do not
  depend on the other prompts of the batch;
- the KV cache is consistent: after ``prefill(prompts)`` and ``step(ids)``, each row's logits
  equal a fresh prefill of the longer prompt ``prompts[i] + ids[i]`` (within a tolerance:
  batched and cached float arithmetic differ in the last bits), at every step;
- ``select_rows(keep)`` keeps those rows in that order, a repeated index duplicating a row's
  cache *independently* (two copies fed different tokens must diverge as two fresh prompts do).

:func:`check_backend` raises :class:`AssertionError` naming the backend and the broken rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence, Set
from typing import Any

import torch

from samplerkit.backend import Backend, PrefillOutput

__all__ = ["DEFAULT_TEXTS", "check_backend"]

_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")

#: Prompts of different lengths (the check needs at least three, and distinct lengths).
DEFAULT_TEXTS = ("The quick brown fox", "A", "Pack my box with five dozen liquor jugs.")
#: Text whose tokens are fed as the "generated" tokens.
_CONTINUATION = " jumps over the lazy dog, 12345!"


class _Check:
    """Messages all start with the backend's name and class."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.label = f"backend {getattr(backend, 'name', '?')!r} ({type(backend).__qualname__})"

    def fail(self, message: str) -> None:
        raise AssertionError(f"{self.label}: {message}")

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.fail(message)

    def call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AssertionError:
            raise
        except Exception as exc:
            self.fail(f"{what} raised {type(exc).__name__}: {exc}")

    def logits(self, value: Any, rows: int, vocab: int, what: str) -> torch.Tensor:
        self.expect(isinstance(value, torch.Tensor), f"{what} returned {type(value).__name__}, expected a torch.Tensor")
        self.expect(value.dtype == torch.float32, f"{what} returned {value.dtype} logits, expected torch.float32")
        self.expect(value.dim() == 2 and value.shape[0] == rows,
                    f"{what} returned shape {tuple(value.shape)}, expected ({rows}, {vocab}): one row per sequence")
        self.expect(value.shape[1] == vocab,
                    f"{what} returned logits of width {value.shape[1]} but vocab_size is {vocab}: they must agree "
                    f"(vocab_size may count padding rows of the output matrix)")
        self.expect(not bool(value.isnan().any()), f"{what} returned NaN logits in rows "
                    f"{value.isnan().any(-1).nonzero().squeeze(-1).tolist()}")
        return value

    def close(self, actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float, rtol: float) -> None:
        try:
            torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), atol=atol, rtol=rtol)
        except AssertionError as exc:
            first = str(exc).strip().splitlines()
            self.fail(f"{what} ({'; '.join(line.strip() for line in first[:4])}; atol={atol:g}, rtol={rtol:g})")


def check_backend(backend: Backend | type, texts: Sequence[str] = DEFAULT_TEXTS, *, steps: int = 3,
                  atol: float = 1e-4, rtol: float = 1e-4, roundtrip: bool = True) -> None:
    """Check that a constructed backend meets the contract (raises AssertionError).

    ``backend``: an instance (or a class whose default parameters construct one). ``texts``:
    prompts of different lengths, at least three. ``steps``: decode steps compared against
    fresh prefills. ``atol`` / ``rtol``: how close cached-step and batched logits must be to
    a fresh single-prompt prefill. ``roundtrip=False`` skips the tokenizer round trip (for a
    tokenizer that normalises text, which then cannot round-trip).
    """
    if isinstance(backend, type):
        if not issubclass(backend, Backend):
            raise AssertionError(f"check_backend needs a samplerkit.Backend, got {backend!r}")
        backend = backend()
    if not isinstance(backend, Backend):
        raise AssertionError(f"check_backend needs a samplerkit.Backend instance, got {type(backend).__name__}")
    c = _Check(backend)
    name = getattr(type(backend), "name", None)
    c.expect(isinstance(name, str) and bool(_SNAKE.match(name)), f"`name` must be a snake_case string, got {name!r}")
    if len(texts) < 3:
        raise ValueError("check_backend needs at least three texts")

    # -- vocabulary -----------------------------------------------------------------------
    vocab = c.call("vocab_size", lambda: backend.vocab_size)
    c.expect(isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0,
             f"vocab_size must be a positive int, got {vocab!r}")
    eos = c.call("eos_token_ids", lambda: backend.eos_token_ids)
    c.expect(isinstance(eos, (Set, list, tuple)),
             f"eos_token_ids must be a collection of token ids (e.g. frozenset({{2}})), got {type(eos).__name__} {eos!r}")
    bad = [e for e in eos if not (isinstance(e, int) and not isinstance(e, bool) and 0 <= e < vocab)]
    c.expect(not bad, f"eos_token_ids must be ints in [0, {vocab}), got {sorted(map(repr, bad))}")
    max_context = c.call("max_context", lambda: backend.max_context)
    c.expect(max_context is None or (isinstance(max_context, int) and max_context > 0),
             f"max_context must be None or a positive int, got {max_context!r}")

    # -- tokenizer ------------------------------------------------------------------------
    prompts = []
    for text in texts:
        plain = c.call(f"tokenize({text!r}, add_special=False)", backend.tokenize, text, add_special=False)
        _check_ids(c, plain, vocab, f"tokenize({text!r}, add_special=False)")
        if roundtrip:
            back = c.call("detokenize", backend.detokenize, plain)
            c.expect(back == text, f"the tokenizer does not round-trip: detokenize(tokenize({text!r}, add_special=False)) "
                                   f"== {back!r} (ids {plain})")
        ids = c.call(f"tokenize({text!r})", backend.tokenize, text)
        _check_ids(c, ids, vocab, f"tokenize({text!r})")
        c.expect(len(ids) > 0, f"tokenize({text!r}) returned no tokens")
        prompts.append(list(ids))
    c.expect(len({len(p) for p in prompts}) > 1, f"the texts must tokenize to prompts of different lengths, got {prompts}")
    pool = c.call("tokenize", backend.tokenize, _CONTINUATION, add_special=False)
    _check_ids(c, pool, vocab, f"tokenize({_CONTINUATION!r}, add_special=False)")
    c.expect(len(pool) >= 2, f"tokenize({_CONTINUATION!r}) must give at least two tokens, got {pool}")
    batch = len(prompts)

    def next_ids(t: int, rows: int, offset: int = 0) -> list[int]:
        """Distinct tokens per row and step, from real text."""
        return [pool[(t * rows + r + offset) % len(pool)] for r in range(rows)]

    def fresh(seqs: list[list[int]], what: str) -> torch.Tensor:
        """Each sequence prefilled alone: the reference for batched and cached logits."""
        rows = []
        for seq in seqs:
            out = c.call(f"prefill([{len(seq)} tokens])", backend.prefill, [seq])
            c.expect(isinstance(out, PrefillOutput), f"prefill returned {type(out).__name__}, expected samplerkit.PrefillOutput")
            rows.append(c.logits(out.last, 1, vocab, f"prefill of one prompt ({what})"))
        return torch.cat(rows)

    # -- prefill: batched == alone; keep_all_logits --------------------------------------
    alone = fresh(prompts, "the prompts alone")
    out = c.call("prefill(prompts)", backend.prefill, prompts)
    c.expect(isinstance(out, PrefillOutput), f"prefill returned {type(out).__name__}, expected samplerkit.PrefillOutput")
    c.logits(out.last, batch, vocab, f"prefill of {batch} prompts")
    c.close(out.last, alone, f"prefill of {batch} prompts of lengths {[len(p) for p in prompts]}: a row's logits "
                             f"depend on the other prompts of the batch (padding or attention masking?)", atol, rtol)
    out_all = c.call("prefill(prompts, keep_all_logits=True)", backend.prefill, prompts, keep_all_logits=True)
    c.expect(isinstance(out_all, PrefillOutput) and isinstance(out_all.all, list) and len(out_all.all) == batch,
             f"prefill(..., keep_all_logits=True) must return PrefillOutput.all, one tensor per prompt, got "
             f"{type(getattr(out_all, 'all', None)).__name__}")
    for i, (prompt, per_pos) in enumerate(zip(prompts, out_all.all)):
        c.logits(per_pos, len(prompt), vocab, f"prefill(keep_all_logits=True).all[{i}]")
        c.close(per_pos[-1:], alone[i:i + 1], f"prefill(keep_all_logits=True).all[{i}][-1] differs from the "
                                              f"next-token logits of prompt {i}", atol, rtol)

    # -- step: the KV cache equals a fresh prefill of the longer prompt --------------------
    seqs = [list(p) for p in prompts]
    fed = [next_ids(t, batch) for t in range(steps)]
    refs = []
    for t in range(steps):
        for r in range(batch):
            seqs[r].append(fed[t][r])
        refs.append(fresh(seqs, f"prompt + {t + 1} tokens"))
    c.call("prefill(prompts)", backend.prefill, prompts)
    for t in range(steps):
        got = c.logits(c.call(f"step (step {t + 1})", backend.step, torch.tensor(fed[t], dtype=torch.int64)),
                       batch, vocab, f"step {t + 1}")
        c.close(got, refs[t], f"the KV cache is inconsistent: at step {t + 1} the logits differ from a fresh prefill "
                              f"of the prompt plus the {t + 1} token(s) fed", atol, rtol)

    # -- select_rows: reorder, duplicate (independent copies), drop ----------------------
    keep = [batch - 1, 0, 0]
    seqs = [list(prompts[k]) for k in keep]
    fed = [next_ids(t, len(keep), offset=1) for t in range(2)]
    refs = []
    for t in range(2):
        for r in range(len(keep)):
            seqs[r].append(fed[t][r])
        refs.append(fresh(seqs, "rows selected"))
    drop_ref = fresh([seqs[1] + [pool[0]]], "rows selected, then one kept")
    c.call("prefill(prompts)", backend.prefill, prompts)
    c.call(f"select_rows({keep})", backend.select_rows, keep)
    for t in range(2):
        got = c.logits(c.call(f"step after select_rows({keep})", backend.step, torch.tensor(fed[t], dtype=torch.int64)),
                       len(keep), vocab, f"step {t + 1} after select_rows({keep})")
        c.close(got, refs[t], f"after select_rows({keep}) (reorder, and row 0 duplicated) step {t + 1} differs from fresh "
                              f"prefills of the selected rows: rows must follow keep's order and a duplicated row must "
                              f"get its own copy of the cache", atol, rtol)
    c.call("select_rows([1])", backend.select_rows, [1])
    got = c.logits(c.call("step after select_rows([1])", backend.step, torch.tensor([pool[0]], dtype=torch.int64)),
                   1, vocab, "step after select_rows([1])")
    c.close(got, drop_ref, "after select_rows([1]) (dropping rows) the remaining row differs from a fresh prefill", atol, rtol)


def _check_ids(c: _Check, ids: Any, vocab: int, what: str) -> None:
    c.expect(isinstance(ids, (list, tuple)), f"{what} returned {type(ids).__name__}, expected a list of ints")
    bad = [i for i in ids if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab)]
    c.expect(not bad, f"{what} returned ids that are not ints in [0, {vocab}): {bad[:5]}")
