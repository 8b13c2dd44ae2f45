"""Pipeline rules that silently failed before (issue 13 defects 7 and 9).

* A processor without parameters has no neutral value: it always runs.
* A row's seed reaches every seeded step, processors (xtc) included, whatever the sampler.
* NaN or +inf anywhere in the input logits, or written by any step, makes the row invalid
  (docs/yaml.md, ``on_invalid``), even when a later step removes that token.
"""

from __future__ import annotations

import pytest
import torch

from samplerkit import InvalidLogitsError, Processor, StepContext, load_pipeline
from samplerkit.builtins.samplers.greedy import Greedy
from samplerkit.errors import ConfigError
from samplerkit.pipeline import Pipeline
from samplerkit.testing import temporary_plugin


class BanFirst(Processor):
    """A processor without parameters: bans token 0."""

    name = "ban_first"

    def apply(self, logits, ctx):
        logits[:, 0] = float("-inf")
        return logits


class PoisonFive(Processor):
    """A (buggy) processor without parameters that writes NaN into token 5."""

    name = "poison_five"

    def apply(self, logits, ctx):
        logits[:, 5] = float("nan")
        return logits


# -- defect 7: steps without parameters ---------------------------------------------------

def test_processor_without_parameters_always_runs():
    x = torch.zeros(2, 8)
    x[:, 0] = 5.0                                     # greedy would pick 0 unless the step runs
    pipe = Pipeline([BanFirst.spec()], sampler=Greedy.spec())
    bound = pipe.bind(2)
    assert [spec.name for spec, _ in bound.steps] == ["ban_first"]
    assert bound.sample(x).tolist() == [1, 1]
    assert bool((pipe.process(x)[:, 0] == float("-inf")).all())


def test_processor_without_parameters_runs_from_a_config():
    with temporary_plugin(BanFirst) as registry:
        pipe = load_pipeline({"pipeline": ["ban_first"], "sampler": "greedy"}, registry=registry)
        x = torch.zeros(1, 4)
        x[0, 0] = 1.0
        assert pipe.sample(x).tolist() == [1]


# -- defect 7: seeds reach every seeded step ---------------------------------------------

XTC_GREEDY = {"pipeline": [{"xtc": {"threshold": 0.05, "probability": 0.5}}], "sampler": "greedy"}


def _flat(batch: int, vocab: int = 16) -> torch.Tensor:
    return torch.linspace(0.0, 0.1, vocab).repeat(batch, 1)   # many tokens above the threshold


def test_greedy_with_seeded_xtc_takes_seeds():
    pipe = load_pipeline(XTC_GREEDY)
    assert pipe.takes_seed
    bound = pipe.bind(3, seeds=[1, 2, None])
    xtc = bound.steps[0][1]
    assert xtc.streams.seeds[:2].tolist() == [1, 2]


def test_seeded_xtc_reproducible_through_seeds():
    pipe = load_pipeline(XTC_GREEDY)
    seeds = list(range(40))

    def draw(s):
        ctx = StepContext(len(s), 16)
        return pipe.bind(len(s), seeds=s).sample(_flat(len(s)), ctx)
    first, again = draw(seeds), draw(seeds)
    assert torch.equal(first, again)
    # The coin fires for some rows and not others (probability 0.5): the seed decides.
    assert len(set(first.tolist())) > 1
    # A row's seed gives it the same token alone as in the batch.
    assert all(int(draw([s])[0]) == int(first[i]) for i, s in enumerate(seeds[:8]))


def test_seeds_without_any_seeded_step_is_a_clear_error():
    pipe = load_pipeline({"pipeline": [{"top_k": 3}], "sampler": "greedy"})
    with pytest.raises(ConfigError, match="no step of this pipeline takes a seed"):
        pipe.bind(2, seeds=[1, None])
    pipe.bind(2, seeds=[None, None])                   # nothing to pass: fine


# -- defect 9: NaN/+inf anywhere makes the row invalid ------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "+inf"])
@pytest.mark.parametrize("pipeline", [
    [{"typical_p": {"typical_p": 0.9}}],
    [{"allowed_tokens": {"allowed_tokens": [1, 2, 3]}}],
    [{"top_k": 5}],
    [{"top_p": 0.5}],
    [{"min_p": 0.2}],
    [{"temperature": 0.5}, {"top_k": 3}],
], ids=lambda p: "+".join(next(iter(s)) for s in p))
@pytest.mark.parametrize("sampler", ["greedy", "categorical"])
def test_nan_or_inf_on_any_token_makes_the_row_invalid(pipeline, sampler, bad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1000, generator=g)
    x[1, 17] = bad                                     # token 17: removed by every step above
    config = {"pipeline": pipeline, "sampler": sampler}
    with pytest.raises(InvalidLogitsError, match="row 1: the input logits"):
        load_pipeline(config).sample(x)
    for policy in ("mark_invalid", "fallback_greedy"):
        pipe = load_pipeline({**config, "on_invalid": policy})
        ids, valid = pipe.bind(2, seeds=[3, 4] if sampler == "categorical" else None).sample_with_validity(x)
        assert valid.tolist() == [True, False], policy
        clean = pipe.bind(1, seeds=[3] if sampler == "categorical" else None).sample(x[:1])
        assert int(ids[0]) == int(clean[0])           # the good row is unaffected


def test_nan_written_by_a_step_and_removed_later_makes_the_row_invalid():
    with temporary_plugin(PoisonFive) as registry:
        config = {"pipeline": ["poison_five", {"allowed_tokens": {"allowed_tokens": [1, 2]}}], "sampler": "greedy"}
        x = torch.randn(2, 10)
        with pytest.raises(InvalidLogitsError, match=r"pipeline\[0\] poison_five .* produced NaN"):
            load_pipeline(config, registry=registry).sample(x)
        ids, valid = load_pipeline({**config, "on_invalid": "mark_invalid"}, registry=registry).bind(2) \
            .sample_with_validity(x)
        assert valid.tolist() == [False, False]
