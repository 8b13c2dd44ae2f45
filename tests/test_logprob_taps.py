"""generation.logprobs: {top: k, at: [stage, ...]}: the chosen token at named pipeline stages,
in library results, the CLI's --json and samplerkit batch output."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import Field

import samplerkit
from samplerkit import Processor, StepParams
from samplerkit.builtins.backends.bigram import BigramBackend
from samplerkit.cli import main
from samplerkit.errors import ConfigError
from samplerkit.schema import run_config_schema
from samplerkit.testing import temporary_plugin

STEPS = [{"temperature": 0.7}, {"top_k": 6}, {"top_p": 0.8}]


def _config(logprobs, steps=STEPS, sampler=None, **extra):
    return {"backend": "bigram", "pipeline": steps, "sampler": sampler or {"name": "categorical", "seed": 4},
            "generation": {"max_new_tokens": 4, "logprobs": logprobs}, **extra}


def test_the_int_form_works_as_before():
    [c] = samplerkit.generate(["The"], _config(2))
    assert all(lp.taps is None and len(lp.top) == 2 for lp in c.logprobs)


def test_taps_at_named_stages_match_the_stage_distributions():
    [c] = samplerkit.generate(["The"], _config({"top": 3, "at": ["input", "top_k", "processed"]}))
    first = c.logprobs[0]
    assert list(first.taps) == ["input", "top_k", "processed"]
    # The input tap is the raw distribution; processed is the one the token was drawn from.
    assert first.taps["input"].logprob == pytest.approx(first.logprob)
    assert first.taps["input"].top == first.top
    assert first.taps["processed"].logprob == pytest.approx(first.processed_logprob)
    # top_k, computed independently from the backend's logits: log softmax(top_6(x / 0.7)).
    backend = BigramBackend()
    x = backend.prefill([backend.tokenize("The")]).last[0] / 0.7
    kept = x.topk(6).indices
    z = torch.full_like(x, float("-inf"))
    z[kept] = x[kept]
    expected = torch.log_softmax(z, -1)
    tap = first.taps["top_k"]
    assert tap.logprob == pytest.approx(float(expected[first.token_id]), abs=1e-5)
    assert [t for t, _, _ in tap.top] == expected.topk(3).indices.tolist()
    assert [v for _, _, v in tap.top] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-5)
    assert all(text == backend.detokenize([t]) for t, text, _ in tap.top)
    # Removed tokens never appear in a stage's top.
    processed_ids = {t for t, _, _ in first.taps["processed"].top}
    assert processed_ids <= set(kept.tolist())


def test_taps_do_not_change_the_draws():
    plain = samplerkit.generate(["The", "A bird"], _config(None))
    tapped = samplerkit.generate(["The", "A bird"], _config({"top": 1, "at": ["input", "top_p"]}))
    assert [c.token_ids for c in tapped] == [c.token_ids for c in plain]


def test_a_repeated_step_and_the_sampler_stage_are_tapped_by_name():
    cfg = _config({"top": 2, "at": ["top_k#2", "greedy"]}, steps=[{"top_k": 8}, {"top_k": 3}], sampler="greedy")
    [c] = samplerkit.generate(["She"], cfg)
    for lp in c.logprobs:
        assert lp.taps["greedy"].logprob == 0.0 and [t for t, _, _ in lp.taps["greedy"].top] == [lp.token_id]
        assert len(lp.taps["top_k#2"].top) == 2


@pytest.mark.parametrize("at,bad", [(["input", "top_z"], "'top_z'"), (["greedy"], "'greedy'"), (["top_k#2"], "'top_k#2'")])
def test_an_unknown_stage_is_a_config_error_naming_the_stages(at, bad):
    with pytest.raises(ConfigError) as info:
        samplerkit.generate(["The"], _config({"top": 1, "at": at}))
    message = str(info.value)
    assert "generation.logprobs.at[" in message and bad in message
    assert "Stages: input, temperature, top_k, top_p, processed" in message


def test_an_unknown_stage_given_at_call_time_is_a_config_error():
    gen = samplerkit.Generator(_config(None))
    with pytest.raises(ConfigError, match=r"'top_q' is not a stage of this pipeline; did you mean 'top_p'\?"):
        gen.generate(["The"], logprobs={"top": 1, "at": ["top_q"]})
    [c] = gen.generate(["The"], logprobs={"top": 1, "at": ["top_p"]})
    assert "top_p" in c.logprobs[0].taps


@pytest.mark.parametrize("value,message", [
    ({"top": "2", "at": ["input"]}, "generation.logprobs.top: input should be an integer"),
    ({"at": []}, "generation.logprobs.at: list should have at least 1 item"),
    ({"top": 1, "at": ["input", "input"]}, "names 'input' more than once"),
    ({"top": 1, "stages": ["input"]}, "generation.logprobs.stages: unknown parameter 'stages'. Parameters: top, at"),
    ("5", "generation.logprobs: input should be an integer, not a string"),
])
def test_malformed_taps_are_located_errors(value, message):
    with pytest.raises(ConfigError, match=None) as info:
        samplerkit.load_pipeline(_config(value))
    assert message in str(info.value)


class Poison(Processor):
    """Test processor: NaN into row `row` (-1: neutral)."""

    name = "poison"

    class Params(StepParams):
        row: int = Field(-1)

    def apply(self, logits, ctx):
        for b, params in enumerate(self.rows):
            if params.row == b:
                logits[b, 0] = float("nan")
        return logits


def test_an_invalid_row_is_attributed_to_the_stage_that_made_it():
    steps = [{"top_k": 6}, {"poison": {"row": 1}}, {"top_p": 0.8}]
    with temporary_plugin(Poison) as registry:
        gen = samplerkit.Generator(_config({"top": 2, "at": ["input", "top_k", "poison", "processed"]}, steps=steps,
                                           on_invalid="fallback_greedy"), registry=registry)
        good, bad = gen.generate(["The", "A"])
    first = bad.logprobs[0].taps
    assert first["input"].invalid is None and math.isfinite(first["input"].logprob)
    assert first["top_k"].invalid is None
    for name in ("poison", "processed"):
        assert first[name].logprob is None and first[name].top == []
        assert first[name].invalid == "pipeline[1] poison made NaN"
    assert all(tap.invalid is None for lp in good.logprobs for tap in lp.taps.values())


def test_cli_json_and_batch_output_carry_the_taps(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(_config({"top": 2, "at": ["input", "processed"]})))
    assert main(["generate", "The", "--config", str(config), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    tap = row["logprobs"][0]["taps"]["processed"]
    assert set(tap) == {"logprob", "top", "invalid"} and len(tap["top"]) == 2
    assert tap["logprob"] == pytest.approx(row["logprobs"][0]["processed_logprob"])

    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps({"id": 1, "prompt": "The"}) + "\n"
                     + json.dumps({"id": 2, "prompt": "A", "generation": {"logprobs": {"top": 1, "at": ["top_k"]}}}) + "\n"
                     + json.dumps({"id": 3, "prompt": "A", "generation": {"logprobs": {"top": 1, "at": ["top_z"]}}}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["batch", "--config", str(config), "--input", str(lines), "--output", str(out)]) == 0
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows[1]["logprobs"][0]["taps"]) == ["input", "processed"]
    assert list(rows[2]["logprobs"][0]["taps"]) == ["top_k"]
    errors = (tmp_path / "out.jsonl.errors.jsonl").read_text()
    assert "generation.logprobs.at[0]: 'top_z' is not a stage of this pipeline" in errors and '"line": 3' in errors


def test_the_schema_accepts_both_forms():
    jsonschema = pytest.importorskip("jsonschema", reason="validating against the schema needs jsonschema")
    from samplerkit.registry import default_registry

    validator = jsonschema.Draft202012Validator(run_config_schema(default_registry()))
    validator.validate({"generation": {"logprobs": {"top": 5, "at": ["input", "top_p"]}}})
    validator.validate({"generation": {"logprobs": 3}})
    assert not validator.is_valid({"generation": {"logprobs": {"top": 5}}})


def test_no_trace_runs_unless_taps_are_asked_for(monkeypatch):
    from samplerkit.pipeline import BoundPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("trace ran without taps")

    monkeypatch.setattr(BoundPipeline, "trace", refuse)
    [c] = samplerkit.generate(["The"], _config(3))
    assert len(c.logprobs) == 4
    with pytest.raises(AssertionError, match="trace ran"):
        samplerkit.generate(["The"], _config({"top": 1, "at": ["input"]}))
