"""The one-shot ``Pipeline.sample`` with rows without a seed reuses the bound pipeline of the
thread's previous call, drawing those rows' seeds again as a fresh bind would."""

from __future__ import annotations

import threading

import pytest
import torch

import samplerkit
from samplerkit.pipeline import BoundPipeline
from samplerkit.registry import default_registry

REGISTRY = default_registry()


def load(steps):
    return samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps, "sampler": "categorical"},
                                    registry=REGISTRY)


def flat(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed))


def count_binds(monkeypatch) -> list:
    built = []
    original = BoundPipeline.__init__

    def init(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(BoundPipeline, "__init__", init)
    return built


# (steps, whether the one-shot call reuses the bound pipeline: xtc is a plain, seeded Processor)
PIPELINES = [
    ([{"temperature": 0.7}, {"min_p": 0.05}], True),
    ([{"min_p": 0.05}, {"temperature": 0.7}], True),
    ([{"temperature": 0.7}, {"top_k": 50}, {"top_p": 0.9}], True),
    ([{"xtc": {"threshold": 0.05, "probability": 0.5}}, {"temperature": 0.9}], False),
]


@pytest.mark.parametrize("steps, reused", PIPELINES, ids=lambda s: "->".join(next(iter(d)) for d in s)
                         if isinstance(s, list) else str(s))
@pytest.mark.parametrize("seeds", [None, [3, None, 5, None, None, 11]])
def test_unseeded_one_shot_calls_reuse_the_bound_pipeline_and_equal_fresh_binds(steps, reused, seeds, monkeypatch):
    """After the first call no bind happens; each call still draws exactly what a fresh bind
    after the same torch.manual_seed draws, and leaves the global generator where it does."""
    pipe = load(steps)
    x = flat(6, 3000)
    built = count_binds(monkeypatch)
    for call in range(4):
        torch.manual_seed(100 + call)
        one_shot = pipe.sample(x, seeds=seeds)
        after = torch.rand(3)
        torch.manual_seed(100 + call)
        fresh = pipe.bind(6, seeds=seeds)
        assert torch.equal(one_shot, fresh.sample(x))
        assert torch.equal(after, torch.rand(3))          # the same generator calls
    # Reused: the first one-shot call binds, then only the fresh binds here do.
    assert len(built) == (1 + 4 if reused else 4 + 4)


def test_unseeded_one_shot_calls_draw_independently():
    """Uniform logits over 1000 tokens, 64 rows: a repeated draw would match on every row."""
    pipe = load([{"temperature": 1.0}])
    x = torch.zeros(64, 1000)
    draws = [pipe.sample(x) for _ in range(4)]
    for i in range(4):
        for j in range(i):
            assert int((draws[i] == draws[j]).sum()) < 8


def test_manual_seed_reproduces_an_unseeded_one_shot_call():
    pipe = load([{"temperature": 0.7}, {"min_p": 0.05}])
    x = flat(8, 5000, 1)
    pipe.sample(x)                                         # the cache is warm
    torch.manual_seed(7)
    first = pipe.sample(x)
    torch.manual_seed(7)
    assert torch.equal(pipe.sample(x), first)


def test_unseeded_one_shot_calls_from_threads():
    """Threads keep their own reused pipelines: reseeding in one never changes another's seeded
    rows, and every call gives valid tokens of the processed logits."""
    pipe = load([{"min_p": 0.05}, {"temperature": 0.7}])
    x = flat(8, 5000, 2)
    seeds = [1, None, 2, None, 3, None, 4, None]
    seeded_rows = [i for i, s in enumerate(seeds) if s is not None]
    expected = pipe.bind(8, seeds=seeds).sample(x)[seeded_rows]
    kept = torch.isfinite(pipe.process(x))
    failures: list = []

    def worker() -> None:
        for _ in range(6):
            ids = pipe.sample(x, seeds=seeds)
            if not torch.equal(ids[seeded_rows], expected) or not bool(kept.gather(1, ids.unsqueeze(1)).all()):
                failures.append(ids)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
