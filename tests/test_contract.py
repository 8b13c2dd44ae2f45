"""The shared contract (samplerkit.testing) over every registered processor and sampler,
plus checks that the contract itself catches broken steps."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field

from samplerkit import Processor, Sampler, StepContext, StepParams, ThresholdProcessor
from samplerkit.builtins.penalties import BUILTIN_PENALTIES
from samplerkit.builtins.samplers import BUILTIN_SAMPLERS
from samplerkit.builtins.shaping import BUILTIN_SHAPING
from samplerkit.builtins.truncation import BUILTIN_TRUNCATION
from samplerkit.fastpath import FastPathSampler
from samplerkit.ops import NEG_INF
from samplerkit.registry import default_registry
from samplerkit.testing import (
    BUILTIN_EXAMPLES,
    check_processor,
    check_sampler,
    examples_for,
    parametrize_registered,
    registered_classes,
    temporary_plugin,
)

REGISTRY = default_registry()


# Steps that declare `needs_vocabulary` need the backend's tokenizer, which the generic contract does
# not have: tests/test_structured.py checks the same properties for them.
@pytest.mark.parametrize("cls", [c for c in registered_classes("processor", REGISTRY) if not getattr(c, "needs_vocabulary", False)],
                         ids=lambda c: c.name)
def test_processor_contract(cls):
    check_processor(cls)


@parametrize_registered("sampler", REGISTRY)
def test_sampler_contract(cls):
    check_sampler(cls)


@pytest.mark.parametrize("cls", [*BUILTIN_TRUNCATION, *BUILTIN_SHAPING, *BUILTIN_PENALTIES, *BUILTIN_SAMPLERS], ids=lambda c: c.name)
def test_builtins_have_non_neutral_examples(cls):
    assert f"{cls.__module__}.{cls.__qualname__}" in BUILTIN_EXAMPLES
    examples = examples_for(cls)
    if cls.Params.model_fields:
        assert examples and all(not cls.Params(**e).is_neutral() for e in examples if e.get("seed", 0) is not None)


def test_builtins_are_registered_and_listed():
    names = {c.name for c in registered_classes("processor", REGISTRY)}
    assert {"temperature", "top_k", "top_p", "min_p"} <= names
    assert {"greedy", "categorical"} <= {c.name for c in registered_classes("sampler", REGISTRY)}


def test_examples_for_prefers_explicit_then_classmethod():
    class WithExamples(Processor):
        name = "with_examples"

        @classmethod
        def contract_examples(cls):
            return [{"x": 1}]

    assert examples_for(WithExamples) == [{"x": 1}]
    assert examples_for(WithExamples, [{"x": 2}]) == [{"x": 2}]


# -- the contract catches broken steps ---------------------------------------------------------

class _Scale(StepParams):
    scale: float = Field(1.0, gt=0, description="multiplier; 1 is neutral")


class NotIdentity(Processor):
    name = "not_identity"
    Params = _Scale

    def apply(self, logits, ctx):
        return logits.mul_(self.p.scale.unsqueeze(-1)).add_(0.0 * logits + 1e-3)   # shifts neutral rows


class BatchCoupled(Processor):
    name = "batch_coupled"
    Params = _Scale

    def apply(self, logits, ctx):
        # Divides by a batch-wide statistic: a row depends on its neighbours.
        scaled = logits * (self.p.scale / self.p.scale.max()).unsqueeze(-1)
        return torch.where(self.active.unsqueeze(-1), scaled, logits)


class KillsEverything(Processor):
    name = "kills_everything"
    Params = _Scale

    def apply(self, logits, ctx):
        return logits.masked_fill_(self.active.unsqueeze(-1).expand_as(logits), NEG_INF)


class WrongDtype(Processor):
    name = "wrong_dtype"
    Params = _Scale

    def apply(self, logits, ctx):
        return logits.double()


class Fine(Processor):
    name = "fine"
    Params = _Scale

    def apply(self, logits, ctx):
        return logits.mul_(self.p.scale.unsqueeze(-1))


@pytest.mark.parametrize("cls, needle", [
    (NotIdentity, "identity"),
    (BatchCoupled, "mixed batch"),
    (KillsEverything, "removed every token"),
    (WrongDtype, "float64"),
])
def test_contract_rejects_broken_processors(cls, needle):
    with pytest.raises(AssertionError, match=needle):
        check_processor(cls, [{"scale": 2.0}, {"scale": 0.5}])


def test_contract_accepts_a_correct_processor():
    check_processor(Fine, [{"scale": 2.0}, {"scale": 0.5}])


class _Within(StepParams):
    within: float = Field(0.0, ge=0.0, description="nats below the top logit kept; 0 disables")

    def is_neutral(self) -> bool:
        return self.within == 0.0


class WithinOfTop(ThresholdProcessor):
    """A third-party threshold truncation: keep logits within ``within`` of the row's top."""
    name = "within_of_top"
    Params = _Within

    def threshold(self, logits):
        return logits.amax(dim=-1, keepdim=True) - self.p.within.unsqueeze(-1)


def test_contract_accepts_a_threshold_processor_from_the_public_base_class():
    check_processor(WithinOfTop, [{"within": 1.0}, {"within": 0.0}])
    x = torch.tensor([[3.0, 2.5, 1.0, 2.0]])
    assert WithinOfTop([_Within(within=1.0)]).apply(x.clone(), StepContext(1, 4)).tolist() == [
        [3.0, 2.5, float("-inf"), 2.0]]


def test_contract_rejects_bad_example_params():
    with pytest.raises(AssertionError, match="do not validate"):
        check_processor(Fine, [{"scale": -1.0}])


class Mutates(Sampler):
    name = "mutates"

    def sample(self, logits, ctx):
        ids = logits.argmax(-1)
        logits.zero_()
        return ids


class PicksMasked(Sampler):
    name = "picks_masked"

    def sample(self, logits, ctx):
        return logits.argmin(-1)


class _Seed(StepParams):
    seed: int | None = Field(None, ge=0, description="seed")


class GlobalRng(Sampler):
    """Draws from torch's global generator: not reproducible, not batch-independent."""

    name = "global_rng"
    stochastic = True
    Params = _Seed

    def sample(self, logits, ctx):
        return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


class Int32Ids(Sampler):
    name = "int32_ids"

    def sample(self, logits, ctx):
        return logits.argmax(-1).to(torch.int32)


@pytest.mark.parametrize("cls, needle", [
    (Mutates, "modified its input"),
    (PicksMasked, "-inf"),
    (GlobalRng, "drew"),
    (Int32Ids, "int32"),
])
def test_contract_rejects_broken_samplers(cls, needle):
    with pytest.raises(AssertionError, match=needle):
        check_sampler(cls)


def test_contract_rejects_class_without_snake_case_name():
    class BadName(Fine):
        name = "BadName"

    with pytest.raises(AssertionError, match="snake_case"):
        check_processor(BadName)


def test_temporary_plugin_with_a_class_is_checked_through_the_registry():
    with temporary_plugin(Fine, load_entry_points=False) as registry:
        assert registry.has("processor", "fine")
        check_processor(registry.get("processor", "fine"), [{"scale": 3.0}])
    assert not default_registry().has("processor", "fine")      # nothing global changed


class _OffByOneTopK(__import__("samplerkit.builtins.truncation.top_k", fromlist=["TopK"]).TopK):
    """A fast path that disagrees with apply(): keeps one token fewer."""

    name = "off_by_one_top_k"

    def select_candidates(self, logits, ctx):
        got = super().select_candidates(logits, ctx)
        if got is None:
            return None
        values, ids = got
        return values.clone().index_fill_(1, torch.tensor([values.shape[1] - 1]), NEG_INF), ids


class _SortedWrongSampler(FastPathSampler):
    """Deterministic, but its candidate path picks the last candidate instead of the argmax."""

    name = "sorted_wrong"

    def sample(self, logits, ctx):
        return logits.argmax(-1)

    def sample_candidates(self, values, ids, ctx):
        return ids[:, -1]


def test_contract_checks_the_candidate_fast_paths():
    # (With SAMPLERKIT_SYNC_FREE=1 the pipeline takes no candidate list, and the same bug shows
    # as the pipeline's output differing.)
    with pytest.raises(AssertionError, match="(select_candidates|pipeline.process) differs from apply"):
        check_processor(_OffByOneTopK, [{"top_k": 5}])
    with pytest.raises(AssertionError, match="sample_candidates"):
        check_sampler(_SortedWrongSampler)
