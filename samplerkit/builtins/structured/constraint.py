"""The constrained-decoding processors: a per-row token mask that follows a grammar.

Each row holds an llguidance matcher (:mod:`samplerkit.builtins.structured.engine`) that has
consumed the tokens the row accepted so far. On every step the processor advances each matcher
by the row's new tokens (read from :attr:`StepContext.generated`), asks it for the set ``A`` of
tokens that extend a valid prefix, and sets ``x_i = -inf`` for ``i`` not in ``A``. EOS is in
``A`` only where the text so far is complete; once nothing else can follow, ``A = {EOS}``, so the
row ends with ``finish_reason: "stop"``. The kept logits are untouched, so any sampler after it
draws from the renormalised allowed distribution ``p_i / sum_{j in A} p_j``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, PrivateAttr, model_validator

from samplerkit.builtins.structured import engine
from samplerkit.context import StepContext
from samplerkit.errors import GenerationError
from samplerkit.params import StepParams
from samplerkit.steps import Processor
from samplerkit.strict import ConfigPath


class ConstraintParams(StepParams):
    """Parameters of a constrained step; subclasses say how to build the grammar (:meth:`source`)."""

    #: The engine's grammar kind (``engine.build_grammar``).
    kind: ClassVar[str]
    _grammar: str | None = PrivateAttr(default=None)

    def source(self) -> Any:
        """What the grammar is built from, or ``None`` when this row is unconstrained."""
        raise NotImplementedError

    def compile_options(self) -> dict[str, Any]:
        """Engine options (llguidance's JSON compile options) for :meth:`source`."""
        return {}

    @model_validator(mode="after")
    def _compile(self):
        """Build and validate the grammar now, so a bad schema, regex or grammar is a config
        error naming its step, never a failure in the middle of a generation."""
        source = self.source()
        if source is None:
            return self
        try:
            grammar = engine.build_grammar(self.kind, source, self.compile_options())
        except ImportError as exc:
            raise ValueError(str(exc)) from None
        except ValueError as exc:
            raise ValueError(f"invalid {self.kind.replace('_', ' ')}: {exc}") from None
        self._grammar = grammar
        return self

    def is_neutral(self) -> bool:
        """A row without a grammar (``schema: null``, ``enabled: false``...) is left unchanged."""
        return self._grammar is None

    @property
    def grammar(self) -> str | None:
        """The llguidance grammar of this row (validated when the parameters were), or ``None``."""
        return self._grammar


class Constraint(Processor):
    """Base of the constrained steps: rows whose parameters give a grammar are masked to it.

    Rows follow their matchers through compaction and fan-out (:meth:`follow_rows`). A row's
    matcher is built on the first :meth:`apply`, from the backend's tokenizer
    (:attr:`StepContext.token_vocabulary`), and copied from a cache when the grammar was
    compiled before.
    """

    uses = frozenset({"generated"})
    # Only -inf is written; the kept logits are the input's.
    keeps_finite = True
    #: Declared for ``samplerkit lint`` and other tools: the step restricts tokens to a language,
    #: so it belongs before temperature and truncation (a truncation first may leave nothing).
    constrains: ClassVar[bool] = True
    #: EOS only where the text is complete (a segment's EOS closes the segment: docs/segments.md).
    completes: ClassVar[bool] = True
    #: The matchers are built from the backend's token strings.
    needs_vocabulary: ClassVar[bool] = True

    def __init__(self, rows, device="cpu"):
        super().__init__(rows, device)
        self._grammars: list[str | None] = [row.grammar for row in self.rows]
        self._matchers: list[Any] | None = None
        self._consumed: list[int] = [0] * len(self.rows)
        constrained = [i for i, g in enumerate(self._grammars) if g is not None]
        self._constrained = constrained
        self._all_rows = len(constrained) == len(self.rows)
        self._row_index = torch.as_tensor(constrained, dtype=torch.int64, device=self.device)
        self._bitmask: torch.Tensor | None = None
        self._eos: set[int] = set()
        self._work: dict = {}               # the [R, V] additive mask, reused from step to step

    def follow_rows(self, previous: Constraint, keep) -> None:
        """Take over the matchers of ``previous`` for the rows ``keep`` (old row indices in new
        order); a repeated row gets a copy, so the copies then advance independently."""
        if previous._matchers is None:
            return
        seen: set[int] = set()
        matchers = []
        for i in (int(k) for k in keep):
            m = previous._matchers[i]
            matchers.append(m.deep_copy() if (m is not None and i in seen) else m)
            seen.add(i)
        self._matchers = matchers
        self._consumed = [previous._consumed[int(k)] for k in keep]
        self._eos = previous._eos

    def _start(self, ctx: StepContext, vocab_width: int) -> None:
        if ctx.token_vocabulary is None:
            raise GenerationError(f"{self.name} needs the backend's tokenizer, but this StepContext has none; "
                                  f"run it through samplerkit.generate, or pass "
                                  f"StepContext(..., token_vocabulary=backend.token_vocabulary)")
        vocab = ctx.token_vocabulary()
        if vocab.vocab_size != vocab_width:
            raise GenerationError(f"{self.name}: the tokenizer describes {vocab.vocab_size} tokens but the logits have "
                                  f"{vocab_width}")
        self._eos = set(vocab.eos_token_ids)
        tokenizer = engine.engine_tokenizer(vocab)
        self._matchers = [None if g is None else engine.new_matcher(tokenizer, g) for g in self._grammars]
        # The matchers start at the first generated token: whatever ctx says was generated
        # before this step existed is consumed on the next line of apply.
        self._consumed = [0] * len(self.rows)

    def _advance(self, ctx: StepContext) -> None:
        """Feed each constrained row the tokens it accepted since the last call."""
        counts = ctx.num_generated.tolist()
        generated = ctx.generated
        for i in self._constrained:
            n, done = counts[i], self._consumed[i]
            if n <= done:
                continue
            m = self._matchers[i]
            new = generated[i, done:n].tolist()
            if m.is_stopped() and not m.is_error() and set(new) <= self._eos:
                # Complete, and the row went on past EOS (ignore_eos): only EOS stays allowed.
                self._consumed[i] = n
                continue
            if not m.consume_tokens(new):
                reason = m.get_error().split("\n", 1)[0]       # the engine appends a state dump
                raise GenerationError(f"{self.name}: row {i} accepted token(s) {new} that the constraint does not "
                                      f"allow ({reason}); a step after {self.name} or the sampler chose a "
                                      f"token {self.name} had removed")
            self._consumed[i] = n

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if not self._constrained:           # every row neutral: the identity
            return logits
        if self._matchers is None:
            self._start(ctx, logits.shape[-1])
        self._advance(ctx)
        rows = len(self.rows)
        words = (logits.shape[-1] + 31) // 32
        if self._bitmask is None or self._bitmask.shape != (rows, words):
            self._bitmask = torch.zeros(rows, words, dtype=torch.int32)
        engine.fill_masks([(self._matchers[i], i) for i in self._constrained], self._bitmask)
        if self._all_rows:
            return engine.apply_bitmask(logits, self._bitmask, work=self._work)
        return engine.apply_bitmask(logits, self._bitmask, self._row_index.to(logits.device), work=self._work)


# -- the steps ------------------------------------------------------------------------------

class JsonSchema(Constraint):
    """Output is JSON valid under a JSON Schema (``schema`` inline or ``file``, one per row).

    Written compactly (no whitespace between tokens); the keywords llguidance implements
    (types, properties, required, additionalProperties, items/prefixItems, min/maxItems,
    enum/const, pattern, min/maxLength, numeric bounds, anyOf/oneOf/allOf, $ref/$defs, format)
    are enforced; a schema using one it does not is an error naming it. ``schema: null`` and no
    ``file`` leave the row unconstrained (so per-row overrides can give each row its own schema).
    """

    name = "json_schema"


    @classmethod
    def contract_examples(cls) -> list[dict[str, Any]]:
        """Parameters for the real-model corpus (tests/real_model); the constrained steps' own
        contract is tests/test_structured.py (the generic one has no tokenizer to give them)."""
        return [{"schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}]
    class Params(ConstraintParams):
        kind: ClassVar[str] = "json_schema"
        schema_: dict[str, Any] | bool | None = Field(None, alias="schema",
                                                       description="the JSON Schema (a mapping); null: unconstrained")
        file: ConfigPath | None = Field(None, min_length=1, description="path of a JSON file holding the schema "
                                        "instead; in a YAML config, relative to the config file's directory")
        whitespace_flexible: bool = Field(
            True, description="allow JSON whitespace between tokens; false: the compact form only")

        model_config = {**ConstraintParams.model_config, "populate_by_name": True, "serialize_by_alias": True}

        def source(self) -> Any:
            if self.schema_ is not None and self.file is not None:
                raise ValueError("give either schema or file, not both")
            if self.file is not None:       # already resolved (ConfigPath): the path named is the one read
                try:
                    return json.loads(Path(self.file).read_text(encoding="utf-8"))
                except OSError as exc:
                    raise ValueError(f"cannot read the schema file {self.file}: {exc.strerror or exc}") from None
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"the schema file {self.file} is not JSON: {exc}") from None
            return self.schema_

        def compile_options(self) -> dict[str, Any]:
            return {"whitespace_flexible": self.whitespace_flexible}


class JsonObject(Constraint):
    """Output is one JSON object (any keys and values): the JSON Schema ``{"type": "object"}``.
    ``enabled: false`` leaves the row unconstrained."""

    name = "json_object"


    @classmethod
    def contract_examples(cls) -> list[dict[str, Any]]:
        """Parameters for the real-model corpus (tests/real_model); the constrained steps' own
        contract is tests/test_structured.py (the generic one has no tokenizer to give them)."""
        return [{"whitespace_flexible": False}]
    class Params(ConstraintParams):
        kind: ClassVar[str] = "json_schema"
        enabled: bool = Field(True, description="constrain the row to a JSON object")
        whitespace_flexible: bool = Field(
            True, description="allow JSON whitespace between tokens; false: the compact form only")

        def source(self) -> Any:
            return {"type": "object"} if self.enabled else None

        def compile_options(self) -> dict[str, Any]:
            return {"whitespace_flexible": self.whitespace_flexible}


class Regex(Constraint):
    """The whole output matches a regular expression (Rust ``regex`` syntax, as llguidance reads
    it; anchored at both ends). ``pattern: null`` leaves the row unconstrained."""

    name = "regex"


    @classmethod
    def contract_examples(cls) -> list[dict[str, Any]]:
        """Parameters for the real-model corpus (tests/real_model); the constrained steps' own
        contract is tests/test_structured.py (the generic one has no tokenizer to give them)."""
        return [{"pattern": "[A-Za-z ,.]{1,40}"}]
    class Params(ConstraintParams):
        kind: ClassVar[str] = "regex"
        pattern: str | None = Field(None, min_length=1, description="the regular expression the output must match")

        def source(self) -> Any:
            return self.pattern


class Grammar(Constraint):
    """The output is a sentence of a context-free grammar: ``lark`` (llguidance's Lark dialect,
    start symbol ``start``) or ``gbnf`` (llama.cpp's GBNF, converted to Lark by llguidance)."""

    name = "grammar"


    @classmethod
    def contract_examples(cls) -> list[dict[str, Any]]:
        """Parameters for the real-model corpus (tests/real_model); the constrained steps' own
        contract is tests/test_structured.py (the generic one has no tokenizer to give them)."""
        return [{"lark": 'start: ("yes" | "no") "."'}, {"gbnf": 'root ::= [a-z]+'}]
    class Params(ConstraintParams):
        lark: str | None = Field(None, min_length=1, description="a Lark grammar (start rule: start)")
        gbnf: str | None = Field(None, min_length=1, description="a llama.cpp GBNF grammar (start rule: root)")

        @property
        def kind(self) -> str:          # type: ignore[override]
            return "gbnf" if self.gbnf is not None else "lark"

        def source(self) -> Any:
            if self.lark is not None and self.gbnf is not None:
                raise ValueError("give either lark or gbnf, not both")
            return self.gbnf if self.gbnf is not None else self.lark


class Choice(Constraint):
    """The output is exactly one of ``options`` (strings). ``[]`` leaves the row unconstrained."""

    name = "choice"


    @classmethod
    def contract_examples(cls) -> list[dict[str, Any]]:
        """Parameters for the real-model corpus (tests/real_model); the constrained steps' own
        contract is tests/test_structured.py (the generic one has no tokenizer to give them)."""
        return [{"options": ["Paris", "Rome", "London"]}]
    class Params(ConstraintParams):
        kind: ClassVar[str] = "choice"
        options: list[str] = Field(default_factory=list, description="the allowed outputs; [] disables")

        def source(self) -> Any:
            if "" in self.options:
                raise ValueError(f"options[{self.options.index('')}] is the empty string; every option needs at "
                                 "least one character")
            return self.options or None


BUILTIN_STRUCTURED: list[type] = [JsonSchema, JsonObject, Regex, Grammar, Choice]
