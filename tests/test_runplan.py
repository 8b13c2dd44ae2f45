"""The run plan is decided when a pipeline is bound, the run's state is one typed value
(samplerkit/runplan.py, issue 15 item 11), and the one-shot calls reuse what binding built when
a fresh bind would build the same (issue 19)."""

from __future__ import annotations

import torch

import samplerkit
from samplerkit import Processor
from samplerkit.context import StepContext
from samplerkit.errors import PluginError
from samplerkit.ops import sync
from samplerkit.pipeline import BoundPipeline
from samplerkit.runplan import Candidates, Dense, PendingCut, run_steps
from samplerkit.testing import temporary_plugin


def load(steps, sampler="categorical", registry=None):
    return samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps, "sampler": sampler}, registry=registry)


def flat(batch=4, vocab=3000, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed))


def test_the_plan_names_the_deferred_steps_the_tail_and_the_cut_step():
    plan = load([{"top_p": 0.9}, {"temperature": 0.7}]).bind(2)._plan
    assert [s.spec.name for s in plan.tail] == ["temperature"]
    assert [(s.spec.name, s.cut) for s in plan.stages] == [("top_p", "before_tail"), ("temperature", "last")]
    plan = load([{"temperature": 0.7}, {"top_k": 50}, {"top_p": 0.9}]).bind(2)._plan
    assert [s.monotone for s in plan.stages] == [True, False, False] and plan.tail == ()
    assert [s.cut for s in plan.stages] == [None, None, "last"]
    # A sampler without sample_cut is never handed a threshold.
    assert all(s.cut is None for s in load([{"min_p": 0.1}], sampler="greedy").bind(2)._plan.stages)


def test_each_run_ends_in_one_typed_state():
    x = flat()
    ctx = StepContext(4, 3000)
    bound = load([{"temperature": 0.7}, {"top_k": 20}]).bind(4, seeds=[1, 2, 3, 4])
    state = run_steps(bound._plan, x, ctx, bound._work, checks=None, sampling=False)
    assert isinstance(state, Candidates) and state.values.shape == (4, 20)
    bound = load([{"min_p": 0.05}]).bind(4, seeds=[1, 2, 3, 4])
    pending = run_steps(bound._plan, x, ctx, bound._work, checks=[], sampling=True)
    assert isinstance(pending, PendingCut)
    dense = run_steps(bound._plan, x, ctx, bound._work, checks=None, sampling=False)
    assert isinstance(dense, Dense) and dense.owned
    assert torch.equal(pending.to_dense(3000).values, dense.values)          # the same logits either way
    assert torch.equal(bound.process(x), dense.values) and bound.process(x) is not x


def test_sync_free_or_checked_is_decided_when_bound(monkeypatch):
    """A sampler that picks a removed token: the checked path names it; a pipeline bound for the
    sync-free path skips that device-side check, whatever the flag says at call time."""
    class Lowest(samplerkit.Sampler):
        name = "lowest"

        def sample(self, logits, ctx):
            return logits.argmin(-1)

    with temporary_plugin([Lowest]) as registry:
        pipe = load([{"top_k": 3}], sampler="lowest", registry=registry)
        checked = pipe.bind(2)
        monkeypatch.setattr(sync, "FORCE", True)
        sync_free = pipe.bind(2)
        assert sync_free._plan.sync_free and not checked._plan.sync_free
        x = flat(2, 50)
        try:
            checked.sample(x)
        except PluginError as exc:
            assert "chose tokens the processed logits removed" in str(exc)
        else:
            raise AssertionError("the checked path did not check the sampler's ids")
        assert sync_free.sample(x).shape == (2,)
        monkeypatch.setattr(sync, "FORCE", False)
        assert sync_free.sample(x).shape == (2,)        # still the plan it was bound with


def _bound_pipelines_used(pipe, calls):
    """The BoundPipeline objects that one-shot ``calls(pipe)`` sampled with."""
    used = []
    original = BoundPipeline.sample

    def sample(self, *args, **kwargs):
        used.append(self)
        return original(self, *args, **kwargs)

    BoundPipeline.sample = sample
    try:
        calls(pipe)
    finally:
        BoundPipeline.sample = original
    return used


def test_one_shot_reuses_the_bound_pipeline_when_every_row_is_seeded(monkeypatch):
    pipe = load([{"temperature": 0.7}, {"top_k": 50}, {"top_p": 0.9}])
    x = flat(6)
    seeds = [5, 6, 7, 8, 9, 10]
    used = _bound_pipelines_used(pipe, lambda p: [p.sample(x, seeds=seeds) for _ in range(3)])
    assert used[0].sampler is used[1].sampler is used[2].sampler                # the same steps, not rebuilt
    assert [s for _, s in used[0].steps] == [s for _, s in used[2].steps] and used[0]._work is used[2]._work
    assert torch.equal(pipe.sample(x, seeds=seeds), pipe.bind(6, seeds=seeds).sample(x))
    # Other seeds, another implementation: a new bind each time. (A row without a seed reuses
    # the steps, drawing its seed again: tests/test_one_shot_unseeded.py.)
    other = _bound_pipelines_used(pipe, lambda p: [p.sample(x, seeds=[1, 2, 3, 4, 5, 6]), p.sample(x, seeds=seeds)])
    assert other[0].sampler is not used[0].sampler and other[1].sampler is not other[0].sampler
    unseeded = _bound_pipelines_used(pipe, lambda p: [p.sample(x, seeds=[5, None, 7, 8, 9, 10]) for _ in range(2)])
    assert unseeded[0].sampler is unseeded[1].sampler is not used[0].sampler
    before = _bound_pipelines_used(pipe, lambda p: p.sample(x, seeds=seeds))
    monkeypatch.setattr(sync, "FORCE", True)
    forced = _bound_pipelines_used(pipe, lambda p: p.sample(x, seeds=seeds))
    assert forced[0].sampler is not before[0].sampler and forced[0]._plan.sync_free


def test_one_shot_binds_afresh_around_a_step_that_may_keep_state():
    """A plain Processor does not declare ``reusable``: each one-shot call builds it anew, so
    state it keeps from call to call never leaks into the next call."""
    class CountCalls(Processor):
        name = "count_calls"

        def __init__(self, rows, device="cpu"):
            super().__init__(rows, device)
            self.calls = 0

        def apply(self, logits, ctx):
            self.calls += 1
            return logits - 1000.0 * self.calls * (torch.arange(logits.shape[-1]) == self.calls)

    with temporary_plugin([CountCalls]) as registry:
        pipe = load([{"count_calls": {}}, {"top_k": 5}], registry=registry)
        x = torch.zeros(2, 40)
        seeds = [1, 2]
        fresh = pipe.bind(2, seeds=seeds).process(x)
        used = _bound_pipelines_used(pipe, lambda p: [p.sample(x, seeds=seeds) for _ in range(2)])
        assert used[0].sampler is not used[1].sampler
        for _ in range(2):
            assert torch.equal(pipe.process(x), fresh)


def test_one_shot_calls_do_not_keep_their_pipeline_alive():
    """The per-thread cache is keyed weakly by the pipeline: a pipeline used only for one-shot
    calls is freed with its workspaces when the caller drops it."""
    import gc
    import weakref

    pipe = load([{"top_k": 50}, {"top_p": 0.9}])
    pipe.sample(flat(4), seeds=[1, 2, 3, 4])
    pipe.sample(flat(4), seeds=[1, 2, 3, 4])
    ref = weakref.ref(pipe)
    del pipe
    gc.collect()
    assert ref() is None
