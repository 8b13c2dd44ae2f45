"""Penalties, bans and biases: agreement with transformers, golden hand-computed tables, and
the decode loop on the bigram backend."""

from __future__ import annotations

import math

import pytest
import torch

import samplerkit
from samplerkit import Generator
from samplerkit.builtins.backends.bigram import EOS_ID, BigramBackend
from samplerkit.builtins.penalties import (
    AllowedTokens,
    BadWords,
    Dry,
    FrequencyPenalty,
    LogitBias,
    MinTokens,
    NoRepeatNgram,
    PresencePenalty,
    RepetitionPenalty,
)
from samplerkit.context import StepContext
from samplerkit.registry import default_registry

INF = math.inf
REGISTRY = default_registry()


def run(cls, rows, logits, ctx=None):
    """Apply a processor with one Params dict per row."""
    ctx = ctx if ctx is not None else StepContext(logits.shape[0], logits.shape[1])
    return cls([cls.Params(**r) for r in rows]).apply(logits.clone(), ctx)


def context(prompts, generated=(), vocab=None, uses=frozenset({"generated", "counts"}), eos=()):
    """A context with ``prompts`` and the rows of ``generated`` appended one step at a time."""
    gen = torch.as_tensor(generated, dtype=torch.int64).reshape(len(prompts), -1)
    ctx = StepContext(len(prompts), vocab, prompt_ids=prompts, uses=uses,
                      max_new_tokens=gen.shape[1] + 4, eos_token_ids=eos)
    for t in range(gen.shape[1]):
        ctx.append(gen[:, t].contiguous())
    return ctx


# -- transformers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers.generation.logits_process",
                               reason="transformers is the reference implementation for these tests")


def random_case(seed, batch=8, vocab=50, prompt_len=5, steps=7, alphabet=6):
    """Random logits and a history drawn from a few ids (so repeats happen), as transformers'
    ``input_ids`` (prompt + generated) and as a StepContext filled with ``ctx.append``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3
    prompt = torch.randint(0, alphabet, (batch, prompt_len), generator=g)
    gen = torch.randint(0, alphabet, (batch, steps), generator=g)
    ctx = context(prompt.tolist(), gen, vocab)
    return logits, torch.cat([prompt, gen], 1), ctx


def assert_same(ours, theirs):
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), "kept sets differ"
    kept = torch.isfinite(ours)
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(hf, seed, penalty):
    logits, input_ids, ctx = random_case(seed)
    ours = run(RepetitionPenalty, [{"repetition_penalty": penalty}] * 8, logits, ctx)
    assert_same(ours, hf.RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone()))
    # Generated tokens only = transformers' prompt_ignore_length.
    ours = run(RepetitionPenalty, [{"repetition_penalty": penalty, "include_prompt": False}] * 8, logits, ctx)
    theirs = hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=5)(input_ids, logits.clone())
    assert_same(ours, theirs)
    # A window of the newest tokens = transformers on the cut input_ids.
    for last_n in (1, 3, 9, 100):
        ours = run(RepetitionPenalty, [{"repetition_penalty": penalty, "last_n": last_n}] * 8, logits, ctx)
        assert_same(ours, hf.RepetitionPenaltyLogitsProcessor(penalty)(input_ids[:, -last_n:], logits.clone()))


def test_repetition_penalty_per_row_windows(hf):
    logits, input_ids, ctx = random_case(5)
    rows = [{"repetition_penalty": 2.0, "last_n": 3}, {"repetition_penalty": 2.0, "include_prompt": False},
            {}, {"repetition_penalty": 0.5}] * 2
    ours = run(RepetitionPenalty, rows, logits, ctx)
    for i, row in enumerate(rows):
        ids = input_ids[i:i + 1]
        ids = ids[:, -row.get("last_n", 0):] if row.get("last_n") else ids if row.get("include_prompt", True) else ids[:, 5:]
        expected = hf.RepetitionPenaltyLogitsProcessor(row.get("repetition_penalty", 1.0))(ids, logits[i:i + 1].clone())
        assert_same(ours[i:i + 1], expected)
    assert torch.equal(ours[2], logits[2])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [1, 2, 3, 4, 13])
def test_no_repeat_ngram_matches_transformers(hf, seed, n):
    logits, input_ids, ctx = random_case(seed, alphabet=3 if n > 1 else 6)
    ours = run(NoRepeatNgram, [{"no_repeat_ngram": n}] * 8, logits, ctx)
    assert_same(ours, hf.NoRepeatNGramLogitsProcessor(n)(input_ids, logits.clone()))


def test_no_repeat_ngram_mixed_sizes(hf):
    logits, input_ids, ctx = random_case(7, alphabet=3)
    sizes = [0, 1, 2, 3, 2, 0, 4, 3]
    ours = run(NoRepeatNgram, [{"no_repeat_ngram": n} for n in sizes], logits, ctx)
    for i, n in enumerate(sizes):
        expected = hf.NoRepeatNGramLogitsProcessor(n)(input_ids[i:i + 1], logits[i:i + 1].clone()) if n else logits[i:i + 1]
        assert_same(ours[i:i + 1], expected)


@pytest.mark.parametrize("seed", range(4))
def test_bad_words_match_transformers(hf, seed):
    logits, input_ids, ctx = random_case(seed, alphabet=4)
    g = torch.Generator().manual_seed(100 + seed)
    words = [torch.randint(0, 4, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist() for _ in range(6)]
    words.append([40])                  # a token outside the history's alphabet
    ours = run(BadWords, [{"bad_words": words}] * 8, logits, ctx)
    assert_same(ours, hf.NoBadWordsLogitsProcessor(words)(input_ids, logits.clone()))


@pytest.mark.parametrize("min_new", [6, 7, 8, 30])
def test_min_tokens_matches_transformers(hf, min_new):
    logits, input_ids, ctx = random_case(1)                  # 7 tokens generated
    ours = run(MinTokens, [{"min_tokens": min_new, "eos_token_ids": [3, 7]}] * 8, logits, ctx)
    theirs = hf.MinNewTokensLengthLogitsProcessor(5, min_new, [3, 7])(input_ids, logits.clone())
    assert_same(ours, theirs)


def test_logit_bias_matches_transformers_sequence_bias(hf):
    logits, input_ids, ctx = random_case(2)
    bias = {0: 2.5, 7: -3.0, 49: 100.0, 12: -100.0}
    ours = run(LogitBias, [{"bias": bias}] * 8, logits, ctx)
    theirs = hf.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(input_ids, logits.clone())
    assert_same(ours, theirs)


# -- golden tables -------------------------------------------------------------------------------

FREQ_PRESENCE = [
    # generated, frequency, presence, expected offsets for tokens 0..3
    ([1, 1, 2], 0.5, 0.0, [0.0, -1.0, -0.5, 0.0]),
    ([1, 1, 2], 0.0, 0.5, [0.0, -0.5, -0.5, 0.0]),
    ([3, 3, 3], -2.0, 0.0, [0.0, 0.0, 0.0, 6.0]),
    ([0, 3, 0], 0.0, -1.5, [1.5, 0.0, 0.0, 1.5]),
    ([], 2.0, 2.0, [0.0, 0.0, 0.0, 0.0]),
]


@pytest.mark.parametrize("generated, freq, pres, offsets", FREQ_PRESENCE)
def test_frequency_and_presence_golden(generated, freq, pres, offsets):
    x = torch.tensor([[0.5, -1.0, 2.0, -INF]])
    ctx = context([[1, 2]], [generated], vocab=4)      # prompt tokens do not count
    out = run(PresencePenalty, [{"presence_penalty": pres}], run(FrequencyPenalty, [{"frequency_penalty": freq}], x, ctx), ctx)
    torch.testing.assert_close(out, x + torch.tensor([offsets]), rtol=0, atol=1e-6)


def test_frequency_presence_mixed_batch_leaves_neutral_rows_bitwise():
    x = torch.tensor([[0.5, -0.0, 2.0, -INF], [0.5, -0.0, 2.0, -INF]])
    ctx = context([[0], [0]], [[1, 1], [1, 3]], vocab=4)
    out = run(FrequencyPenalty, [{"frequency_penalty": 1.0}, {}], x, ctx)
    assert out[0].tolist() == [0.5, -2.0, 2.0, -INF]
    assert torch.equal(out[1], x[1]) and str(out[1, 1].item()) == "-0.0"


LOGIT_BIAS = [
    ({}, [1.0, 2.0, 3.0]),
    ({0: 1.5}, [2.5, 2.0, 3.0]),
    ({1: -100.0, 2: 0.25}, [1.0, -98.0, 3.25]),
]


@pytest.mark.parametrize("bias, expected", LOGIT_BIAS)
def test_logit_bias_golden(bias, expected):
    out = run(LogitBias, [{"bias": bias}], torch.tensor([[1.0, 2.0, 3.0]]))
    assert out.tolist() == [expected]


def test_logit_bias_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"token id 7 is outside the vocabulary \(size 3"):
        run(LogitBias, [{"bias": {7: 1.0, 1: 2.0}}], torch.zeros(1, 3))
    with pytest.raises(Exception, match="greater than or equal to -100"):
        LogitBias.Params(bias={1: -1000.0})


ALLOWED = [
    ([], [0.0, 1.0, 2.0, 3.0]),
    ([2], [-INF, -INF, 2.0, -INF]),
    ([3, 0, 3], [0.0, -INF, -INF, 3.0]),
]


@pytest.mark.parametrize("allowed, expected", ALLOWED)
def test_allowed_tokens_golden(allowed, expected):
    out = run(AllowedTokens, [{"allowed_tokens": allowed}], torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    assert out.tolist() == [expected]


def test_allowed_tokens_never_empties_a_row():
    x = torch.tensor([[0.0, -INF, 2.0]])
    assert torch.equal(run(AllowedTokens, [{"allowed_tokens": [1]}], x), x)


def test_min_tokens_uses_the_context_eos_ids_and_counts_generated_tokens():
    x = torch.zeros(2, 5)
    ctx = context([[1], [1, 2, 3]], [[0, 0], [0, 0]], vocab=5, eos=[4])
    out = run(MinTokens, [{"min_tokens": 3}, {"min_tokens": 2}], x, ctx)
    assert out.tolist() == [[0, 0, 0, 0, -INF], [0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="eos_token_ids"):
        run(MinTokens, [{"min_tokens": 3}], torch.zeros(1, 5))


def test_bad_words_prefix_spans_prompt_and_generated():
    x = torch.zeros(1, 6)
    ctx = context([[4, 1]], [[2]], vocab=6)                 # context 4 1 | 2
    words = [[1, 2, 3], [4, 1, 2, 5], [2, 0], [9, 2, 1]]
    out = run(BadWords, [{"bad_words": words[:3]}], x, ctx)
    assert out.tolist() == [[-INF, 0, 0, -INF, 0, -INF]]
    with pytest.raises(ValueError, match="token id 9 is outside the vocabulary"):
        run(BadWords, [{"bad_words": words}], x, ctx)


# DRY: context, params, expected penalty per token (hand-computed; see the comments).
DRY = [
    # "0 1" repeats positions 0-1, which were followed by 2: n = 2 -> 1 * 2^0.
    ([0, 1, 2, 3, 0, 1], {}, {2: 1.0}),
    # "0 1 2" repeats (n = 3), followed by 3: 1 * 2^1.
    ([5, 0, 1, 2, 3, 9, 0, 1, 2], {}, {3: 2.0}),
    # A breaker (9) before the repeat does not shorten it ...
    ([5, 0, 1, 2, 3, 9, 0, 1, 2], {"sequence_breakers": [9]}, {3: 2.0}),
    # ... one inside the current suffix does: the match stops at 1 < allowed_length.
    ([5, 0, 1, 2, 3, 9, 0, 1, 2], {"sequence_breakers": [1]}, {}),
    # A breaker is never penalised itself.
    ([0, 1, 9, 0, 1], {}, {9: 1.0}),
    ([0, 1, 9, 0, 1], {"sequence_breakers": [9]}, {}),
    # The window: the last 4 tokens hold no earlier "0 1"; 6 tokens do.
    ([0, 1, 2, 3, 0, 1], {"penalty_last_n": 4}, {}),
    ([0, 1, 2, 3, 0, 1], {"penalty_last_n": 6}, {2: 1.0}),
    # Overlapping repeats: "4 4 4" recurs shifted by one, then 4: n = 3 -> 2^1.
    ([4, 4, 4, 4], {}, {4: 2.0}),
    # Two earlier "1 2" followed by different tokens, each n = 2; multiplier 0.5, base 3.
    ([0, 1, 2, 7, 1, 2, 8, 1, 2], {"multiplier": 0.5, "base": 3.0}, {7: 0.5, 8: 0.5}),
    # The longest match wins per token: "3 1 2" then 5 (n = 3), "1 2" then 5 again (n = 2).
    ([3, 1, 2, 5, 1, 2, 5, 3, 1, 2], {"base": 3.0}, {5: 3.0}),
    # allowed_length 1: single-token repeats count; n = 1 -> 1 * 2^0 for the follower of "6".
    ([6, 0, 6], {"allowed_length": 1}, {0: 1.0}),
    # Too short to reach allowed_length.
    ([0, 0], {}, {}),
]


@pytest.mark.parametrize("tokens, params, penalties", DRY)
def test_dry_golden(tokens, params, penalties):
    vocab = 10
    x = torch.linspace(-1, 1, vocab).unsqueeze(0)
    ctx = context([tokens[:2]], [tokens[2:]], vocab)          # prompt and generated both count
    out = run(Dry, [{"multiplier": 1.0, "base": 2.0, "allowed_length": 2, **params}], x, ctx)
    expected = x.clone()
    for t, p in penalties.items():
        expected[0, t] -= p
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_dry_mixed_batch_and_huge_penalties_stay_finite():
    tokens = [[4] * 40, [4] * 40, [4] * 40]
    x = torch.zeros(3, 6)
    ctx = context([t[:3] for t in tokens], [t[3:] for t in tokens], 6)
    out = run(Dry, [{"multiplier": 1e30, "base": 100.0, "allowed_length": 1}, {},
                    {"multiplier": 1.0, "base": 1.0}], x, ctx)
    assert torch.isfinite(out).all() and out[0, 4] < -1e38
    assert torch.equal(out[1], x[1])
    assert out[2].tolist() == [0, 0, 0, 0, -1.0, 0]


def test_repetition_penalty_golden_with_window():
    x = torch.tensor([[2.0, -2.0, 1.0, 4.0]])
    ctx = context([[0, 1]], [[3, 2]], vocab=4)               # context 0 1 | 3 2
    assert run(RepetitionPenalty, [{"repetition_penalty": 2.0}], x, ctx).tolist() == [[1.0, -4.0, 0.5, 2.0]]
    assert run(RepetitionPenalty, [{"repetition_penalty": 2.0, "last_n": 2}], x, ctx).tolist() == [[2.0, -2.0, 0.5, 2.0]]
    assert run(RepetitionPenalty, [{"repetition_penalty": 2.0, "include_prompt": False}], x, ctx).tolist() \
        == [[2.0, -2.0, 0.5, 2.0]]


def test_context_select_rows_keeps_prompts_aligned():
    ctx = context([[1], [2, 3], [4, 5, 6]], [[7], [8], [9]], vocab=10)
    ctx.prompt_tensor()                                   # cached before the selection
    ctx.select_rows([2, 0, 0])
    ids = ctx.context_ids()
    assert [[t for t in row if t >= 0] for row in ids.tolist()] == [[4, 5, 6, 9], [1, 7], [1, 7]]
    assert ctx.context_ids(include_prompt=False)[:, -1].tolist() == [9, 7, 7]


# -- the decode loop (bigram backend) ------------------------------------------------------------

def make(pipeline, sampler="greedy", **generation):
    config = {"backend": "bigram", "pipeline": list(pipeline), "sampler": sampler,
              "generation": {"max_new_tokens": 40, **generation}}
    return Generator(config, backend=BigramBackend(), registry=REGISTRY)


def test_loop_repetition_penalty_never_repeats_within_the_window():
    prompts = ["The quick", "She sells", "A bird"]
    plain = make([]).generate(prompts)
    assert any(len(set(c.token_ids[i:i + 6])) < 6 for c in plain for i in range(len(c.token_ids)))   # greedy loops
    out = make([{"repetition_penalty": {"repetition_penalty": 1e4, "last_n": 5, "include_prompt": False}}],
               ignore_eos=True).generate(prompts)
    for c in out:
        assert len(c.token_ids) == 40
        for i in range(len(c.token_ids)):
            window = c.token_ids[i:i + 6]
            assert len(set(window)) == len(window), (c.text, window)


def test_loop_min_tokens_never_ends_early():
    gen = make([{"temperature": 2.0}], sampler={"name": "categorical", "seed": 3}, max_new_tokens=60, n=16)
    plain = gen.generate("Paris.")
    assert any(c.finish_reason == "stop" and len(c.token_ids) < 12 for c in plain)
    gen = make([{"min_tokens": 12}, {"temperature": 2.0}], sampler={"name": "categorical", "seed": 3},
               max_new_tokens=60, n=16)
    for c in gen.generate("Paris."):
        assert len(c.token_ids) >= 12 and EOS_ID not in c.token_ids


def test_loop_allowed_tokens_only_emits_allowed_ids():
    allowed = sorted(set(b"the a"))
    out = make([{"allowed_tokens": allowed}, {"temperature": 1.5}], sampler={"name": "categorical", "seed": 0},
               n=4).generate(["The capital", "x"])
    for c in out:
        assert c.token_ids and set(c.token_ids) <= set(allowed)
        assert c.finish_reason == "length"                 # EOS is not allowed


def test_loop_penalties_and_bans_together():
    pipeline = [{"bad_words": [[ord("e")], [ord("t"), ord("h")]]}, {"no_repeat_ngram": 3}, {"frequency_penalty": 0.5},
                {"presence_penalty": 0.3}, {"logit_bias": {"bias": {ord("z"): -100.0}}},
                {"dry": {"multiplier": 0.8, "sequence_breakers": [ord(".")]}}]
    out = make(pipeline, ignore_eos=True).generate(["The capital", "th"])
    for c in out:
        ids = c.token_ids
        assert ord("e") not in ids and ord("z") not in ids
        full = [*c.prompt_token_ids, *ids]
        assert all(not (a == ord("t") and b == ord("h")) for a, b in zip(full[len(c.prompt_token_ids) - 1:], ids))
        grams = [tuple(full[i:i + 3]) for i in range(len(full) - 2)]
        assert len(grams) == len(set(grams))


def test_loop_min_tokens_also_delays_stop_token_ids():
    plain = make([], stop_token_ids=[ord(" ")]).generate(["The quick", "A bird"])
    assert all(c.finish_reason == "stop" and len(c.token_ids) < 8 for c in plain)
    out = make([{"min_tokens": 8}], stop_token_ids=[ord(" ")]).generate(["The quick", "A bird"])
    assert all(len(c.token_ids) >= 8 and ord(" ") not in c.token_ids for c in out)


def test_bad_words_strings_are_tokenized_by_the_backend_in_the_decode_loop():
    config = {"backend": "bigram", "sampler": "greedy", "generation": {"max_new_tokens": 60}}
    free = samplerkit.generate(["T"], {**config, "pipeline": []})[0].text
    banned = samplerkit.generate(["T"], {**config, "pipeline": [{"bad_words": {"words": ["he", " is"]}}]})[0].text
    assert "he" in free and " is" in free
    assert "he" not in banned and " is" not in banned


def test_bad_words_strings_outside_the_decode_loop_are_a_clear_error():
    pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": [{"bad_words": {"words": ["he"]}}]})
    with pytest.raises(samplerkit.PluginError, match="needs the model's tokenizer"):
        pipe.process(torch.zeros(1, 258))
