"""The `transformers` backend against transformers' own forward pass on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from samplerkit_transformers import TransformersBackend, TransformersParams
from samplerkit_transformers.backend import select_cache_rows

import samplerkit
from samplerkit import ModelNotFoundError

PROMPTS = ["The quick brown fox", "Pack my box with five dozen liquor jugs. Sphinx", "12"]
ATOL = 1e-4


def reference(hf_model, ids: list[int]) -> torch.Tensor:
    """Next-token logits of one unpadded sequence, no cache: ``[V]``."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0, -1].float()


def config(model_dir, **extra):
    return {"backend": {"name": "transformers", "model": str(model_dir)}, **extra}


def test_prefill_and_cached_steps_match_direct_forward(backend, hf_model):
    prompts = [backend.tokenize(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3                 # different lengths: left padding
    out = backend.prefill(prompts)
    assert out.last.dtype == torch.float32 and out.last.shape == (3, backend.vocab_size)
    seqs = [list(p) for p in prompts]
    logits = out.last
    for step in range(5):
        for i, seq in enumerate(seqs):
            torch.testing.assert_close(logits[i], reference(hf_model, seq), atol=ATOL, rtol=0,
                                       msg=lambda m, i=i, step=step: f"row {i} after {step} steps: {m}")
        nxt = logits.argmax(-1)
        for seq, t in zip(seqs, nxt.tolist()):
            seq.append(t)
        logits = backend.step(nxt)


def test_keep_all_logits_matches_forward(backend, hf_model):
    prompts = [backend.tokenize(p) for p in PROMPTS]
    out = backend.prefill(prompts, keep_all_logits=True)
    for ids, every in zip(prompts, out.all):
        with torch.no_grad():
            expected = hf_model(torch.tensor([ids])).logits[0].float()
        assert every.shape == expected.shape
        torch.testing.assert_close(every, expected, atol=ATOL, rtol=0)


def test_select_rows_drops_and_duplicates_rows(backend, hf_model):
    prompts = [backend.tokenize(p) for p in PROMPTS]
    backend.prefill(prompts)
    seqs = [list(p) for p in prompts]
    logits = backend.step(torch.tensor([5, 6, 7]))
    seqs = [s + [t] for s, t in zip(seqs, [5, 6, 7])]
    for keep, nxt in (([2, 0, 0, 1], [10, 11, 12, 13]), ([3, 1], [20, 21]), ([1, 1, 0], [30, 31, 32])):
        backend.select_rows(keep)
        seqs = [list(seqs[k]) for k in keep]
        logits = backend.step(torch.tensor(nxt))
        seqs = [s + [t] for s, t in zip(seqs, nxt)]
        assert logits.shape[0] == len(keep)
        for i, seq in enumerate(seqs):
            torch.testing.assert_close(logits[i], reference(hf_model, seq), atol=ATOL, rtol=0)


def test_select_cache_rows_on_legacy_tuples():
    k = torch.arange(3.0).view(3, 1, 1, 1)
    out = select_cache_rows(((k, k + 10),), torch.tensor([2, 2, 0]))
    assert out[0][0].flatten().tolist() == [2.0, 2.0, 0.0] and out[0][1].flatten().tolist() == [12.0, 12.0, 10.0]


def test_vocabulary_eos_and_chat_template(backend):
    assert backend.eos_token_ids == frozenset({1})
    assert backend.vocab_size == 300 and backend.max_context == 256
    ids = backend.tokenize("The quick brown fox")
    assert backend.detokenize(ids) == "The quick brown fox"
    assert backend.detokenize([*ids, 1]) == "The quick brown fox"        # EOS is not rendered
    assert backend.apply_chat_template("Hi") == "<|user|>Hi</s><|assistant|>"


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model directory"):
        TransformersBackend(TransformersParams(model=str(tmp_path / "nope")))


def test_generate_end_to_end(model_dir, hf_model):
    cfg = config(model_dir, sampler="greedy", generation={"max_new_tokens": 6, "ignore_eos": True})
    results = samplerkit.generate(PROMPTS, cfg)
    assert [r.prompt_index for r in results] == [0, 1, 2]
    assert all(len(r.token_ids) == 6 and r.finish_reason == "length" for r in results)
    # Greedy through samplerkit's loop equals transformers' own greedy decoding, row by row.
    for r in results:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([r.prompt_token_ids]), do_sample=False, max_new_tokens=6,
                                    min_new_tokens=6, pad_token_id=1)
        assert r.token_ids == out[0, len(r.prompt_token_ids):].tolist()


def test_generate_with_fan_out_echo_and_chat(model_dir):
    gen = samplerkit.Generator(config(model_dir, sampler={"name": "categorical", "seed": 3},
                                      generation={"max_new_tokens": 4, "n": 3, "echo": True, "logprobs": 2}))
    results = gen.generate(["The quick", "Pack my box"])
    assert [(r.prompt_index, r.sample_index) for r in results] == [(i, j) for i in range(2) for j in range(3)]
    for r in results:
        assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(r.prompt_token_ids)
        assert len(r.logprobs) == len(r.token_ids) and all(len(lp.top) == 2 for lp in r.logprobs)
    chat = gen.generate("Hi", chat=True, n=1, echo=False, logprobs=None)[0]
    assert chat.prompt_token_ids == gen.backend.tokenize("<|user|>Hi</s><|assistant|>")
    assert 1 in chat.prompt_token_ids                        # the template's </s> is one special token
