"""A modest soak of the decode loop on the bigram backend: every row gets the right ending."""

from __future__ import annotations

import pytest

import samplerkit
from samplerkit.builtins.backends.bigram import EOS_ID, BigramBackend
from samplerkit.errors import GenerationError


class EosFirstBigram(BigramBackend):
    """Bigram model whose first step after a prompt ending in "!" is always EOS."""

    name = "eos_first_bigram"

    def prefill(self, prompts, *, keep_all_logits=False):
        out = super().prefill(prompts, keep_all_logits=keep_all_logits)
        for row, prompt in enumerate(prompts):
            if prompt and prompt[-1] == ord("!"):
                out.last[row] = float("-inf")
                out.last[row, EOS_ID] = 0.0
        return out


def test_soak_32_rows_512_tokens():
    stops = ["he ", "s. T"]                      # multi-byte: each spans token boundaries
    config = {"backend": "bigram", "pipeline": [{"temperature": 1.0}, {"top_p": 0.95}],
              "sampler": {"name": "categorical", "seed": 11},
              "generation": {"max_new_tokens": 512, "stop": stops, "n": 2}}
    prompts = ["", "The", "A bird", "x" * 40, "She sells", "!"] + [f"Row {i}:" for i in range(10)]
    gen = samplerkit.Generator(config, backend=EosFirstBigram())
    streamed: dict[tuple[int, int], list[str]] = {}
    finish: dict[tuple[int, int], str] = {}
    for delta in gen.stream(prompts):
        key = (delta.prompt_index, delta.sample_index)
        assert key not in finish, "a row kept streaming after it finished"
        streamed.setdefault(key, []).append(delta.text)
        if delta.finish_reason:
            finish[key] = delta.finish_reason
    results = gen.generate(prompts)
    assert len(results) == 2 * len(prompts) == 32
    assert set(finish) == {(c.prompt_index, c.sample_index) for c in results}
    for c in results:
        key = (c.prompt_index, c.sample_index)
        assert c.finish_reason == finish[key] in ("stop", "length")
        assert "".join(streamed[key]) == c.text
        assert all(s not in c.text for s in stops)
        assert len(c.token_ids) <= 512
        if c.finish_reason == "length":
            assert len(c.token_ids) == 512
    eos_first = [c for c in results if c.prompt == "!"]
    assert all(c.finish_reason == "stop" and c.token_ids == [] and c.text == "" for c in eos_first)
    assert results[0].text != results[1].text or results[0].token_ids != results[1].token_ids


def test_max_new_tokens_zero_returns_empty_length_results():
    out = samplerkit.generate(["a", "bc"], {"backend": "bigram", "generation": {"max_new_tokens": 0, "n": 2}})
    assert [(c.text, c.token_ids, c.finish_reason) for c in out] == [("", [], "length")] * 4


def test_prompt_longer_than_context_is_a_clear_error():
    config = {"backend": {"name": "bigram", "max_context": 8}}
    with pytest.raises(GenerationError, match=r"prompt 1 has 11 tokens, but the model's context holds 8"):
        samplerkit.generate(["ok", "0123456789"], config)


def test_context_end_finishes_with_length():
    out = samplerkit.generate(["abc"], {"backend": {"name": "bigram", "max_context": 10},
                                        "generation": {"max_new_tokens": 100, "ignore_eos": True}})
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 10 - 4   # BOS + 3 bytes
