"""The public step contract is small: a plain ``Processor`` gets exactly ``apply`` and a plain
``Sampler`` exactly ``sample``. The candidate-list and cut fast paths belong to the internal
layer in samplerkit/fastpath.py, which the pipeline recognises once, when it is bound."""

from __future__ import annotations

import pytest
import torch

from samplerkit import MaskProcessor, Processor, Sampler, StepContext, ThresholdProcessor
from samplerkit.builtins.samplers import Categorical, Greedy
from samplerkit.builtins.shaping import Temperature
from samplerkit.builtins.truncation import MinP, TopK, TopP
from samplerkit.fastpath import FastPathProcessor, FastPathSampler
from samplerkit.pipeline import Pipeline

FAST_PROCESSOR_NAMES = ("inplace", "monotone", "apply_into", "select_candidates", "apply_candidates",
                        "select_cut", "select_candidates_after", "fused_divisor")
FAST_SAMPLER_NAMES = ("sample_candidates", "sample_cut", "cut_source")


def _never(*args, **kwargs):
    raise AssertionError("the pipeline asked a plain step for a fast path")


class HalveTail(Processor):
    """A plain third-party processor: halves every logit below the row maximum, in place. It
    also carries attributes named like the internal fast paths, which the pipeline must ignore."""

    name = "halve_tail"
    calls: list[str] = []
    inplace = False        # not part of the public contract: must not make the pipeline skip its copy
    monotone = True        # idem: must not make the pipeline defer it
    apply_into = select_candidates = apply_candidates = select_cut = staticmethod(_never)
    select_candidates_after = fused_divisor = staticmethod(_never)

    def apply(self, logits, ctx):
        HalveTail.calls.append("apply")
        top = logits.amax(dim=-1, keepdim=True)
        return torch.where(logits < top, logits * 0.5, logits, out=logits)


class FirstFinite(Sampler):
    """A plain third-party sampler (the lowest finite id) with fast-path-named attributes."""

    name = "first_finite"
    calls: list[str] = []
    cut_source = True
    sample_candidates = sample_cut = staticmethod(_never)

    def sample(self, logits, ctx):
        FirstFinite.calls.append("sample")
        return torch.isfinite(logits).to(torch.int8).argmax(dim=-1)


def test_the_public_classes_carry_no_fast_path():
    for attr in FAST_PROCESSOR_NAMES:
        assert not hasattr(Processor, attr), attr
        assert hasattr(FastPathProcessor, attr), attr
    for attr in FAST_SAMPLER_NAMES:
        assert not hasattr(Sampler, attr), attr
        assert hasattr(FastPathSampler, attr), attr


def test_the_builtins_with_fast_paths_derive_from_the_internal_layer():
    for cls in (Temperature, TopK, TopP, MinP, MaskProcessor, ThresholdProcessor):
        assert issubclass(cls, FastPathProcessor), cls
    for cls in (Categorical, Greedy):
        assert issubclass(cls, FastPathSampler), cls


def _dense_reference(steps, x):
    ctx = StepContext(x.shape[0], x.shape[1])
    y = x.clone()
    for spec in steps:
        y = spec.cls.for_batch(spec.params, x.shape[0]).apply(y.clone(), ctx)
    return y


@pytest.mark.parametrize("order", [
    "after_top_k",          # a candidate list is live when the plain step comes
    "last_after_min_p",     # last step, where a threshold step would hand the sampler a cut
    "between_temperature_and_top_k",     # where a monotone step could be deferred past top_k
    "before_temperature",   # monotone steps at the end, after a plain one
])
def test_a_plain_processor_gets_exactly_apply(order):
    steps = {
        "after_top_k": [TopK.spec(top_k=50), HalveTail.spec(), Temperature.spec(temperature=0.7)],
        "last_after_min_p": [MinP.spec(min_p=0.05), HalveTail.spec()],
        "between_temperature_and_top_k": [Temperature.spec(temperature=0.7), HalveTail.spec(), TopK.spec(top_k=20)],
        "before_temperature": [TopP.spec(top_p=0.9), HalveTail.spec(), Temperature.spec(temperature=0.7)],
    }[order]
    x = torch.randn(4, 3000, generator=torch.Generator().manual_seed(3)) * 3
    given = x.clone()
    for sampler in (Categorical.spec(seed=1), Greedy.spec(), FirstFinite.spec()):
        pipeline = Pipeline(steps, sampler=sampler)
        HalveTail.calls.clear()
        processed = pipeline.process(x)
        assert HalveTail.calls == ["apply"]
        assert torch.equal(processed, _dense_reference(steps, x))
        FirstFinite.calls.clear()
        ids = pipeline.bind(4).sample(x)
        assert ids.shape == (4,)
        assert torch.equal(x, given)           # the caller's logits are never written
        if sampler.cls is FirstFinite:
            assert FirstFinite.calls == ["sample"]
            assert torch.equal(ids, torch.isfinite(processed).to(torch.int8).argmax(dim=-1))
        elif sampler.cls is Greedy:
            assert torch.equal(ids, processed.argmax(dim=-1))


def test_a_plain_sampler_gets_exactly_sample_after_every_fast_form():
    x = torch.randn(4, 3000, generator=torch.Generator().manual_seed(5)) * 3
    for steps in ([TopK.spec(top_k=50)],                                     # a candidate list
                  [MinP.spec(min_p=0.05)],                                   # a cut, last step
                  [TopP.spec(top_p=0.9), Temperature.spec(temperature=0.7)]):   # a cut before a monotone step
        FirstFinite.calls.clear()
        ids = Pipeline(steps, sampler=FirstFinite.spec()).bind(4).sample(x)
        assert FirstFinite.calls == ["sample"]
        want = torch.isfinite(_dense_reference(steps, x)).to(torch.int8).argmax(dim=-1)
        assert torch.equal(ids, want)
