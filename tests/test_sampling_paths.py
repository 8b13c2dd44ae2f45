"""The fast sampling paths equal the dense reference order bit for bit: temperature last
(llama.cpp's order: a truncation's threshold handed to the sampler with the monotone steps
applied to all logits), and the one-shot ``Pipeline.process``/``sample`` (what a fresh bind
gives, reusing the previous call's bound pipeline or its workspaces)."""

from __future__ import annotations

import threading

import pytest
import torch

import samplerkit
import samplerkit.ops.random as random_ops
from samplerkit.builtins.samplers.categorical import Categorical
from samplerkit.builtins.shaping import Temperature
from samplerkit.builtins.truncation import MinP
from samplerkit.context import StepContext
from samplerkit.pipeline import ONE_SHOT_BATCH_SIZES, BoundPipeline, Pipeline
from samplerkit.registry import default_registry

REGISTRY = default_registry()


def load(steps, sampler="categorical", **extra):
    return samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps, "sampler": sampler, **extra},
                                    registry=REGISTRY)


def logits(kind: str, batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":
        return torch.randn(batch, vocab, generator=g)
    if kind == "peaked":
        base = -torch.arange(1, vocab + 1, dtype=torch.float32).log()
        x = torch.stack([base[torch.randperm(vocab, generator=g)] for _ in range(batch)])
        return x + 0.1 * torch.randn(batch, vocab, generator=g)
    # "ulp_apart": distinct logits one ulp apart, which a division merges into ties, so a kept
    # and a removed logit can become the same float after temperature.
    base = 1.0 + torch.rand(batch, 1, generator=g)
    steps = torch.stack([torch.randperm(vocab, generator=g) for _ in range(batch)]).float()
    return base + steps * torch.finfo(torch.float32).eps


def dense_reference(bound, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Every active step's ``apply`` in order on a copy: the definition of the pipeline."""
    dense = x.clone()
    for _, step in bound.steps:
        dense = step.apply(dense, ctx)
    return dense


TEMPERATURE_LAST = [
    [{"min_p": 0.05}, {"temperature": 0.7}],
    [{"min_p": 0.3}, {"temperature": 3.0}],
    [{"top_p": 0.9}, {"temperature": 0.37}],
    [{"temperature": 1.5}, {"min_p": 0.1}, {"temperature": 0.7}],
    [{"top_k": 50}, {"top_p": 0.9}, {"temperature": 0.7}],
    [{"typical_p": 0.9}, {"temperature": 0.7}],
]


@pytest.mark.parametrize("steps", TEMPERATURE_LAST, ids=lambda s: "->".join(next(iter(d)) for d in s))
@pytest.mark.parametrize("kind,batch,vocab", [("flat", 8, 600), ("peaked", 8, 600), ("ulp_apart", 8, 600),
                                              ("flat", 8, 70_000), ("peaked", 8, 70_000)])
def test_temperature_last_equals_the_dense_order(steps, kind, batch, vocab):
    """Processed logits (kept set and values) and sampled tokens at several positions equal the
    dense reference; rows with neutral truncation parameters are mixed in."""
    x = logits(kind, batch, vocab)
    pipe = load(steps)
    neutral = {"min_p": {"min_p": 0.0}, "top_p": {"top_p": 1.0}, "typical_p": {"typical_p": 1.0}}
    rows = [None if i % 3 else {name: neutral[name] for d in steps for name in d if name in neutral}
            for i in range(batch)]
    bound = pipe.bind(rows, seeds=list(range(batch)))
    for generated in (0, 1, 7):
        ctx = StepContext(batch, vocab)
        ctx.num_generated.fill_(generated)
        dense = dense_reference(bound, x, ctx)
        processed = bound.process(x, ctx)
        assert torch.equal(torch.isfinite(processed), torch.isfinite(dense))
        assert torch.equal(processed[torch.isfinite(processed)], dense[torch.isfinite(dense)])
        assert torch.equal(bound.sample(x, ctx), bound.sampler.sample(dense, ctx))
        assert torch.equal(pipe.sample(x, seeds=list(range(batch)), ctx=ctx),
                           pipe.bind(batch, seeds=list(range(batch))).sampler.sample(
                               dense_reference(pipe.bind(batch), x, ctx), ctx))


@pytest.mark.parametrize("steps", [[{"min_p": 0.05}, {"temperature": 0.7}], [{"top_p": 0.9}, {"temperature": 0.7}]])
def test_temperature_last_hands_the_sampler_a_threshold(steps, monkeypatch):
    """The truncation before a trailing temperature reaches the sampler as a threshold on the
    logits it saw (no dense -inf pass through temperature); the tokens are the dense ones."""
    seen = []
    original = random_ops.race_sample

    def spy(*args, **kwargs):
        seen.append(kwargs.get("source") is not None and kwargs.get("threshold") is not None)
        return original(*args, **kwargs)

    import samplerkit.builtins.samplers.categorical as categorical
    monkeypatch.setattr(categorical, "race_sample", spy)
    x = logits("flat", 8, 70_000)
    bound = load(steps).bind(8, seeds=list(range(8)))
    ctx = StepContext(8, 70_000)
    ids = bound.sample(x, ctx)
    assert seen == [True]
    assert torch.equal(ids, bound.sampler.sample(dense_reference(bound, x, ctx), ctx))


def test_samplers_that_ignore_cut_source_get_dense_logits():
    """A sampler whose sample_cut does not declare ``cut_source`` never gets a cut whose
    threshold applies to other logits than the ones it is handed."""
    calls = []

    class PlainCut(Categorical):
        name = "plain_cut"
        cut_source = False

        def sample_cut(self, logits, cut, ctx):
            calls.append(cut.source)
            return super().sample_cut(logits, cut, ctx)

    x = logits("flat", 4, 3000)
    sampler = PlainCut.spec(seed=0)
    bound = Pipeline([MinP.spec(min_p=0.05), Temperature.spec(temperature=0.7)], sampler=sampler).bind(4)
    ctx = StepContext(4, 3000)
    ids = bound.sample(x, ctx)
    assert calls == []
    assert torch.equal(ids, bound.sampler.sample(dense_reference(bound, x, ctx), ctx))
    Pipeline([Temperature.spec(temperature=0.7), MinP.spec(min_p=0.05)], sampler=sampler).bind(4).sample(x, ctx)
    assert calls == [None]                                  # the last step's cut, as before


def test_temperature_last_with_invalid_rows_matches_the_dense_order():
    x = logits("flat", 6, 2000)
    x[1, 5] = float("nan")
    x[3, 7] = float("inf")
    x[4] = float("-inf")
    pipe = load([{"min_p": 0.05}, {"temperature": 0.7}], on_invalid="mark_invalid")
    bound = pipe.bind(6, seeds=list(range(6)))
    ctx = StepContext(6, 2000)
    ids, valid = bound.sample_with_validity(x, ctx)
    dense = dense_reference(bound, x, ctx)
    assert valid.tolist() == torch.isfinite(dense.amax(dim=-1)).tolist() == [True, False, True, False, False, True]
    good = valid.nonzero().squeeze(-1)
    reference = bound.sampler.sample(dense.masked_fill(~valid.unsqueeze(-1), 0.0), ctx)
    assert torch.equal(ids[good], reference[good])


# -- one-shot calls ------------------------------------------------------------------------------

ONE_SHOT = [
    [{"temperature": 0.7}, {"min_p": 0.05}],
    [{"min_p": 0.05}, {"temperature": 0.7}],
    [{"temperature": 0.7}, {"top_k": 50}, {"top_p": 0.9}],
    [{"temperature": 0.7}, {"typical_p": 0.9}],
]


@pytest.mark.parametrize("steps", ONE_SHOT, ids=lambda s: "->".join(next(iter(d)) for d in s))
def test_one_shot_calls_equal_fresh_binds(steps):
    """Repeated one-shot calls (the later ones reuse workspaces) give exactly what a fresh bind
    gives, seeded or not; an earlier call's processed logits are not overwritten by a later one."""
    pipe = load(steps)
    batch, vocab = 6, 3000
    first_x, second_x = logits("flat", batch, vocab, 1), logits("peaked", batch, vocab, 2)
    first = pipe.process(first_x)
    first_copy = first.clone()
    for x in (first_x, second_x, first_x):
        seeds = [3, None, 5, 7, None, 11]
        torch.manual_seed(42)
        one_shot = pipe.sample(x, seeds=seeds)
        torch.manual_seed(42)
        assert torch.equal(one_shot, pipe.bind(batch, seeds=seeds).sample(x))
        assert torch.equal(pipe.sample(x, seeds=list(range(batch))), pipe.bind(batch, seeds=list(range(batch))).sample(x))
        assert torch.equal(pipe.process(x), pipe.bind(batch).process(x))
    assert torch.equal(first, first_copy)


def test_one_shot_rows_without_seeds_draw_new_tokens_each_call():
    pipe = load([{"temperature": 1.0}])
    x = torch.zeros(64, 1000)
    draws = {tuple(pipe.sample(x).tolist()) for _ in range(3)}
    assert len(draws) == 3


def test_one_shot_reuses_workspaces_per_batch_size_and_thread():
    pipe = load([{"min_p": 0.05}, {"temperature": 0.7}])
    x = logits("flat", 4, 3000)

    def sampler_workspace():
        captured = []
        original = BoundPipeline.sample

        def sample(self, *args, **kwargs):          # the bound pipeline the one-shot call used
            captured.append(self)
            return original(self, *args, **kwargs)

        BoundPipeline.sample = sample
        try:
            pipe.sample(x, seeds=[1, 2, 3, 4])
        finally:
            BoundPipeline.sample = original
        return captured[0].sampler._work

    first = sampler_workspace()
    assert first and sampler_workspace() is first          # reused on this thread
    pipe.sample(logits("flat", 2, 3000))                   # another batch size: its own
    assert sampler_workspace() is first
    for batch in range(5, 5 + ONE_SHOT_BATCH_SIZES):       # the least recently used size goes
        pipe.sample(logits("flat", batch, 3000))
    assert sampler_workspace() is not first
    other = []
    thread = threading.Thread(target=lambda: other.append(sampler_workspace()))
    thread.start()
    thread.join()
    assert other[0] is not first                           # another thread: never shared


def test_one_shot_calls_from_threads_equal_fresh_binds():
    pipe = load([{"min_p": 0.05}, {"temperature": 0.7}])
    inputs = [logits(kind, 8, 5000, seed) for seed in range(4) for kind in ("flat", "peaked")]
    seeds = list(range(8))
    expected = [pipe.bind(8, seeds=seeds).sample(x) for x in inputs]
    results: dict[int, list] = {}

    def worker(t: int) -> None:
        results[t] = [pipe.sample(x, seeds=seeds) for _ in range(3) for x in inputs]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for t in range(3):
        for i, ids in enumerate(results[t]):
            assert torch.equal(ids, expected[i % len(inputs)])


def test_one_shot_with_a_stateful_sampler_equals_fresh_binds():
    """mirostat's mu changes with every draw: a one-shot call starts from a fresh one."""
    if not REGISTRY.has("sampler", "mirostat_v2"):
        pytest.skip("the samplerkit-mirostat plugin is not installed")
    pipe = load([{"temperature": 0.7}], sampler={"name": "mirostat_v2", "tau": 3.0, "eta": 0.5})
    x = logits("peaked", 4, 3000)
    for _ in range(3):
        assert torch.equal(pipe.sample(x, seeds=[1, 2, 3, 4]), pipe.bind(4, seeds=[1, 2, 3, 4]).sample(x))


@pytest.mark.parametrize("divisor", [0.5, 1e-3, 2.0])
def test_temperature_after_a_truncation_saturates_exactly_like_the_in_place_check(divisor):
    """Logits with -inf (removed), +-inf, NaN and finite values near the float32 range: the
    division into another tensor (the one-pass overflow check) equals the in-place one (the
    exact masks), overflowing finite logits saturating at +-float32 max."""
    from samplerkit.builtins.shaping.temperature import finite_division
    big = torch.finfo(torch.float32).max
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5000, generator=g)
    x[:, ::7] = float("-inf")
    x[1, 3], x[2, 4], x[3, 5], x[3, 6] = big, -big, float("nan"), float("inf")
    x[4, 10], x[4, 11] = 3e38, -3e38
    d = torch.full((6, 1), divisor)
    into = finite_division(x, d, torch.empty_like(x))
    y = x.clone()
    in_place = finite_division(y, d, y)
    assert torch.equal(into.isnan(), in_place.isnan())
    keep = ~into.isnan()
    assert torch.equal(into[keep], in_place[keep])
    if divisor < 1:
        assert into[1, 3] == big and into[2, 4] == -big and into[4, 10] == big and into[4, 11] == -big
    assert torch.isinf(into[:, ::7]).all() and (into[:, ::7] < 0).all()
