"""The ``llamacpp`` backend on the default SmolLM2 GGUF, against samplerkit's own ``llama`` backend.

llama.cpp computes with the quantized (Q4_1) weights, the ``llama`` backend with weights dequantized
to float32, so logits are compared loosely. Measured here (llama-cpp-python 0.3.36, 4 prompts):
same argmax, top-5 overlap 4-5 of 5, max |logit difference| 0.47-0.96, correlation >= 0.999,
max |probability difference| <= 0.026. A row's logits are bitwise the same alone or in a batch.
"""

from __future__ import annotations

import pytest
import torch

import samplerkit
from samplerkit.errors import GenerationError

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


def test_vocabulary_matches_the_llama_backend(backend, reference):
    assert backend.vocab_size == reference.vocab_size == 49152
    assert reference.eos_token_ids <= backend.eos_token_ids        # llama.cpp's end-of-generation set
    for text in [*PROMPTS, " héllo wörld 123\n\n"]:
        ids = backend.tokenize(text)
        assert ids == reference.tokenize(text)
        assert backend.detokenize(ids) == reference.detokenize(ids)
    assert backend.apply_chat_template("hi") == reference.apply_chat_template("hi")
    assert backend.max_context == 2048


def test_first_step_logits_close_to_the_llama_backend(backend, reference):
    ids = [backend.tokenize(p) for p in PROMPTS]
    ours, theirs = backend.prefill(ids).last, reference.prefill(ids).last
    assert ours.shape == theirs.shape == (len(PROMPTS), 49152) and ours.dtype == torch.float32
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    for a, b in zip(ours, theirs):
        overlap = set(torch.topk(a, 5).indices.tolist()) & set(torch.topk(b, 5).indices.tolist())
        assert len(overlap) >= 4
        assert (a - b).abs().max() < 1.5
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.998
        assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.05


def test_rows_do_not_depend_on_the_batch(backend):
    ids = [backend.tokenize(p) for p in PROMPTS]
    together = backend.prefill(ids).last
    nxt = together.argmax(-1)
    stepped = backend.step(nxt)
    for i in range(len(ids)):
        assert torch.equal(backend.prefill([ids[i]]).last[0], together[i])
        assert torch.allclose(backend.step(nxt[i:i + 1])[0], stepped[i], atol=1e-4)


def test_keep_all_logits(backend):
    ids = [backend.tokenize(p) for p in PROMPTS[:2]]
    out = backend.prefill(ids, keep_all_logits=True)
    assert [t.shape for t in out.all] == [(len(i), 49152) for i in ids]
    assert torch.equal(out.last, torch.stack([t[-1] for t in out.all]))
    assert torch.equal(out.last, backend.prefill(ids).last)


def test_select_rows_keeps_and_duplicates(backend):
    a, b = (backend.tokenize(p) for p in PROMPTS[:2])
    first = backend.prefill([a, b]).last
    backend.select_rows([1, 1, 0])
    tok = torch.tensor([first[1].argmax(), first[1].argmax(), first[0].argmax()])
    fanned = backend.step(tok)
    assert torch.allclose(fanned[0], fanned[1], atol=1e-5)
    alone = backend.prefill([b]).last
    assert torch.allclose(backend.step(alone.argmax(-1))[0], fanned[0], atol=1e-4)
    backend.prefill([a, b])
    backend.select_rows([0])                 # row 1 finished: its sequence is dropped
    assert torch.allclose(backend.step(tok[2:])[0], fanned[2], atol=1e-4)


def test_too_many_rows(backend):
    with pytest.raises(GenerationError, match="n_seq"):
        backend.prefill([[1]] * 9)
    backend.prefill([[1]] * 8)
    with pytest.raises(GenerationError, match="n_seq"):
        backend.select_rows(list(range(8)) + [0])


def test_greedy_generate_paris(backend):
    config = ({"backend": "llamacpp", "pipeline": [], "sampler": "greedy",
                                       "generation": {"max_new_tokens": 4}})
    out = samplerkit.generate(["The capital of France is"], config, backend=backend)
    assert out[0].text.startswith(" Paris")


def test_sampled_generation_with_n_samples(backend):
    config = ({"backend": "llamacpp", "pipeline": [{"temperature": 0.8}, {"top_p": 0.95}],
                                       "sampler": {"name": "categorical", "seed": 7},
                                       "generation": {"max_new_tokens": 6, "n": 3}})
    first = samplerkit.generate(["Once upon a time", "The sky is"], config, backend=backend)
    again = samplerkit.generate(["Once upon a time", "The sky is"], config, backend=backend)
    assert len(first) == 6 and [c.text for c in first] == [c.text for c in again]
