"""Tests of the tutorial plugin, run against the *installed* distribution (entry point)."""

from __future__ import annotations

import math

import pytest
import torch
from samplerkit_example import SuppressTokens

import samplerkit
from samplerkit import ConfigError, StepContext
from samplerkit.cli import main as cli_main

NEG_INF = float("-inf")


def apply(row_params, logits):
    """Run the processor directly: one ``Params`` per row."""
    step = SuppressTokens([SuppressTokens.Params(**p) for p in row_params])
    return step.apply(logits.clone(), StepContext(len(row_params), logits.shape[-1]))


# -- registration through the entry point ----------------------------------------------

def test_registered_with_distribution_and_version():
    entry = samplerkit.default_registry().entry("processor", "suppress_tokens")
    assert entry.cls is SuppressTokens
    assert entry.plugin.name == "example"
    assert entry.plugin.distribution == "samplerkit-example"
    assert entry.plugin.version == "0.1.0"
    assert entry.plugin.describe() == "example (samplerkit-example 0.1.0)"


def test_listed_by_samplerkit_plugins(capsys):
    assert cli_main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "suppress_tokens  [example (samplerkit-example 0.1.0)]" in out
    assert "token_ids: array = []" in out or "token_ids: list[integer] = []" in out


YAML = """\
backend: bigram
pipeline:
  - suppress_tokens: {token_ids: [1, 2]}
sampler: greedy
"""


def test_usable_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML, encoding="utf-8")
    pipe = samplerkit.load_pipeline(path)
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    out = pipe.process(logits)
    assert out.tolist() == [[0.0, NEG_INF, NEG_INF, 1.0]]
    assert logits.tolist() == [[0.0, 3.0, 2.0, 1.0]]          # the caller's tensor is untouched
    assert pipe.sample(logits).tolist() == [3]               # greedy must not skip this step


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError) as info:
        samplerkit.load_pipeline({"pipeline": [{"suppress_tokens": {"token_ids": ["a"]}}], "sampler": "greedy"})
    assert "pipeline[0] suppress_tokens.token_ids.0" in str(info.value)
    with pytest.raises(ConfigError, match="unknown parameter 'token_id'; did you mean 'token_ids'"):
        samplerkit.load_pipeline({"pipeline": [{"suppress_tokens": {"token_id": [1]}}], "sampler": "greedy"})


# -- blocking by name ------------------------------------------------------------------

def test_blocked_from_config():
    config = {"pipeline": [{"suppress_tokens": {"token_ids": [1]}}], "sampler": "greedy",
              "plugins": {"block": ["example"]}}
    with pytest.raises(ConfigError, match="unknown processor 'suppress_tokens'"):
        samplerkit.load_pipeline(config)


def test_blocked_from_environment(monkeypatch, capsys):
    monkeypatch.setenv("SAMPLERKIT_BLOCK_PLUGINS", "example")
    assert not samplerkit.default_registry().has("processor", "suppress_tokens")
    assert cli_main(["plugins"]) == 0
    assert "suppress_tokens" not in capsys.readouterr().out


# -- semantics -------------------------------------------------------------------------

def test_neutral_default_leaves_logits_unchanged():
    logits = torch.randn(3, 11)
    assert torch.equal(apply([{}, {}, {}], logits), logits)
    assert SuppressTokens.Params().is_neutral()
    # A pipeline skips an all-neutral step on the host side.
    pipe = samplerkit.Pipeline([SuppressTokens.spec()], sampler=samplerkit.default_registry()
                               .get("sampler", "greedy").spec())
    assert pipe.bind(3).steps == []


def test_per_row_token_ids():
    logits = torch.arange(5.0).repeat(3, 1)
    out = apply([{"token_ids": [0]}, {"token_ids": [1, 4]}, {}], logits)
    assert out.tolist() == [
        [NEG_INF, 1.0, 2.0, 3.0, 4.0],
        [0.0, NEG_INF, 2.0, 3.0, NEG_INF],
        [0.0, 1.0, 2.0, 3.0, 4.0],
    ]


def test_per_row_overrides_through_the_pipeline():
    greedy = samplerkit.default_registry().get("sampler", "greedy")
    pipe = samplerkit.Pipeline([SuppressTokens.spec(token_ids=[4])], sampler=greedy.spec())
    logits = torch.arange(5.0).repeat(3, 1)
    bound = pipe.bind([None, {"suppress_tokens": {"token_ids": [3, 4]}}, {"suppress_tokens": {"token_ids": []}}])
    assert bound.sample(logits).tolist() == [3, 2, 4]
    # Rows keep their own parameters when the batch shrinks or fans out.
    assert bound.select_rows([2, 1]).sample(logits[:2]).tolist() == [4, 2]


def test_ids_outside_the_vocabulary_are_ignored():
    logits = torch.arange(4.0).unsqueeze(0)
    out = apply([{"token_ids": [-1, 2, 4, 10**9]}], logits)
    assert out.tolist() == [[0.0, 1.0, NEG_INF, 3.0]]


def test_duplicates_are_harmless():
    out = apply([{"token_ids": [1, 1, 1]}], torch.zeros(1, 3))
    assert out.tolist() == [[0.0, NEG_INF, 0.0]]


def test_never_empties_a_row():
    # Row 0 would lose every token: it is left unchanged. Row 1 keeps token 3.
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    out = apply([{"token_ids": [0, 1, 2, 3]}, {"token_ids": [0, 1, 2]}], logits)
    assert out.tolist() == [[0.0, 1.0, 2.0, 3.0], [NEG_INF, NEG_INF, NEG_INF, 3.0]]
    # Tokens an earlier step removed count as gone: suppressing all the finite ones is a no-op.
    truncated = torch.tensor([[NEG_INF, 1.0, NEG_INF, 3.0]])
    assert apply([{"token_ids": [1, 3]}], truncated).tolist() == truncated.tolist()


def test_after_top_k_in_a_pipeline():
    reg = samplerkit.default_registry()
    pipe = samplerkit.Pipeline([reg.get("processor", "top_k").spec(top_k=2), SuppressTokens.spec(token_ids=[3])],
                               sampler=reg.get("sampler", "greedy").spec())
    out = pipe.process(torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    assert out.tolist() == [[NEG_INF, NEG_INF, 2.0, NEG_INF]]


def test_suppressed_tokens_are_never_sampled():
    categorical = samplerkit.default_registry().get("sampler", "categorical")
    pipe = samplerkit.Pipeline([SuppressTokens.spec(token_ids=[0, 2])], sampler=categorical.spec())
    logits = torch.zeros(64, 4)
    ids = pipe.sample(logits, seeds=list(range(64)))
    assert set(ids.tolist()) == {1, 3}


def test_generate_with_the_bigram_backend():
    # The bigram backend's vocabulary is bytes: suppressing b" " means no spaces in the text.
    config = {"backend": "bigram", "pipeline": [{"suppress_tokens": {"token_ids": [ord(" ")]}}],
              "sampler": {"name": "categorical", "seed": 3}, "generation": {"max_new_tokens": 40}}
    [completion] = samplerkit.generate(["The"], config)
    assert len(completion.token_ids) > 0
    assert ord(" ") not in completion.token_ids
    assert " " not in completion.text


def test_processed_logprob_of_a_kept_token_is_finite():
    config = {"backend": "bigram", "pipeline": [{"suppress_tokens": {"token_ids": [ord("e")]}}], "sampler": "greedy",
              "generation": {"max_new_tokens": 5, "logprobs": 1}}
    [completion] = samplerkit.generate(["Th"], config)
    assert all(math.isfinite(lp.processed_logprob) for lp in completion.logprobs)
    assert "e" not in completion.text


def test_after_a_candidate_list_truncation():
    # top_k leaves a short candidate list; suppress_tokens needs dense logits, and gets them.
    reg = samplerkit.default_registry()
    logits = torch.randn(4, 1000)
    top = logits.argmax(-1)
    rows = [{"suppress_tokens": {"token_ids": [int(t)]}} for t in top]
    pipe = samplerkit.Pipeline([reg.get("processor", "top_k").spec(top_k=5), SuppressTokens.spec()],
                               sampler=reg.get("sampler", "greedy").spec())
    bound = pipe.bind(rows)
    out = bound.process(logits)
    assert (torch.isfinite(out).sum(-1) == 4).all()
    second = logits.topk(2, dim=-1).indices[:, 1]
    assert bound.sample(logits).tolist() == second.tolist()


# -- the shared contract and the test helpers --------------------------------------------

def test_contract():
    from samplerkit.testing import check_processor

    check_processor(SuppressTokens, [{"token_ids": [0]}, {"token_ids": [1, 2, 3]}, {"token_ids": [10**6]},
                                     {"token_ids": list(range(32))}])


def test_temporary_plugin_without_entry_points():
    from samplerkit.testing import temporary_plugin

    with temporary_plugin(SuppressTokens, "example_copy", load_entry_points=False) as registry:
        assert registry.entry("processor", "suppress_tokens").plugin.name == "example_copy"


def test_a_second_plugin_with_the_same_name_is_an_error():
    from samplerkit import PluginError
    from samplerkit.testing import temporary_plugin

    with pytest.raises(PluginError, match="two plugins register a processor named 'suppress_tokens'"):
        with temporary_plugin(SuppressTokens, "example_copy"):
            pass
