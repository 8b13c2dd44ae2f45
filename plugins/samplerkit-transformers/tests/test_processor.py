"""The LogitsProcessor path: `model.generate` with a samplerkit pipeline picks exactly the tokens
`samplerkit.Generator` picks on the same model, prompts and seeds."""

from __future__ import annotations

import warnings

import pytest
import torch
from samplerkit_transformers import NEUTRAL_GENERATE_KWARGS, SamplerkitLogitsProcessor, generate_kwargs

import samplerkit

PROMPTS = ["The quick brown fox", "Pack my box with five dozen liquor jugs. Sphinx", "12", "judge my"]
SEEDS = [11, 22, 33, 44]
MAX_NEW = 12
EOS = 1

PIPELINES = {
    "categorical": {"sampler": "categorical"},
    "temperature_top_k_top_p": {"pipeline": [{"temperature": 0.8}, {"top_k": 20}, {"top_p": 0.9}],
                                "sampler": "categorical"},
    # history: the prompt (without its padding) and the generated tokens, plus EOS ids
    "history": {"pipeline": [{"repetition_penalty": 1.5}, {"min_tokens": 4}, {"temperature": 1.3}],
                "sampler": "categorical"},
    # EOS made likely: rows end at different steps (the decode loop drops them, transformers
    # keeps them with padding), after at least 2 tokens (min_tokens reads the EOS ids)
    # strings tokenized through the step context (the tokenizer passed to generate_kwargs)
    "bad_words": {"pipeline": [{"bad_words": {"words": [" the", "e", "o", "a"]}}, {"top_k": 5}],
                  "sampler": "categorical"},
    "rows_finish": {"pipeline": [{"logit_bias": {"bias": {EOS: 5.0}}}, {"min_tokens": 2}], "sampler": "categorical"},
}


def left_padded(backend, prompts):
    """The prompts as the decode loop tokenizes them, left-padded as a transformers batch."""
    ids = [backend.tokenize(p) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), EOS, dtype=torch.int64)
    mask = torch.zeros((len(ids), width), dtype=torch.int64)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def new_tokens(out, width):
    """Generated ids per row, up to (not including) the first EOS: as `Completion.token_ids`."""
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[:row.index(EOS)] if EOS in row else row)
    return rows


def hf_generate(backend, hf_model, inputs, pipeline, **kw):
    """``model.generate`` with the pipeline choosing; the backend's tokenizer serves string steps."""
    kw = generate_kwargs(pipeline, inputs, model=hf_model, tokenizer=backend.tokenizer, max_new_tokens=MAX_NEW, **kw)
    with torch.no_grad():
        out = hf_model.generate(**inputs, **kw, pad_token_id=EOS)
    return new_tokens(out, inputs["input_ids"].shape[1])


def run_config(backend, pipeline, **generation):
    """A run on the already loaded backend (the config names it; passing it skips a reload)."""
    return {"backend": {"name": "transformers", "model": str(backend.model_path)}, **pipeline,
            "generation": {"max_new_tokens": MAX_NEW, **generation}}


def samplerkit_generate(backend, pipeline, **kw):
    gen = samplerkit.Generator(run_config(backend, pipeline), backend=backend)
    return [r.token_ids for r in gen.generate(PROMPTS, **kw)]


@pytest.mark.parametrize("name", PIPELINES)
def test_same_tokens_as_the_generator(name, backend, hf_model):
    pipeline = PIPELINES[name]
    inputs = left_padded(backend, PROMPTS)
    assert len(set(inputs["attention_mask"].sum(-1).tolist())) == len(PROMPTS)   # real padding
    expected = samplerkit_generate(backend, pipeline, seeds=SEEDS)
    assert hf_generate(backend, hf_model, inputs, pipeline, seeds=SEEDS) == expected
    assert sum(map(len, expected)) >= 2 * len(PROMPTS)                # not trivially short
    if name == "rows_finish":
        assert len({len(t) for t in expected}) > 1 and max(map(len, expected)) < MAX_NEW
    # A pipeline object works as well as a config.
    assert hf_generate(backend, hf_model, inputs, samplerkit.load_pipeline(pipeline), seeds=SEEDS) == expected


def test_same_tokens_with_n_samples_per_prompt_and_the_sampler_seed(backend, hf_model):
    pipeline = {"pipeline": [{"top_p": 0.95}], "sampler": {"name": "categorical", "seed": 5}}
    gen = samplerkit.Generator(run_config(backend, pipeline, n=3), backend=backend)
    expected = [r.token_ids for r in gen.generate(PROMPTS[:2])]
    inputs = left_padded(backend, PROMPTS[:2])
    assert hf_generate(backend, hf_model, inputs, pipeline, num_return_sequences=3) == expected
    assert len({tuple(t) for t in expected}) > 1                      # the samples differ


def test_same_seed_precedence_as_the_generator(backend, hf_model):
    # seeds entry, else the row override's sampler seed, else the config's; n samples each.
    pipeline = {"pipeline": [{"temperature": 0.9}], "sampler": {"name": "categorical", "seed": 7}}
    seeds = [None, 3, None]
    rows = [{"categorical": {"seed": 9}}, {"temperature": {"temperature": 0.5}}, None]
    gen = samplerkit.Generator(run_config(backend, pipeline, n=2), backend=backend)
    expected = [r.token_ids for r in gen.generate(PROMPTS[:3], seeds=seeds, rows=rows)]
    inputs = left_padded(backend, PROMPTS[:3])
    assert hf_generate(backend, hf_model, inputs, pipeline, seeds=seeds, rows=rows, num_return_sequences=2) == expected


def test_transformers_own_defaults_cannot_change_the_tokens(backend, hf_model, monkeypatch):
    # A checkpoint's generation_config.json may set warpers and penalties; the neutral kwargs
    # override every one of them.
    for key, value in dict(do_sample=True, temperature=0.3, top_k=3, top_p=0.5, repetition_penalty=1.8,
                           no_repeat_ngram_size=2, suppress_tokens=[5, 6], min_p=0.2, min_new_tokens=5).items():
        monkeypatch.setattr(hf_model.generation_config, key, value)
    pipeline = PIPELINES["temperature_top_k_top_p"]
    assert hf_generate(backend, hf_model, left_padded(backend, PROMPTS), pipeline, seeds=SEEDS) == \
        samplerkit_generate(backend, pipeline, seeds=SEEDS)


def test_greedy_generate_call_gives_the_same_tokens(backend, hf_model):
    # The one-hot survives argmax too: do_sample=False picks the pipeline's token.
    pipeline = PIPELINES["categorical"]
    inputs = left_padded(backend, PROMPTS)
    kw = {**generate_kwargs(pipeline, inputs, seeds=SEEDS, max_new_tokens=MAX_NEW), "do_sample": False}
    with torch.no_grad():
        out = hf_model.generate(**inputs, **kw, pad_token_id=EOS)
    assert new_tokens(out, inputs["input_ids"].shape[1]) == samplerkit_generate(backend, pipeline, seeds=SEEDS)


def test_prompt_history_skips_left_padding(backend):
    inputs = left_padded(backend, PROMPTS)
    proc = generate_kwargs({"sampler": "greedy"}, inputs)["logits_processor"][0]
    proc(inputs["input_ids"], torch.zeros(len(PROMPTS), 300))
    assert proc.ctx.prompt_ids == [backend.tokenize(p) for p in PROMPTS]


def test_scores_are_one_hot_and_the_processor_is_reusable(backend):
    proc = SamplerkitLogitsProcessor({"sampler": {"name": "categorical", "seed": 1}}, prompt_length=3)
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    scores = torch.randn(2, 50)
    first = proc(prompt, scores)
    assert first.shape == scores.shape and (first == 0).sum().item() == 2
    assert torch.isinf(first).sum().item() == 2 * 49
    chosen = first.argmax(-1)
    second = proc(torch.cat([prompt, chosen[:, None]], 1), scores)
    assert proc.ctx.num_generated.tolist() == [1, 1]
    assert proc(prompt, scores).argmax(-1).tolist() == chosen.tolist()          # a new batch: same draws
    assert proc.ctx.num_generated.tolist() == [0, 0] and second.shape == scores.shape


def test_history_grows_past_the_initial_buffer():
    proc = SamplerkitLogitsProcessor({"pipeline": [{"repetition_penalty": 1.2}], "sampler": "greedy"},
                                     prompt_length=1, max_new_tokens=2)
    ids = torch.tensor([[3]])
    for _ in range(6):
        out = proc(ids, torch.randn(1, 20))
        ids = torch.cat([ids, out.argmax(-1, keepdim=True)], 1)
    assert proc.ctx.generated[0, :5].tolist() == ids[0, 1:6].tolist()


def test_out_of_order_calls_and_bad_lengths_are_errors():
    proc = SamplerkitLogitsProcessor({"sampler": "greedy"}, prompt_length=2, seeds=[1, 2])
    with pytest.raises(RuntimeError, match="once per generated token"):
        proc(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="seeds has 2 entries for 1 prompts"):
        proc(torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 5))


def test_neutral_kwargs_are_known_to_the_installed_transformers(hf_model, monkeypatch):
    from transformers import GenerationConfig

    known = GenerationConfig().to_dict()
    assert set(NEUTRAL_GENERATE_KWARGS) <= set(known)
    kw = generate_kwargs({"sampler": "greedy"}, torch.tensor([[1, 2]]))
    assert kw["do_sample"] is True and kw["top_k"] == 0 and kw["temperature"] == 1.0 and kw["top_p"] == 1.0
    # Transformers builds no processor or warper of its own besides ours, even when the
    # checkpoint's generation config asks for some (private API: a white-box check).
    for key, value in dict(top_k=3, repetition_penalty=1.8, min_new_tokens=5, suppress_tokens=[5]).items():
        monkeypatch.setattr(hf_model.generation_config, key, value)
    config, _ = hf_model._prepare_generation_config(None, **{k: v for k, v in kw.items() if k != "logits_processor"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        built = hf_model._get_logits_processor(config, input_ids_seq_length=2, logits_processor=kw["logits_processor"])
    assert [type(p).__name__ for p in built] == ["SamplerkitLogitsProcessor"]
