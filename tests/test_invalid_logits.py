"""Degenerate logits never crash a batch or change other rows (the on_invalid policy)."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field

import samplerkit
from samplerkit import Processor, StepParams
from samplerkit.errors import ConfigError, InvalidLogitsError, PluginError
from samplerkit.testing import temporary_plugin


class PoisonRow(Processor):
    """Test processor: writes NaN (or -inf everywhere) into one row after `after` tokens."""

    name = "poison_row"

    class Params(StepParams):
        row: int = Field(-1, description="row to poison; -1 disables")
        after: int = Field(0, ge=0)
        kind: str = Field("nan")

    def apply(self, logits, ctx):
        for b, params in enumerate(self.rows):
            if params.row == b and int(ctx.num_generated[b]) >= params.after:
                logits[b] = float("nan") if params.kind == "nan" else float("-inf")
        return logits


class Exploding(Processor):
    name = "exploding"

    class Params(StepParams):
        on: bool = False          # neutral by default, like every step

    def apply(self, logits, ctx):
        raise RuntimeError("kaboom")


class WrongShape(Processor):
    name = "wrong_shape"

    class Params(StepParams):
        on: bool = False          # neutral by default, like every step

    def apply(self, logits, ctx):
        return logits[:, :-1]


def _pipeline(registry, steps, policy="raise"):
    return samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps, "sampler": "categorical",
                                     "on_invalid": policy}, registry=registry)


@pytest.mark.parametrize("kind,what", [("nan", "NaN"), ("empty", "no token left")])
def test_raise_names_row_and_stage(kind, what):
    with temporary_plugin(PoisonRow) as registry:
        pipe = _pipeline(registry, [{"top_k": 5}, {"poison_row": {"row": 2, "kind": kind}}, {"top_p": 0.9}])
        with pytest.raises(InvalidLogitsError) as err:
            pipe.sample(torch.randn(4, 300), seeds=[1, 2, 3, 4])
    message = str(err.value)
    assert "row 2" in message and "pipeline[1] poison_row" in message and what in message
    assert "row 0" not in message and "row 1:" not in message


def test_invalid_input_logits_are_blamed_on_the_input():
    pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": [{"top_p": 0.5}], "sampler": "categorical"})
    x = torch.randn(3, 100)
    x[0, 3] = float("inf")
    with pytest.raises(InvalidLogitsError, match=r"row 0: the input logits .* \+inf"):
        pipe.sample(x)


@pytest.mark.parametrize("policy", ["mark_invalid", "fallback_greedy"])
@pytest.mark.parametrize("steps", [[], [{"temperature": 0.7}], [{"top_k": 20}, {"top_p": 0.9}], [{"min_p": 0.1}]])
def test_other_rows_unchanged_and_ids_in_range(policy, steps):
    pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps, "sampler": "categorical", "on_invalid": policy})
    clean = torch.randn(6, 400)
    dirty = clean.clone()
    dirty[1, 10] = float("nan")
    dirty[3] = float("-inf")
    dirty[4, 0] = float("inf")
    seeds = list(range(6))
    ids_clean = pipe.sample(clean, seeds=seeds)
    ids, valid = pipe.bind(6, seeds=seeds).sample_with_validity(dirty)
    assert valid.tolist() == [True, False, True, False, False, True]
    assert torch.equal(ids[valid], ids_clean[valid])
    assert bool(((ids >= 0) & (ids < 400)).all())
    finite = dirty.masked_fill(~torch.isfinite(dirty), float("-inf"))
    assert ids[1] == finite[1].argmax() and ids[4] == finite[4].argmax()


def test_bfloat16_logits_are_processed_in_float32():
    pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": [{"top_p": 0.9}], "sampler": "categorical"})
    x = torch.randn(2, 500)
    out = pipe.process(x.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert torch.equal(pipe.sample(x.to(torch.bfloat16), seeds=[1, 2]), pipe.sample(x.to(torch.bfloat16).float(), seeds=[1, 2]))


def test_tiny_temperature_is_greedy_not_nan():
    pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": [{"temperature": 1e-30}], "sampler": "categorical"})
    x = torch.randn(4, 300) * 50
    assert torch.equal(pipe.sample(x, seeds=[1, 2, 3, 4]), x.argmax(-1))
    assert not bool(pipe.process(x).isnan().any())


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="on_invalid"):
        samplerkit.load_pipeline({"backend": "bigram", "on_invalid": "ignore"})


def test_mark_invalid_ends_only_that_row_in_the_decode_loop():
    config = {"backend": "bigram", "sampler": {"name": "categorical", "seed": 5},
              "pipeline": [{"poison_row": {"row": -1}}], "on_invalid": "mark_invalid",
              "generation": {"max_new_tokens": 12, "ignore_eos": True}}
    with temporary_plugin(PoisonRow) as registry:
        gen = samplerkit.Generator(config, registry=registry)
        baseline = gen.generate(["ab", "cd", "ef"])
        poisoned = gen.generate(["ab", "cd", "ef"], rows=[None, {"poison_row": {"row": 1, "after": 3}}, None])
    assert [c.finish_reason for c in poisoned] == ["length", "invalid", "length"]
    assert poisoned[0].token_ids == baseline[0].token_ids and poisoned[2].token_ids == baseline[2].token_ids
    assert poisoned[1].token_ids == baseline[1].token_ids[:3]


def test_processor_exception_names_the_plugin():
    with temporary_plugin(Exploding, "boom_plugin") as registry:
        pipe = _pipeline(registry, [{"exploding": {"on": True}}])
        with pytest.raises(PluginError, match=r"pipeline\[0\] exploding \(plugin boom_plugin.*kaboom"):
            pipe.sample(torch.randn(2, 50))


def test_wrong_shape_is_caught_at_its_stage():
    with temporary_plugin(WrongShape, "shape_plugin") as registry:
        pipe = _pipeline(registry, [{"temperature": 0.5}, {"wrong_shape": {"on": True}}])
        with pytest.raises(PluginError, match=r"pipeline\[1\] wrong_shape .* returned \(2, 49\)"):
            pipe.sample(torch.randn(2, 50))
