"""``segments:`` on the default model (SmolLM2-135M-Instruct, chat prompts): the reasoning shape
(free text until ``</think>``, forced after its budget, then a JSON schema at a low temperature)
and seeded rows that equal themselves alone while the batch holds rows in other segments."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from samplerkit import Generator
from samplerkit.generate import _Run
from samplerkit.registry import default_registry

pytest.importorskip("llguidance")
pytestmark = [pytest.mark.slow]

REGISTRY = default_registry()
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
          "required": ["city"], "additionalProperties": False}
BUDGET = 8
SEGMENTS = [
    {"until": "</think>", "max_tokens": BUDGET, "pipeline": [{"temperature": 0.8}, {"top_p": 0.95}]},
    {"json_schema": {"schema": SCHEMA, "whitespace_flexible": False}, "pipeline": [{"temperature": 0.2}], "until": "\n"},
    {"max_tokens": 3, "pipeline": [{"temperature": 1.0}]},
]
PROMPTS = ["What is the capital of France? Think, then answer in JSON.",
           "Name a big city in Japan. Think first, then give JSON with the city.",
           "Say hello."]


@pytest.fixture(scope="module")
def generator():
    from samplerkit.builtins.backends.llama import LlamaBackend

    config = {"backend": "llama", "pipeline": [{"temperature": 0.6}], "sampler": {"name": "categorical", "seed": 5},
              "generation": {"max_new_tokens": 40, "chat": True, "logprobs": 0}, "segments": SEGMENTS}
    return Generator(config, backend=LlamaBackend(), registry=REGISTRY)


@pytest.fixture(scope="module")
def batch(generator):
    """Two segmented rows and one with its own pipeline (no segments), in one call."""
    return generator.generate(PROMPTS, seeds=[1, 2, 3], pipelines=[None, None, {"pipeline": [{"temperature": 0.7}]}])


def test_reasoning_then_json_with_the_budget_forcing_the_closing_string(generator, batch):
    closing = generator.backend.tokenize("</think>", add_special=False)
    for c in batch[:2]:
        think, sep, rest = c.text.partition("</think>")
        assert sep, c.text
        answer = rest.split("\n", 1)[0]
        jsonschema.validate(json.loads(answer), SCHEMA)
        # The model never writes </think> itself here: the budget forced it, token by token.
        assert c.token_ids[BUDGET:BUDGET + len(closing)] == closing
        assert [lp.forced for lp in c.logprobs[BUDGET - 1:BUDGET + len(closing) + 1]] == \
            [False, *[True] * len(closing), False]
        assert all(lp.processed_logprob is None for lp in c.logprobs if lp.forced)
        # After the JSON's closing "\n" (forced), the last segment spends its 3 tokens.
        if c.finish_reason == "length" and "\n" in rest:
            assert len(c.token_ids) - c.token_ids.index(generator.backend.tokenize("\n", add_special=False)[0],
                                                        BUDGET + len(closing)) - 1 == 3
    assert "</think>" not in batch[2].text


def test_a_seeded_row_alone_equals_the_row_in_a_mixed_batch(generator, batch):
    (alone,) = generator.generate([PROMPTS[1]], seeds=[2])
    assert (alone.text, alone.token_ids, alone.finish_reason) == (batch[1].text, batch[1].token_ids,
                                                                   batch[1].finish_reason)


def test_a_closing_string_inside_a_token_before_a_constraint_ends_the_segment_exactly(generator):
    """`until: "e"` is inside many tokens (" there", "Hello"); before a constrained segment the
    tokens that would write past it are masked, so the text is: no "e", then "e", then exactly
    what the regex allows (nothing of the closing token spills into the constrained text)."""
    config = {"backend": "llama", "pipeline": [{"temperature": 1.0}], "sampler": {"name": "categorical", "seed": 1},
              "generation": {"max_new_tokens": 16, "chat": True},
              "segments": [{"until": "e", "max_tokens": 8}, {"regex": {"pattern": "[0-9]{2}"}}]}
    gen = Generator(config, backend=generator.backend.inner, registry=REGISTRY)
    out = gen.generate(["Tell me about the weather there."] * 4, seeds=[1, 2, 3, 4])
    for c in out:
        assert re.fullmatch(r"[^e]*e[0-9]{2}", c.text), c.text
    closing = dict(gen._overrun["e"]) if "e" in gen._overrun else {}
    assert closing.get(b"")        # the vocabulary has tokens with text after an "e": the mask mattered
    # docs/segments.md's example: after "</think" the tokens "></" and ">." would overrun.
    after = dict(_Run(gen, ["x"], None, None, {}).overrun_ids("</think>"))[b"</think"]
    assert {"></", ">."} <= {gen.backend.detokenize([i]) for i in after}
