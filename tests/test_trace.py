"""BoundPipeline.trace / Pipeline.trace: what each stage did to the distribution, per row."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field

import samplerkit
from samplerkit import Processor, StepParams
from samplerkit.errors import PluginError
from samplerkit.testing import temporary_plugin


def _pipe(steps, sampler="categorical", registry=None, **extra):
    return samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps, "sampler": sampler, **extra},
                                    registry=registry)


def _logits(rows=3, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 2


def test_stages_counts_mass_and_entropy_match_the_definitions():
    x = _logits()
    pipe = _pipe([{"temperature": 0.5}, {"top_k": 7}, {"top_p": 0.6}])
    trace = pipe.trace(x, top=4)
    assert trace.names == ["input", "temperature", "top_k", "top_p"]
    p = torch.softmax(x.double(), -1)
    q_temp = torch.softmax(x.double() / 0.5, -1)
    # top_k 7: the 7 largest logits survive; mass is their input probability.
    top7 = x.topk(7, dim=-1).indices
    stage = trace.stage("top_k")
    assert stage.kept.tolist() == [7, 7, 7]
    assert torch.allclose(stage.mass.double(), p.gather(1, top7).sum(-1), atol=1e-5)
    kept = torch.zeros_like(x, dtype=torch.bool).scatter_(1, top7, True)
    assert torch.equal(torch.isfinite(stage.logits), kept)
    # Entropy in nats of the temperature stage, computed independently.
    h = -(q_temp * q_temp.log()).sum(-1)
    assert torch.allclose(trace.stage("temperature").entropy.double(), h, atol=1e-4)
    assert torch.allclose(trace.stage("input").mass, torch.ones(3))
    # top_p 0.6 keeps a prefix of top_k's kept set whose mass (under top_k's renormalised q) reaches 0.6.
    q_k = torch.softmax(stage.logits.double(), -1)
    for row in range(3):
        n = int(trace.stage("top_p").kept[row])
        sorted_q = q_k[row].sort(descending=True).values
        assert sorted_q[: n - 1].sum() < 0.6 <= sorted_q[:n].sum() + 1e-6
    # Top tokens of a stage: its most likely ids with their probabilities, descending.
    top_ids = trace.stage("temperature").top_ids
    assert torch.equal(top_ids, q_temp.topk(4, dim=-1).indices)
    assert torch.allclose(trace.stage("temperature").top_probs.double(), q_temp.topk(4, dim=-1).values, atol=1e-5)


@pytest.mark.parametrize("steps,sampler", [
    ([{"temperature": 0.7}, {"top_k": 5}], "categorical"),             # temperature deferred past top_k
    ([{"top_k": 20}, {"top_p": 0.9}, {"temperature": 0.8}], "categorical"),   # cut handed to the sampler
    ([{"min_p": 0.1}, {"typical_p": 0.9}, {"repetition_penalty": 1.3}], "categorical"),
    ([{"top_p": 0.5}, {"min_p": 0.05}], "greedy"),
])
def test_the_last_processor_stage_equals_what_the_pipeline_processes(steps, sampler):
    """The trace runs apply() densely; the pipeline's fast paths must give the same logits."""
    x = _logits(rows=4, vocab=300, seed=3)
    pipe = _pipe(steps, sampler)
    trace = pipe.trace(x)
    assert torch.equal(trace.stage("processed").logits, pipe.process(x))


def test_removed_by_names_the_stage_that_removed_each_token_per_row():
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0],
                      [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    pipe = _pipe([{"top_k": 4}, {"top_p": 0.7}, {"top_k": 1}])
    trace = pipe.trace(x)
    assert trace.names == ["input", "top_k", "top_p", "top_k#2"]
    assert trace.removed_by(5, row=0).name == "top_k"           # the lowest of row 0
    assert trace.removed_by(5, row=1) is None                    # the highest of row 1 survives
    assert trace.removed_by(0, row=1).location == "pipeline[0] top_k"
    assert trace.removed_by(0, row=0) is None
    # top_p 0.7 of row 0's top 4 (probabilities .64 .24 .09 .03) keeps 2: token 2 is its.
    assert trace.removed_by(2, row=0).name == "top_p"
    assert trace.removed_by(1, row=0).name == "top_k#2"
    assert trace.removed_at[0].tolist() == [-1, 3, 2, 2, 1, 1]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trace.removed_by(6)


def test_tokens_minus_inf_in_the_input_are_removed_by_the_input():
    x = torch.tensor([[1.0, float("-inf"), 0.5]])
    trace = _pipe([{"top_k": 2}]).trace(x)
    assert trace.removed_by(1).name == "input"
    assert trace.stage("input").kept.tolist() == [2]


def test_neutral_steps_are_stages_marked_inactive_and_change_nothing():
    x = _logits()
    trace = _pipe([{"top_p": 1.0}, {"top_k": 5}]).trace(x)
    neutral = trace.stage("top_p")
    assert not neutral.active.any() and torch.equal(neutral.logits, x)
    assert trace.stage("top_k").active.all()
    assert "top_p (neutral)" in trace.table()


def test_per_row_parameters_give_per_row_stages():
    x = _logits(rows=2)
    pipe = _pipe([{"top_k": 3}])
    bound = pipe.bind([{"top_k": {"top_k": 2}}, {"top_k": {"top_k": 9}}])
    assert bound.trace(x).stage("top_k").kept.tolist() == [2, 9]


def test_a_sampler_that_picks_the_argmax_adds_its_own_stage():
    x = _logits()
    trace = _pipe([{"top_k": 5}], sampler="greedy").trace(x)
    assert trace.names[-1] == "greedy"
    greedy = trace.stages[-1]
    assert greedy.kept.tolist() == [1, 1, 1]
    assert greedy.top_ids[:, 0].tolist() == x.argmax(-1).tolist()
    assert torch.allclose(greedy.entropy, torch.zeros(3))
    # categorical draws from the processed distribution: no extra stage.
    assert _pipe([{"top_k": 5}]).trace(x).names == ["input", "top_k"]


def test_trace_neither_modifies_the_logits_nor_changes_draws():
    x = _logits(rows=4, vocab=100)
    before = x.clone()
    pipe = _pipe([{"temperature": 0.9}, {"top_k": 10}, {"xtc": {"threshold": 0.05, "probability": 0.5}}],
                 sampler={"name": "categorical", "seed": 5})
    bound = pipe.bind(4, seeds=[1, 2, 3, 4])
    first = bound.sample(x)
    bound.trace(x)
    assert torch.equal(x, before)
    assert torch.equal(bound.sample(x), first)
    assert torch.equal(pipe.bind(4, seeds=[1, 2, 3, 4]).sample(x), first)


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


class Shifty(Processor):
    """A third-party processor with no fast path: removes token 0 and keeps the rest."""

    name = "shifty"

    class Params(StepParams):
        on: bool = False

    def apply(self, logits, ctx):
        logits[:, 0] = float("-inf")
        return logits


def test_invalid_rows_are_attributed_to_the_stage_that_made_them():
    with temporary_plugin(Poison) as registry:
        pipe = _pipe([{"top_k": 4}, {"poison": {"row": 1}}, {"top_p": 0.9}], registry=registry,
                     on_invalid="fallback_greedy")
        x = _logits(rows=3)
        x[2, 5] = float("nan")
        trace = pipe.trace(x)
    assert [s.invalid for s in trace.stages] == [[None, None, "NaN"], [None, None, None], [None, "NaN", None],
                                                 [None, None, None]]
    assert trace.invalid_stage(1).location == "pipeline[1] poison"
    assert trace.invalid_stage(2).name == "input"
    assert trace.invalid_stage(0) is None
    assert "INVALID: NaN" in trace.table(row=1)
    rows = trace.rows(1)
    assert rows[2]["mass"] is None and rows[2]["invalid"] == "NaN"
    assert rows[0]["mass"] == pytest.approx(1.0)


def test_third_party_steps_take_part():
    with temporary_plugin(Shifty) as registry:
        pipe = _pipe([{"shifty": {"on": True}}, {"top_k": 3}], registry=registry)
        trace = pipe.trace(_logits(rows=2))
    shifty = trace.stage("shifty")
    assert shifty.plugin and shifty.kept.tolist() == [39, 39]
    assert trace.removed_by(0, row=1).name == "shifty"


def test_table_and_rows_decode_token_text():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    trace = _pipe([{"top_k": 2}]).trace(x, top=3)
    text = trace.table(decode=lambda i: "abcd"[i])
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["stage", "kept", "mass", "entropy"]
    assert lines[1].startswith("input") and "'a' 0.644" in lines[1] and "'c' 0.087" in lines[1]
    assert lines[2].startswith("top_k") and "'a' 0.731, 'b' 0.269" in lines[2] and "'c'" not in lines[2]
    assert trace.rows(0, decode=lambda i: "abcd"[i])[1]["top"] == [
        {"id": 0, "text": "a", "p": pytest.approx(0.7311, abs=1e-4)},
        {"id": 1, "text": "b", "p": pytest.approx(0.2689, abs=1e-4)}]


def test_bad_arguments_say_what_to_pass():
    pipe = _pipe([{"top_k": 3}])
    with pytest.raises(ValueError, match="top must be an integer >= 1"):
        pipe.trace(_logits(), top=0)
    with pytest.raises(ValueError, match="rows but the pipeline was bound for"):
        pipe.bind(2).trace(_logits(rows=3))
    with pytest.raises(KeyError, match="stages: input, top_k, processed"):
        pipe.trace(_logits()).stage("top_p")


class Broken(Processor):
    name = "broken"

    class Params(StepParams):
        on: bool = False

    def apply(self, logits, ctx):
        raise RuntimeError("kaboom")


def test_a_failing_step_is_named_with_its_plugin():
    with temporary_plugin(Broken) as registry:
        pipe = _pipe([{"broken": {"on": True}}], registry=registry)
        with pytest.raises(PluginError, match=r"pipeline\[0\] broken .*failed: RuntimeError: kaboom"):
            pipe.trace(_logits())


class LowestMax(samplerkit.Sampler):
    """A third-party sampler that declares it picks the argmax (the lowest id among ties)."""

    name = "lowest_max"
    picks_argmax = True

    def sample(self, logits, ctx):
        return logits.argmax(dim=-1)


def test_a_plugin_sampler_that_declares_picks_argmax_gets_its_stage():
    with temporary_plugin(LowestMax) as registry:
        pipe = _pipe([{"top_k": 4}], sampler="lowest_max", registry=registry)
        x = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
        trace = pipe.trace(x)
    assert trace.names == ["input", "top_k", "lowest_max"]
    assert trace.stages[-1].location == "sampler lowest_max"
    assert trace.removed_by(2).name == "lowest_max" and trace.removed_by(1) is None


def test_a_seeded_random_step_traces_the_draw_the_bound_pipeline_makes():
    x = _logits(rows=4, vocab=200, seed=5)
    pipe = _pipe([{"xtc": {"threshold": 0.01, "probability": 0.7}}, {"top_k": 30}])
    bound = pipe.bind(4, seeds=[11, 12, 13, 14])
    assert torch.equal(bound.trace(x).stage("processed").logits, bound.process(x))
    assert bound.trace(x).stage("xtc").kept.tolist() != [200] * 4     # the coin removed something
