"""Streaming text out of token ids: incremental detokenization and stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character may span tokens) and
for sentencepiece (a token's leading space depends on its neighbour). The standard remedy
(as in text-generation-inference and vLLM): decode a short window that starts a few tokens
back, and emit only the new, complete text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, in amortised O(1) per token.

    ``context``: the ids before the first pushed one (the prompt). Its last
    :data:`CONTEXT_TOKENS` ids are decoded with the first new token and only the new text is
    emitted, so that a sentencepiece token's leading space (``▁The``), which a decoder drops at
    the start of a text, is kept where the token continues one (as text-generation-inference does).
    """

    #: Prompt ids kept as context for the first new token.
    CONTEXT_TOKENS = 4

    def __init__(self, detokenize: Callable[[Sequence[int]], str], context: Sequence[int] = ()):
        self._detokenize = detokenize
        self.tokens: list[int] = [int(i) for i in list(context)[-self.CONTEXT_TOKENS:]] if context else []
        self._prefix_offset = 0
        self._read_offset = len(self.tokens)

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes (possibly empty while a character is partial)."""
        self.tokens.append(token_id)
        prefix = self._detokenize(self.tokens[self._prefix_offset:self._read_offset])
        full = self._detokenize(self.tokens[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.tokens)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end)."""
        prefix = self._detokenize(self.tokens[self._prefix_offset:self._read_offset])
        full = self._detokenize(self.tokens[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.tokens)
        return full[len(prefix):]


class StopMatcher:
    """Finds stop strings in a growing text, across token boundaries.

    ``feed(delta)`` returns ``(emit, stopped)``: the text now safe to show (never a part of a
    stop string that might still complete) and whether a stop string was found; the stop
    string itself and anything after it are never emitted.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""          # everything generated so far (cut at a stop string)
        self._emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        start = max(0, len(self.text) - self._longest + 1)
        self.text += delta
        if self.stops:
            hits = [pos for s in self.stops if (pos := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return self._emit(len(self.text)), True
        return self._emit(self._safe_length()), False

    def finish(self) -> str:
        """Everything not yet emitted (the row ended for another reason)."""
        return self._emit(len(self.text))

    def _safe_length(self) -> int:
        # Hold back the longest suffix that is a proper prefix of some stop string.
        for k in range(min(len(self.text), self._longest - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return len(self.text) - k
        return len(self.text)

    def _emit(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self.text[self._emitted:upto]
        self._emitted = upto
        return out


def lone_surrogate(text: str) -> int | None:
    """Index of the first code point in U+D800..U+DFFF standing alone (JSON can spell one,
    ``"\\ud800"``; UTF-8 cannot encode it, so no tokenizer can take it), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return exc.start


def lone_surrogate_in(value: Any, path: str = "") -> str | None:
    """A message naming the first string (key or value, at any depth of dicts and lists) that
    holds a lone surrogate, or None. Parsed JSON and YAML can carry one (``"\\ud800"``), and
    pydantic cannot even word a validation error about such a string: check before validating."""
    if isinstance(value, str):
        at = lone_surrogate(value)
        if at is None:
            return None
        where = f"{path} " if path else ""
        return (f"{where}has a lone surrogate \\u{ord(value[at]):04x} at character {at + 1}, which is not text; "
                "a \\ud800-\\udfff escape must be half of a pair (like \\ud83d\\ude00)")
    if isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate_in(key, f"{path}.<key>" if path else "<key>") if isinstance(key, str) else None
            found = found or lone_surrogate_in(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if found := lone_surrogate_in(item, f"{path}[{index}]"):
                return found
    return None
