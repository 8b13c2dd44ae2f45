"""Constrained decoding on a sentencepiece vocabulary (Llama 1/2, Mistral): ``▁`` pieces and
``<0xXX>`` byte-fallback pieces, exact masks, and generated outputs that validate.

The model is a sentencepiece BPE trained here on a few hundred lines; the backend is a seeded
random "bigram" over its ids (logits ``table[last id]``), wired to the llama backend's
:class:`SentencePieceTokenizer`, so the test needs no model file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jsonschema
import pytest
import regex
import torch

import samplerkit
from samplerkit.backend import Backend, PrefillOutput
from samplerkit.builtins.backends.llama.tokenizer import load_sentencepiece_file
from samplerkit.builtins.structured import JsonSchema, Regex
from samplerkit.context import StepContext

pytest.importorskip("llguidance")

CORPUS = ('{"name": "Ann", "age": 31, "tags": ["red", "blue"]}\n'
          'The cat sat on the mat. The dog ran to the car. 12345 67890 true false null\n'
          'Zoë likes café au lait; naïve façade. Emoji: 🦊 and 🐱.\n') * 100
PADDING = 3            # logits beyond the tokenizer's pieces, as models pad their embedding


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    # Llama's settings: BPE with byte fallback, no normalization; characters outside the 99.5%
    # coverage (the emoji) exist only as <0xXX> byte pieces.
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=0.995, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return load_sentencepiece_file(d / "sp.model")


class SentencePieceBigram(Backend):
    """Random logits ``table[last id]`` (seeded) over a sentencepiece tokenizer's ids."""

    name = "sp-bigram"

    def __init__(self, tok):
        super().__init__()
        self.tok = tok
        n = tok.sp.get_piece_size() + PADDING
        self.table = torch.randn(n, n, generator=torch.Generator().manual_seed(0)) * 2
        self._last = torch.zeros(0, dtype=torch.int64)
        self._vocab = tok.token_vocabulary(n)

    vocab_size = property(lambda self: self.table.shape[0])
    eos_token_ids = property(lambda self: self.tok.eos_ids)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.tok.encode(text, add_special=add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    def token_vocabulary(self):
        return self._vocab

    def prefill(self, prompts, *, keep_all_logits: bool = False) -> PrefillOutput:
        self._last = torch.tensor([p[-1] for p in prompts])
        return PrefillOutput(self.table[self._last].clone())

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        self._last = next_ids.to(torch.int64)
        return self.table[self._last].clone()

    def select_rows(self, keep) -> None:
        self._last = self._last[torch.as_tensor(list(keep), dtype=torch.int64)]


def test_token_vocabulary_bytes(tokenizer):
    """``▁`` is a space, ``<0xXX>`` is that byte, control and unknown pieces are no text; and the
    pieces' bytes spell what the tokenizer encodes (with the dummy-prefix space it adds)."""
    sp = tokenizer.sp
    vocab = tokenizer.token_vocabulary(sp.get_piece_size() + PADDING)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert len(vocab.tokens) == len(pieces) and vocab.vocab_size == len(pieces) + PADDING
    byte_ids = [i for i in range(len(pieces)) if sp.is_byte(i)]
    assert len(byte_ids) == 256
    for i in byte_ids:
        assert vocab.tokens[i] == bytes([int(pieces[i][3:5], 16)]), pieces[i]
    spaced = [i for i, p in enumerate(pieces) if p.startswith("▁") and len(p) > 1 and not sp.is_byte(i)]
    assert spaced, "the corpus should give pieces with a leading ▁"
    for i in spaced:
        assert vocab.tokens[i] == pieces[i].replace("▁", " ").encode()
    assert set(vocab.special_token_ids) == {0, 1, 2} and all(vocab.tokens[i] == b"" for i in (0, 1, 2))
    assert vocab.eos_token_ids == (2,) and vocab.bos_token_id == 1
    for text in ["The cat sat.", "naïve 🦊 façade", "  two  spaces"]:
        assert b"".join(vocab.tokens[i] for i in tokenizer.encode(text, add_special=False)) == (" " + text).encode()


@pytest.mark.parametrize("text", ["cat", " cat", "The  dog", '{"age": 31}', "🦊ë", "\n\nx"])
def test_engine_encoding_spells_the_text(tokenizer, text):
    """The engine tokenizes text a grammar forces in the middle of an output: the ids must spell
    exactly that text (no dummy-prefix space, no whitespace folding)."""
    vocab = tokenizer.token_vocabulary(tokenizer.sp.get_piece_size())
    ids = vocab.encode(text.encode())
    assert b"".join(vocab.tokens[i] for i in ids) == text.encode()


def _allowed(step, backend, ctx):
    out = step.apply(torch.zeros(step.batch_size, backend.vocab_size), ctx)
    return set(torch.isfinite(out[0]).nonzero().squeeze(-1).tolist())


def _walk(step, backend, accepts, seed, steps=40):
    """Follow one random allowed token at a time. At each state every allowed token's bytes
    extend a prefix ``accepts(text, partial=True)`` admits, and EOS is allowed iff
    ``accepts(text)``. Where the grammar offers a choice of next byte the allowed set is exactly
    those tokens; where it forces the next bytes, the engine keeps only the tokens of the forced
    text's own tokenization (``"on"``, not ``"o"`` then ``"n"``: llguidance's forced tokens), a
    non-empty subset. Returns the text."""
    vocab = backend.token_vocabulary()
    ctx = StepContext(1, backend.vocab_size, uses=frozenset({"generated"}), max_new_tokens=steps + 1,
                      token_vocabulary=backend.token_vocabulary)
    rng = torch.Generator().manual_seed(seed)
    text = b""
    for _ in range(steps):
        allowed = _allowed(step, backend, ctx)
        expected = {i for i in range(len(vocab.tokens)) if vocab.tokens[i] and i not in vocab.special_token_ids
                    and _extends(accepts, text + vocab.tokens[i])}
        if accepts(text.decode(errors="replace")):      # an incomplete character never matches
            expected.add(2)
        assert allowed and allowed <= expected, (text, sorted(allowed - expected))
        choices = {vocab.tokens[i][:1] for i in expected if i != 2} | ({b""} if 2 in expected else set())
        if len(choices) > 1:
            assert allowed == expected, (text, sorted(expected - allowed))
        pick = sorted(allowed)[int(torch.randint(len(allowed), (1,), generator=rng))]
        if pick == 2:
            return text.decode()
        ctx.append(torch.tensor([pick]))
        text += vocab.tokens[pick]
    return text.decode(errors="replace")


def _extends(accepts, data: bytes) -> bool:
    # A token may end inside a UTF-8 character (byte pieces): the prefix is valid when some
    # completion of the character is; try the character's possible continuations cheaply by
    # accepting any incomplete tail and checking the complete part.
    try:
        return accepts(data.decode(), partial=True)
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":
            return False
        return accepts(data[:exc.start].decode(), partial=True) and _tail_can_start(accepts, data, exc.start)


def _tail_can_start(accepts, data, start):
    head = data[:start].decode()
    return any(accepts(head + ch, partial=True) for ch in "🦊🐱éëïç" if ch.encode().startswith(data[start:]))


PATTERN = r"(The|A) (cat|dog) (sat|ran)( on the mat)?\. [0-9]{1,3} ?(🦊|ë)"


def test_regex_mask_is_exact(tokenizer):
    backend = SentencePieceBigram(tokenizer)
    compiled = regex.compile(PATTERN)

    def accepts(text, partial=False):
        return compiled.fullmatch(text, partial=partial) is not None

    texts = {_walk(Regex([Regex.Params(pattern=PATTERN)]), backend, accepts, seed) for seed in range(4)}
    assert all(compiled.fullmatch(t) for t in texts), texts


def test_json_schema_mask_is_exact(tokenizer):
    """A compact JSON schema whose language is a regular expression, checked token by token."""
    backend = SentencePieceBigram(tokenizer)
    schema = {"enum": ["cat", "the dog", "Zoë 🦊"]}
    compiled = regex.compile(r'"(cat|the dog|Zoë 🦊)"')

    def accepts(text, partial=False):
        return compiled.fullmatch(text, partial=partial) is not None

    for seed in range(4):
        step = JsonSchema([JsonSchema.Params(schema=schema, whitespace_flexible=False)])
        assert json.loads(_walk(step, backend, accepts, seed)) in schema["enum"]


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3}},
     "required": ["name", "age", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z ]{1,5}$"}]},
]


@pytest.mark.parametrize("whitespace_flexible", [False, True])
def test_generated_json_validates(tokenizer, whitespace_flexible):
    backend = SentencePieceBigram(tokenizer)
    rows = [{"json_schema": {"schema": s, "whitespace_flexible": whitespace_flexible}} for s in SCHEMAS]
    cfg = {"pipeline": [{"json_schema": {}}], "sampler": {"name": "categorical", "seed": 3},
           "generation": {"max_new_tokens": 120, "n": 3}}
    out = samplerkit.Generator(cfg, backend=backend).generate(["The", "A cat", "x"], rows=rows)
    assert len(out) == 9
    for c in out:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), SCHEMAS[c.prompt_index])


def test_generated_regex_text_is_the_matched_text(tokenizer):
    """The text the user gets is the text the constraint matched (a leading space included)."""
    backend = SentencePieceBigram(tokenizer)
    pattern = r" (The|A) (cat|dog)\. ?🦊"
    cfg = {"pipeline": [{"regex": {"pattern": pattern}}], "sampler": {"name": "categorical", "seed": 5},
           "generation": {"max_new_tokens": 40}}
    out = samplerkit.Generator(cfg, backend=backend).generate(["x"] * 8, seeds=list(range(8)))
    for c in out:
        assert c.finish_reason == "stop" and regex.fullmatch(pattern, c.text), c


def test_incremental_text_keeps_a_continuations_leading_space(tokenizer):
    """Decoded after its prompt, a first token ``▁The`` is `` The``; at the start of a text (no
    prompt but BOS) sentencepiece's dummy-prefix space is dropped."""
    from samplerkit.detokenize import IncrementalDetokenizer

    generated = tokenizer.encode("The cat sat", add_special=False)
    for prompt, expected in [(tokenizer.encode("x"), " The cat sat"), ([1], "The cat sat")]:
        detok = IncrementalDetokenizer(tokenizer.decode, prompt)
        assert "".join(detok.push(t) for t in generated) + detok.flush() == expected


def test_explain_runs_a_constraint_on_sentencepiece(tokenizer):
    """``samplerkit explain``'s own decode loop hands the steps the backend's vocabulary."""
    from samplerkit.explain import explain

    pattern = r" (The|A) (cat|dog)\."
    cfg = {"pipeline": [{"regex": {"pattern": pattern}}], "sampler": "greedy", "generation": {"max_new_tokens": 20}}
    backend = SentencePieceBigram(tokenizer)
    out = explain(samplerkit.Generator(cfg, backend=backend), "x", steps=20, traced=None)
    assert out.finish_reason == "stop" and out.tokens[-1] == 2
    text = b"".join(backend.token_vocabulary().tokens[t] for t in out.tokens).decode()
    assert regex.fullmatch(pattern, text), out
