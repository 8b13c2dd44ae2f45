"""Constrained steps on the llamacpp backend: token bytes from llama_token_to_piece give the same
masks as the llama backend's tokenizer JSON on the same model."""

from __future__ import annotations

import json

import pytest
import torch

from samplerkit import Generator
from samplerkit.builtins.structured import JsonSchema
from samplerkit.context import StepContext

pytest.importorskip("llguidance")
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


def _allowed(backend, text):
    ctx = StepContext(1, backend.vocab_size, uses=frozenset({"generated"}), max_new_tokens=32,
                      token_vocabulary=backend.token_vocabulary)
    step = JsonSchema([JsonSchema.Params(schema=SCHEMA)])
    for t in backend.tokenize(text, add_special=False):
        ctx.append(torch.tensor([t]))
    out = step.apply(torch.zeros(1, backend.vocab_size), ctx)
    return set(torch.isfinite(out[0]).nonzero().squeeze(-1).tolist())


@pytest.mark.parametrize("prefix", ["", '{"ok":', '{"ok": tr', '{"ok":true}'])
def test_masks_equal_the_llama_backends(backend, reference, prefix):
    # Text tokens agree; each backend ends a complete row with its own EOS ids (llama.cpp's
    # end-of-generation set is larger than the GGUF's eos_token_id).
    mine, theirs = _allowed(backend, prefix), _allowed(reference, prefix)
    assert mine - backend.eos_token_ids == theirs - reference.eos_token_ids
    if prefix.endswith("}"):
        assert mine == set(backend.eos_token_ids) and theirs == set(reference.eos_token_ids)


def test_json_schema_through_the_llamacpp_backend(backend):
    gen = Generator({"backend": {"name": "llamacpp"}, "pipeline": [{"json_schema": {"schema": SCHEMA}}],
                     "sampler": "greedy", "generation": {"max_new_tokens": 16}}, backend=backend)
    (c,) = gen.generate(["Is the sky blue? Answer in JSON:"])
    assert c.finish_reason == "stop" and isinstance(json.loads(c.text)["ok"], bool)
