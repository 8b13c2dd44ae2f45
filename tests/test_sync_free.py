"""The sync-free paths (what CUDA runs, see samplerkit.ops.sync), checked on CPU: the same kept
sets and the same tokens as the checked CPU paths and the sequential dense reference."""

from __future__ import annotations

import pytest
import torch

import samplerkit
import samplerkit.builtins.truncation.top_k
from samplerkit.context import StepContext
from samplerkit.errors import InvalidLogitsError
from samplerkit.ops import sync, top_k_mask
from samplerkit.ops.candidates import top_k_candidates_keyed, top_k_candidates_repaired
from samplerkit.testing import FAST_PATH_CHAINS


def _logits(seed, batch=24, vocab=3000):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * torch.linspace(0.05, 8, batch).unsqueeze(-1)
    x[0] = 0.0                                              # all equal
    x[1, : vocab - 30] = float("-inf")                       # mostly -inf
    x[2] = torch.randint(0, 3, (vocab,), generator=g).float()   # ties everywhere
    return x


def _bound(steps, batch, policy="raise"):
    pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps, "sampler": "categorical",
                                     "on_invalid": policy})
    return pipe.bind(batch, seeds=list(range(batch)))


@pytest.mark.parametrize("steps", FAST_PATH_CHAINS, ids=lambda s: "+".join(next(iter(d)) for d in s))
@pytest.mark.parametrize("seed", range(3))
def test_sync_free_path_equals_the_checked_path_and_the_dense_reference(steps, seed, monkeypatch):
    x = _logits(seed)
    batch, vocab = x.shape
    checked = _bound(steps, batch)
    want_processed, want_ids = checked.process(x), checked.sample(x, StepContext(batch, vocab))
    monkeypatch.setattr(sync, "FORCE", True)
    bound = _bound(steps, batch)                 # steps read the flag when they are built
    ctx = StepContext(batch, vocab)
    got = bound.process(x, ctx)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want_processed))
    assert torch.equal(got[torch.isfinite(got)], want_processed[torch.isfinite(want_processed)])
    ids, valid = bound.sample_async(x, ctx)
    assert bool(valid.all())
    assert torch.equal(ids, want_ids)
    dense = x.clone()
    for _, step in bound.steps:
        dense = step.apply(dense, ctx)
    assert torch.equal(bound.sampler.sample(dense, ctx), ids)


@pytest.mark.parametrize("select", [top_k_candidates_keyed, top_k_candidates_repaired])
def test_sync_free_top_k_keeps_the_lower_ids_among_ties(select):
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        x = torch.randint(-3, 4, (16, 500), generator=g).float() * [1.0, 0.5, 1e-30, 1e30][trial % 4]
        x[0, :400] = float("-inf")
        x[1, 5], x[1, 6] = -0.0, 0.0                        # equal values, different bits
        k = torch.randint(1, 60, (16,), generator=g)
        values, ids = select(x, k, int(k.max()))
        kept = torch.zeros_like(x, dtype=torch.bool)
        used = torch.arange(ids.shape[1]) < k.unsqueeze(-1)
        kept[torch.arange(16).unsqueeze(-1).expand_as(ids)[used], ids[used]] = True   # unused ids may repeat
        assert int(kept.sum()) == int(used.sum())                                   # used ids are distinct
        assert torch.equal(kept, top_k_mask(x, k, int(k.max())))
        assert torch.equal(values, x.gather(-1, ids).masked_fill(~used, float("-inf")))
        assert bool((values[:, :-1] >= values[:, 1:]).all())               # sorted descending


@pytest.mark.parametrize("select", [top_k_candidates_keyed, top_k_candidates_repaired])
def test_sync_free_top_k_after_a_division_that_creates_ties(select, monkeypatch):
    """Logits one ulp apart that temperature merges into ties at the boundary: the deferred
    division is applied before the selection, so the lower-id rule holds on the divided values."""
    monkeypatch.setattr(sync, "FORCE", True)
    monkeypatch.setattr(samplerkit.builtins.truncation.top_k, "SYNC_FREE_TOP_K", select)
    g = torch.Generator().manual_seed(1)
    base = 1.0 + torch.rand(16, 1, generator=g)
    x = base + torch.stack([torch.randperm(600, generator=g) for _ in range(16)]).float() * torch.finfo(torch.float32).eps
    for temperature, k in ((3.0, 7), (0.37, 50), (7.1, 300), (1.5, 1)):
        steps = [{"temperature": temperature}, {"top_k": k}, {"top_p": 0.9}]
        bound = _bound(steps, 16)
        ctx = StepContext(16, 600)
        dense = x.clone()
        for _, step in bound.steps:
            dense = step.apply(dense, ctx)
        got = bound.process(x, ctx)
        assert torch.equal(torch.isfinite(got), torch.isfinite(dense)), (temperature, k)
        assert torch.equal(bound.sample_async(x, ctx)[0], bound.sampler.sample(dense, ctx))


def test_sync_free_temperature_saturates_like_the_checked_path(monkeypatch):
    x = torch.tensor([[3e38, -3e38, 1.0, float("-inf")], [1.0, 2.0, 3.0, float("inf")]])
    want = samplerkit.load_pipeline({"pipeline": [{"temperature": 0.5}], "sampler": "greedy"}).process(x)
    monkeypatch.setattr(sync, "FORCE", True)
    got = samplerkit.load_pipeline({"pipeline": [{"temperature": 0.5}], "sampler": "greedy"}).process(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("steps", [[{"top_k": 5}, {"top_p": 0.9}], [{"min_p": 0.1}], [{"temperature": 0.7}, {"top_p": 0.9}]])
def test_sync_free_invalid_rows(steps, monkeypatch):
    monkeypatch.setattr(sync, "FORCE", True)
    x = _logits(5, batch=6)
    x[3, 7] = float("nan")
    with pytest.raises(InvalidLogitsError, match="row 3"):
        _bound(steps, 6).sample(x)
    ids, valid = _bound(steps, 6, policy="fallback_greedy").sample_with_validity(x)
    assert valid.tolist() == [True, True, True, False, True, True]
    finite = x[3].masked_fill(~torch.isfinite(x[3]), float("-inf"))
    assert int(ids[3]) == int(finite.argmax())
    ids_async, valid_async = _bound(steps, 6).sample_async(x)     # raise policy: no raise, a flag
    assert valid_async.tolist() == valid.tolist()
    assert torch.equal(ids_async[valid], ids[valid])


def test_capture_needs_cuda():
    bound = _bound([{"top_k": 5}], 2)
    with pytest.raises(ValueError, match="CUDA"):
        bound.capture(torch.zeros(2, 300), StepContext(2, 300))
