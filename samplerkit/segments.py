"""Segment-aware pipelines: different steps in different parts of one output.

A config's ``segments:`` is an ordered list; each row walks through it on its own text::

    segments:
      - until: "</think>"                 # segment 0 ends once its text contains </think>
        pipeline: [{temperature: 0.8}]
        max_tokens: 256                   # budget: then "</think>" is forced, token by token
      - json_schema: {schema: {...}}      # a constraint as a segment key = first step of the segment
        pipeline: [{temperature: 0.2}]

Phases of a row: segment ``0 .. K-1``, then (only when the last segment has an ``until``) the
top-level pipeline until the row ends. A row's text is the concatenation of its segments' texts.

This module holds the resolved form (:class:`Segment`) and the per-row state machine
(:class:`SegmentState`); ``samplerkit/config.py`` resolves the YAML into segments and
``samplerkit/generate.py`` moves rows between pipelines when their state says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from samplerkit.spec import StepSpec

#: The keys of one segment besides constraint shorthands (a processor whose class declares
#: ``completes = True``, e.g. ``json_schema:``, is a segment key too).
SEGMENT_KEYS = ("pipeline", "sampler", "until", "after", "max_tokens")


@dataclass(frozen=True)
class Segment:
    """One resolved segment: its processors (a constraint shorthand first) and sampler, the
    string that closes it (``until``; ``None``: it closes only when the row ends), its token
    budget (``max_tokens``; ``None``: none) and where it was written (``segments[1]``)."""

    processors: tuple[StepSpec, ...]
    sampler: StepSpec
    until: str | None
    max_tokens: int | None
    location: str

    @property
    def constrained(self) -> bool:
        """Whether a step of the segment restricts tokens to a language (declares ``completes``):
        such a segment's EOS means "the constrained text is complete", not "end the row"."""
        return any(getattr(spec.cls, "completes", False) for spec in self.processors)


def overlap(text: str, closing: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``closing``, so
    that forcing ``closing[overlap:]`` completes a closing string the row had begun."""
    for k in range(min(len(text), len(closing) - 1), 0, -1):
        if text.endswith(closing[:k]):
            return k
    return 0


class SegmentState:
    """Where one row is in the segment list, fed the text of each token it accepts.

    ``phase``: the index of the current segment, ``len(segments)`` once the row runs the
    top-level pipeline. ``text``: the segment's text so far (text after a closing string in the
    same token starts the next segment's text). ``forcing``: token ids still to be appended
    without sampling (a closing string being forced).

    :meth:`feed` returns what the loop must do after a token:

    - ``None``: stay;
    - ``"switch"``: the segment closed (its text contains ``until``, or its forced closing
      string is all appended): the row now runs phase ``phase``;
    - ``"force"``: the budget is spent (or a constrained segment completed): ``forcing`` holds
      the closing string's tokens; the row appends them one per step;
    - ``"end"``: a segment without ``until`` spent its budget; the row ends with ``length``.
    """

    __slots__ = ("segments", "tokenize", "phase", "text", "tokens", "forcing")

    def __init__(self, segments: Sequence[Segment], tokenize: Callable[[str], list[int]]):
        self.segments = segments
        self.tokenize = tokenize
        self.phase = 0
        self.text = ""
        self.tokens = 0
        self.forcing: list[int] = []

    @property
    def current(self) -> Segment | None:
        """The segment the row is in; ``None`` once it runs the top-level pipeline."""
        return self.segments[self.phase] if self.phase < len(self.segments) else None

    def feed(self, chars: str, forced: bool = False) -> str | None:
        """Account for one appended token whose text is ``chars`` (``forced``: it came from
        ``forcing``, not from the sampler)."""
        seg = self.current
        if seg is None:
            return None
        self.tokens += 1
        self.text += chars
        # A constrained segment's text is its grammar's: it closes when the grammar completes
        # (the loop then forces `until`), never on an `until` the grammar itself may contain.
        if seg.until is not None and (forced or not seg.constrained) and (at := self.text.find(seg.until)) >= 0:
            self._close(self.text[at + len(seg.until):])
            return "switch"
        if forced:
            if self.forcing:
                return None
            # Every forced token is in, yet the detokenized text does not show `until` (a
            # tokenizer that normalises it): the segment still closes here.
            self._close("")
            return "switch"
        if seg.max_tokens is not None and self.tokens >= seg.max_tokens:
            if seg.until is None:
                return "end"
            self.start_forcing()
            return "force"
        return None

    def start_forcing(self) -> list[int]:
        """Queue the tokens of the rest of ``until`` (what the segment's text has not already
        begun) and return them."""
        seg = self.current
        assert seg is not None and seg.until is not None
        rest = seg.until[overlap(self.text, seg.until):]
        self.forcing = list(self.tokenize(rest))
        return self.forcing

    def _close(self, leftover: str) -> None:
        self.phase += 1
        self.forcing = []
        self.tokens = 0
        self.text = ""
        # Characters after the closing string in the same token open the next segment's text
        # (a constrained next segment never sees such characters: see ends_exactly).
        if leftover and self.current is not None:
            self.text = leftover
            nxt = self.current
            if nxt.until is not None and (at := leftover.find(nxt.until)) >= 0:
                self._close(leftover[at + len(nxt.until):])


def closing_overrun(token_bytes: Sequence[bytes], closing: str) -> list[tuple[bytes, frozenset[int]]]:
    """For a segment followed by a constrained one: the tokens that would complete ``closing``
    and carry characters past it, by the text the row ends with.

    Returns ``[(prefix, ids), ...]``: when the row's segment text ends with ``prefix`` (a proper
    prefix of ``closing``, ``b""`` included), the ids in ``ids`` would write the rest of
    ``closing`` followed by more text. Masking them makes the segment end exactly at its closing
    string, so the constrained segment's grammar starts on a clean boundary (the row can still
    write ``closing`` with tokens that end exactly at it, or across several tokens).
    """
    want = closing.encode("utf-8")
    out = []
    for k in range(len(want)):
        prefix, rest = want[:k], want[k:]
        ids = frozenset(i for i, tok in enumerate(token_bytes)
                        if (len(tok) > len(rest) and tok.startswith(rest))
                        or (k == 0 and (at := tok.find(want)) >= 0 and at + len(want) < len(tok)))
        if ids:
            out.append((prefix, ids))
    return out


__all__ = ["SEGMENT_KEYS", "Segment", "SegmentState", "closing_overrun", "overlap"]
