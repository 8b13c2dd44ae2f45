"""``segments:`` on the default model (SmolLM2-135M-Instruct, chat prompts): the reasoning shape
(free text until ``</think>``, forced after its budget, then a JSON schema at a low temperature)
and seeded rows that equal themselves alone while the batch holds rows in other segments."""

from __future__ import annotations

import json

import jsonschema
import pytest

from samplerkit import Generator
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
