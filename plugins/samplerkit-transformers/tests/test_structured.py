"""Constrained steps on the transformers backend: its fast tokenizer is the engine's vocabulary."""

from __future__ import annotations

import re

import pytest

from samplerkit import Generator

pytest.importorskip("llguidance")


def test_regex_constraint_through_the_transformers_backend(backend, model_dir):
    vocab = backend.token_vocabulary()
    assert vocab is backend.token_vocabulary() and vocab.hf_tokenizer_json and vocab.vocab_size == backend.vocab_size
    pattern = "(yes|no), [a-z]{1,5}"
    gen = Generator({"backend": {"name": "transformers", "model": str(model_dir)}, "pipeline": [{"regex": {"pattern": pattern}}],
                     "sampler": {"name": "categorical", "seed": 1}, "generation": {"max_new_tokens": 16}},
                    backend=backend)
    out = gen.generate(["hello", "world"])
    for c in out:
        assert re.fullmatch(pattern, c.text) and c.finish_reason == "stop", c
