"""Per-row pipelines: ``Generator.generate(prompts, pipelines=[...])`` runs one forward pass for
all rows and samples each group of rows with the same pipeline through that pipeline."""

from __future__ import annotations

import pytest

from samplerkit import ConfigError, GenerationError, Generator, Pipeline
from samplerkit.builtins.backends.bigram import BigramBackend
from samplerkit.registry import default_registry

REGISTRY = default_registry()

#: Eight different pipelines: different steps, order and sampler.
PIPELINES = [
    None,                                                                  # the Generator's own
    "greedy",                                                              # a preset name
    {"pipeline": [{"temperature": 1.3}], "sampler": "categorical"},
    {"pipeline": [{"top_k": 5}, {"temperature": 0.7}], "sampler": "categorical"},
    {"pipeline": [{"temperature": 0.7}, {"top_k": 5}], "sampler": "categorical"},   # same steps, other order
    {"pipeline": [{"min_p": 0.05}, {"repetition_penalty": 1.3}], "sampler": "categorical"},
    {"pipeline": [], "sampler": "greedy"},
    {"preset": "min_p"},
]


def bigram_generator(**generation):
    config = {"backend": "bigram", "pipeline": [{"temperature": 0.9}], "sampler": "categorical",
              "generation": {"max_new_tokens": 24, **generation}}
    return Generator(config, backend=BigramBackend(), registry=REGISTRY)


def seeds_for(pipelines, base=100):
    """A seed per row whose pipeline takes one (greedy ones take none)."""
    gen = bigram_generator()
    return [base + i if gen.pipeline_for(p).takes_seed else None for i, p in enumerate(pipelines)]


def test_each_row_alone_equals_the_row_in_a_mixed_batch():
    gen = bigram_generator()
    prompts = [f"the {w} " for w in ("cat", "dog", "sea", "sun", "tea", "cake", "rain", "bird")] * 4   # 32 rows
    pipelines = PIPELINES * 4
    seeds = seeds_for(pipelines)
    batch = gen.generate(prompts, pipelines=pipelines, seeds=seeds)
    for i in range(len(prompts)):
        alone = gen.generate([prompts[i]], pipelines=[pipelines[i]], seeds=[seeds[i]])[0]
        assert batch[i].token_ids == alone.token_ids, i
        assert batch[i].prompt_index == i
    # The pipelines really differ: the same prompt and seed under two sampling pipelines differs.
    a = gen.generate(["the cat "] * 2, pipelines=PIPELINES[2:4], seeds=[7, 7])
    assert a[0].token_ids != a[1].token_ids


def test_a_row_pipeline_is_the_pipeline_of_that_config():
    """A mapping entry means what a YAML file with those keys means."""
    gen = bigram_generator()
    entry = PIPELINES[3]
    ours = gen.generate(["the sea "], pipelines=[entry], seeds=[5])[0]
    config = {"backend": "bigram", **entry, "generation": {"max_new_tokens": 24}}
    theirs = Generator(config, backend=BigramBackend(), registry=REGISTRY).generate(["the sea "], seeds=[5])[0]
    assert ours.token_ids == theirs.token_ids


def test_rows_of_one_pipeline_share_one_bound_pipeline_and_results_come_back_in_order():
    gen = bigram_generator()
    resolved = gen.pipeline_for(PIPELINES[3])
    assert gen.pipeline_for(dict(PIPELINES[3])) is resolved          # cached by content
    pipelines = [PIPELINES[3], None, PIPELINES[3], "greedy", None]
    out = gen.generate(["a", "b", "c", "d", "e"], pipelines=pipelines, n=2, seeds=[1, 2, 3, None, 5])
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, j) for i in range(5) for j in range(2)]
    assert out[6].token_ids == out[7].token_ids                      # greedy: both samples alike


def test_a_pipeline_object_and_stream_work():
    gen = bigram_generator()
    pipe = Pipeline.from_config(bigram_generator(max_new_tokens=5).config)
    deltas = list(gen.stream(["ab", "cd"], pipelines=[pipe, "greedy"], seeds=[3, None]))
    whole = gen.generate(["ab", "cd"], pipelines=[pipe, "greedy"], seeds=[3, None])
    for c in whole:
        text = "".join(d.text for d in deltas if d.prompt_index == c.prompt_index)
        assert text == c.text


def test_row_overrides_apply_to_the_rows_own_pipeline():
    gen = bigram_generator()
    out = gen.generate(["the cat ", "the cat "], pipelines=[PIPELINES[3], PIPELINES[3]],
                       rows=[None, {"top_k": {"top_k": 1}}], seeds=[9, 9])
    greedy_like = gen.generate(["the cat "], pipelines=[{"pipeline": [{"top_k": 1}], "sampler": "categorical"}],
                               seeds=[9])[0]
    assert out[1].token_ids == greedy_like.token_ids
    with pytest.raises(ConfigError, match=r"rows\[0\]: overrides name steps not in this pipeline: 'min_p'"):
        gen.generate(["x"], pipelines=[PIPELINES[3]], rows=[{"min_p": {"min_p": 0.1}}])


@pytest.mark.parametrize(("entry", "message"), [
    ({"pipeline": [{"top_p": {"top_p": 1.5}}]}, r"pipelines\[1\] pipeline\[0\] top_p"),
    ({"sampler": "nope"}, r"pipelines\[1\] sampler"),
    ({"backend": "bigram"}, r"pipelines\[1\]: 'backend' cannot be set per row"),
    ({"generation": {"n": 2}}, r"pipelines\[1\]: 'generation' cannot be set per row"),
    ("no_such_preset", r"pipelines\[1\]: unknown preset 'no_such_preset'"),
    (42, r"pipelines\[1\]: must be None, a preset name, a Pipeline or a mapping"),
])
def test_bad_entries_are_named_by_row_and_location(entry, message):
    gen = bigram_generator()
    with pytest.raises(ConfigError, match=message):
        gen.generate(["a", "b"], pipelines=[None, entry])


def test_pipelines_length_and_seed_errors():
    gen = bigram_generator()
    with pytest.raises(GenerationError, match=r"pipelines has 1 entries for 2 prompts"):
        gen.generate(["a", "b"], pipelines=[None])
    with pytest.raises(ConfigError, match=r"seeds\[1\] \(pipelines\[1\]\): no step of this pipeline takes a seed"):
        gen.generate(["a", "b"], pipelines=[None, "greedy"], seeds=[1, 2])


# -- the default model (slow) --------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_row_alone_equals_row_in_32_rows_with_8_pipelines(default_model_path):
    gen = Generator({"generation": {"max_new_tokens": 2}})
    words = ["The sky is", "Once upon", "def f(x):", "Colors:", "I like", "Today", "In 1969,", "Rain:"]
    prompts = [words[(i * 3) % 8] for i in range(32)]
    pipelines = PIPELINES * 4
    seeds = [None if not gen.pipeline_for(p).takes_seed else 1000 + i for i, p in enumerate(pipelines)]
    batch = gen.generate(prompts, pipelines=pipelines, seeds=seeds)
    for i in (2, 13, 31):                # seeded rows of three sampling pipelines, alone
        alone = gen.generate([prompts[i]], pipelines=[pipelines[i]], seeds=[seeds[i]])[0]
        assert batch[i].token_ids == alone.token_ids, (i, pipelines[i])
