"""The continuous-batching Engine: requests join and leave a running batch between steps."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from samplerkit import ConfigError, GenerationError, Generator, Pipeline, PluginError, Processor
from samplerkit.builtins.backends.bigram import BigramBackend
from samplerkit.builtins.samplers import Categorical
from samplerkit.engine import CANCELLED, Engine, EngineClosedError
from samplerkit.registry import default_registry

REGISTRY = default_registry()
CONFIG = {"backend": "bigram", "pipeline": [{"temperature": 0.9}], "sampler": "categorical",
          "generation": {"max_new_tokens": 20}}
PROMPTS = ["the cat ", "a dog", "le café ", "where is the ", "x"]


def generator(backend=None):
    return Generator(CONFIG, backend=backend or BigramBackend(), registry=REGISTRY)


def alone(gen, prompt, seed, **kw):
    return gen.generate([prompt], seeds=[seed], **kw)


def test_seeded_requests_equal_generate_whatever_joins_when():
    gen = generator()
    ref = {i: alone(gen, p, 10 + i)[0].token_ids for i, p in enumerate(PROMPTS)}
    engine = Engine(gen, max_rows=3)                   # fewer rows than requests: some wait
    reqs = {0: engine.submit(PROMPTS[0], seed=10)}
    engine.step()
    engine.step()
    reqs[1] = engine.submit(PROMPTS[1], seed=11)
    noise = engine.submit("zzz", pipeline="greedy", max_new_tokens=3)
    engine.step()
    for i in (2, 3, 4):
        reqs[i] = engine.submit(PROMPTS[i], seed=10 + i)
    assert engine.waiting >= 1
    engine.run_until_idle()
    for i, req in reqs.items():
        assert req.result()[0].token_ids == ref[i], i
    assert noise.result()[0].finish_reason in ("stop", "length")
    assert engine.running_rows == 0 and engine.waiting == 0


def test_events_make_up_the_result_and_n_samples_match_generate():
    gen = generator()
    ref = gen.generate(["the sea "], seeds=[4], n=3, stop=["."])
    engine = Engine(gen)
    other = engine.submit("the sun ", seed=1, max_new_tokens=5)
    req = engine.submit("the sea ", seed=4, n=3, stop=["."])
    engine.run_until_idle()
    got = req.result()
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    events = list(req)
    for c in got:
        mine = [e for e in events if e.sample_index == c.sample_index]
        assert "".join(e.text for e in mine) == c.text
        assert [e.finish_reason for e in mine][-1] == c.finish_reason
        assert all(e.finish_reason is None for e in mine[:-1])
    assert list(req) == events                          # every iterator sees every event
    assert len(other.result()[0].token_ids) <= 5


def test_logprobs_and_echo_through_the_engine_match_generate():
    gen = generator()
    ref = gen.generate(["the cat "], seeds=[2], logprobs=2, echo=True, max_new_tokens=6)[0]
    engine = Engine(gen)
    engine.submit("a dog ", seed=1)
    req = engine.submit("the cat ", seed=2, logprobs=2, echo=True, max_new_tokens=6)
    only_echo = engine.submit("the cat ", echo=True, logprobs=1, max_new_tokens=0)
    engine.run_until_idle()
    got = req.result()[0]
    assert got.token_ids == ref.token_ids
    assert [lp.logprob for lp in got.logprobs] == pytest.approx([lp.logprob for lp in ref.logprobs])
    assert [lp and lp.logprob for lp in got.prompt_logprobs] == [lp and lp.logprob for lp in ref.prompt_logprobs]
    echo = only_echo.result()[0]
    assert echo.token_ids == [] and echo.finish_reason == "length" and len(echo.prompt_logprobs) == 9


def test_cancel_frees_rows_before_the_next_step():
    engine = Engine(generator(), max_rows=4)
    a = engine.submit("the cat ", seed=1, max_new_tokens=200, ignore_eos=True)
    b = engine.submit("the dog ", seed=2, max_new_tokens=200, ignore_eos=True, n=3)
    waiting = engine.submit("later", seed=3, max_new_tokens=5)
    engine.step()
    engine.step()
    assert engine.running_rows == 4 and engine.waiting == 1
    waiting.cancel()                                    # a waiting request ends at once
    assert waiting.done and engine.waiting == 0
    assert waiting.result()[0].finish_reason == CANCELLED
    b.cancel()
    engine.step()
    assert engine.running_rows == 1                     # b's three rows left before that step
    got = b.result()
    assert [c.finish_reason for c in got] == [CANCELLED] * 3
    assert all(1 <= len(c.token_ids) <= 3 for c in got)
    assert [e.finish_reason for e in b][-3:] == [CANCELLED] * 3
    a.cancel()
    engine.run_until_idle()
    assert a.result()[0].finish_reason == CANCELLED and engine.running_rows == 0


def test_background_thread_with_submits_from_many_threads_and_close():
    gen = generator()
    ref = {s: alone(gen, PROMPTS[s % 5], s)[0].token_ids for s in range(12)}
    results: dict[int, list[int]] = {}
    with Engine(gen, max_rows=5) as engine:
        def client(s):
            results[s] = engine.submit(PROMPTS[s % 5], seed=s).result(timeout=60)[0].token_ids
        threads = [threading.Thread(target=client, args=(s,)) for s in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        endless = engine.submit("the ", max_new_tokens=10_000, ignore_eos=True)
    assert results == ref
    assert endless.result(timeout=10)[0].finish_reason == CANCELLED    # close() cancelled it
    with pytest.raises(EngineClosedError):
        engine.submit("x")
    assert gen.generate(["x"], seeds=[1])                              # the Generator is free again


def test_events_async_streams_without_blocking_the_loop():
    gen = generator()
    ref = alone(gen, "the cat ", 5)[0]

    async def main():
        with Engine(gen) as engine:
            req = engine.submit("the cat ", seed=5)
            ticks = 0

            async def ticker():
                nonlocal ticks
                while not req.done:
                    ticks += 1
                    await asyncio.sleep(0)
            tick = asyncio.create_task(ticker())
            text = "".join([d.text async for d in req.events_async()])
            await tick
            return text, (await req.result_async())[0], ticks
    text, completion, ticks = asyncio.run(main())
    assert text == ref.text == completion.text
    assert ticks > 0


def test_submit_validates_before_queuing():
    engine = Engine(generator(), max_rows=2, max_waiting=1)
    with pytest.raises(ConfigError, match=r"pipelines\[0\] pipeline\[0\] top_p"):
        engine.submit("x", pipeline={"pipeline": [{"top_p": 2.0}]})
    with pytest.raises(ConfigError, match=r"seeds\[0\] \(pipelines\[0\]\): no step of this pipeline takes a seed"):
        engine.submit("x", pipeline="greedy", seed=3)
    with pytest.raises(ConfigError, match=r"generation.max_new_tokens"):
        engine.submit("x", max_new_tokens=-1)
    with pytest.raises(GenerationError, match=r"n=3 needs 3 rows but this engine runs at most max_rows=2"):
        engine.submit("x", n=3)
    with pytest.raises(GenerationError, match=r"submit takes one prompt"):
        engine.submit(["a", "b"])
    with pytest.raises(GenerationError, match="max_rows must be an int >= 1"):
        Engine(generator(), max_rows=0)
    engine.submit("x")
    with pytest.raises(GenerationError, match=r"too many waiting requests \(1, max_waiting=1\)"):
        engine.submit("y")
    assert engine.waiting == 1


class Boom(Processor):
    """A plugin step that fails on the third token."""

    name = "boom"

    def apply(self, logits, ctx):
        if int(ctx.num_generated.max()) >= 2:
            raise RuntimeError("kaput")
        return logits


def test_a_failing_pipeline_ends_only_its_request():
    gen = generator()
    ref = alone(gen, "the cat ", 8)[0].token_ids
    broken = Pipeline([Boom.spec()], sampler=Categorical.spec())
    engine = Engine(gen)
    good = engine.submit("the cat ", seed=8)
    bad = engine.submit("the dog ", pipeline=broken, max_new_tokens=10, ignore_eos=True)
    engine.run_until_idle()
    assert good.result()[0].token_ids == ref
    with pytest.raises(PluginError, match="kaput"):
        bad.result()
    assert len([e for e in _events_until_error(bad)]) == 2


def _events_until_error(req):
    out = []
    try:
        for e in req:
            out.append(e)
    except PluginError:
        pass
    return out


class NoJoinBigram(BigramBackend):
    """A backend without join(): the engine re-prefills every running sequence instead."""

    can_join = False
    join = BigramBackend.__mro__[1].join                 # the base class's NotImplementedError


def test_backends_without_join_fall_back_to_prefilling_again():
    gen = generator(NoJoinBigram())
    assert not gen.backend.can_join
    ref = {i: alone(gen, p, 20 + i)[0].token_ids for i, p in enumerate(PROMPTS)}
    engine = Engine(gen, max_rows=8)
    reqs = {}
    for i, p in enumerate(PROMPTS):
        reqs[i] = engine.submit(p, seed=20 + i, n=1 + i % 2)
        engine.step()
    engine.run_until_idle()
    for i, req in reqs.items():
        assert req.result()[0].token_ids == ref[i], i


# -- the llama backend's join ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from samplerkit.testing.tiny_models import save_tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "llama"
    save_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tiny_dir):
    from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams

    return LlamaBackend(LlamaParams(model=str(tiny_dir)))


def test_a_plugin_backend_without_join_serves_the_engine(tiny_dir):
    """samplerkit-transformers has no join(): the engine re-prefills the running rows."""
    pytest.importorskip("samplerkit_transformers")
    config = {"backend": {"name": "transformers", "model": str(tiny_dir)}, "pipeline": [], "sampler": "greedy",
              "generation": {"max_new_tokens": 6}}
    gen = Generator(config, registry=REGISTRY)
    assert not gen.backend.can_join
    prompts = ["The quick brown", "Pack my box", "Sphinx of black quartz, judge"]
    ref = [gen.generate([p])[0].token_ids for p in prompts]
    engine = Engine(gen)
    reqs = [engine.submit(prompts[0])]
    engine.step()
    reqs.append(engine.submit(prompts[1]))
    engine.step()
    reqs.append(engine.submit(prompts[2]))
    engine.run_until_idle()
    assert [r.result()[0].token_ids for r in reqs] == ref


def test_llama_join_appends_rows_that_continue_as_if_alone(tiny_llama):
    model = tiny_llama.model
    a, b, c = [5, 6, 7, 8, 9, 10], [11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]

    def alone_run(prompt, steps):
        last, _ = model.prefill([prompt])
        out = [last[0]]
        for t in steps:
            out.append(model.step(torch.tensor([t]))[0])
        return out

    ref_a = alone_run(a, [20, 21, 22, 23])
    ref_b = alone_run(b, [30, 31, 32])
    ref_c = alone_run(c, [40, 41])
    last, _ = model.prefill([a])
    got_a = [last[0], model.step(torch.tensor([20]))[0]]             # a: 7 tokens so far
    lb, _ = model.join([b])                                          # shorter: right-aligned, padded
    got_b = [lb[0]]
    step = model.step(torch.tensor([21, 30]))
    got_a.append(step[0])
    got_b.append(step[1])
    lc, _ = model.join([c])                                          # longer than the batch: old rows shift
    got_c = [lc[0]]
    step = model.step(torch.tensor([22, 31, 40]))
    got_a.append(step[0])
    got_b.append(step[1])
    got_c.append(step[2])
    model.select_rows([1, 2])                                        # a leaves; the cache is trimmed
    assert model._len == len(c) + 1
    step = model.step(torch.tensor([32, 41]))
    got_b.append(step[0])
    got_c.append(step[1])
    for got, ref in ((got_a, ref_a[:4]), (got_b, ref_b), (got_c, ref_c)):
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


# -- the default model (slow) ----------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_seeded_requests_equal_generate_with_joins(default_model_path):
    gen = Generator({"generation": {"max_new_tokens": 5}})
    prompts = ["The capital of France is", "Once upon a time", "A long prompt, with many more tokens than the "
               "others in this batch, so that joining it shifts every running row:"]
    ref = [gen.generate([p], seeds=[i])[0].token_ids for i, p in enumerate(prompts)]
    engine = Engine(gen)
    reqs = [engine.submit(prompts[0], seed=0)]
    engine.step()
    reqs.append(engine.submit(prompts[1], seed=1))
    engine.submit("Hi", pipeline="greedy", max_new_tokens=2)
    engine.step()
    reqs.append(engine.submit(prompts[2], seed=2))
    engine.run_until_idle()
    assert [r.result()[0].token_ids for r in reqs] == ref


def test_stream_events_carry_every_token_and_its_logprobs():
    """A step whose token completes no character has no event: its token (and logprob) come
    with the row's next event, so the events add up to the completion."""
    french = ("le café crème est très bon. la crème brûlée est très sucrée. "
              "le thé vert est léger. où est le café? à côté du thé.")
    gen = generator(BigramBackend(BigramBackend.Params(text=french)))
    engine = Engine(gen)
    req = engine.submit("le café crème ", seed=3, logprobs=1, max_new_tokens=30)   # multi-byte characters
    engine.run_until_idle()
    events, done = list(req), req.result()[0]
    assert len(events) < len(done.token_ids)            # some steps completed no character
    assert [t for e in events for t in e.token_ids][:len(done.token_ids)] == done.token_ids
    assert [lp for e in events for lp in e.logprobs] == done.logprobs
    streamed = list(gen.stream(["le café crème "], seeds=[3], logprobs=1, max_new_tokens=30))
    assert [t for e in streamed for t in e.token_ids] == [t for e in events for t in e.token_ids]


def test_a_shared_generator_waits_while_the_engine_has_running_rows():
    gen = generator()
    engine = Engine(gen)
    engine.submit("the cat ", seed=1, max_new_tokens=5, ignore_eos=True)
    engine.step()                                        # rows running: the engine holds the Generator
    done = threading.Event()
    worker = threading.Thread(target=lambda: (gen.generate(["x"], max_new_tokens=2), done.set()))
    worker.start()
    assert not done.wait(0.5)
    engine.run_until_idle()                              # idle: the Generator is free again
    worker.join(30)
    assert done.is_set()


@pytest.mark.parametrize("atomic", [True, False])
def test_a_failed_join_ends_the_joining_request_and_the_running_ones_unless_the_join_is_atomic(failing_backend,
                                                                                               atomic):
    """A join that raises on a backend that declares ``join_is_atomic`` (the bigram backend
    does: it leaves the running rows as they were) fails only the joining request, and the
    running one goes on to the tokens it gets alone. Without the declaration the running rows
    are in an unknown state, so they end with the error too. Either way the engine goes on."""
    failing_backend.join_is_atomic = atomic
    gen = generator(failing_backend)
    engine = Engine(gen)
    running = engine.submit("the cat ", seed=1, max_new_tokens=50, ignore_eos=True)
    engine.step()
    joining = engine.submit("bang!", seed=2)
    engine.step()
    for req in (joining,) if atomic else (running, joining):
        with pytest.raises(PluginError, match="join broke"):
            req.result(timeout=5)
    later = engine.submit("the dog ", seed=3)
    engine.run_until_idle()
    if atomic:
        want = alone(gen, "the cat ", 1, max_new_tokens=50, ignore_eos=True)[0].token_ids
        assert running.result()[0].token_ids == want
    assert later.result()[0].token_ids == alone(gen, "the dog ", 3)[0].token_ids


# -- one bound call per shared pipeline ------------------------------------------------------

SHARED = {"pipeline": [{"frequency_penalty": 0.5}, {"dry": {"multiplier": 0.8}}, {"xtc": {"threshold": 0.05, "probability": 0.5}},
                       {"top_k": 12}], "sampler": "categorical"}


def _count_bound_calls(monkeypatch):
    """Batch sizes of every BoundPipeline sampling call, one list per engine turn."""
    from samplerkit.pipeline import BoundPipeline

    calls: list[int] = []
    real = BoundPipeline.sample_with_validity

    def counted(self, logits, *args, **kwargs):
        calls.append(int(logits.shape[0]))
        return real(self, logits, *args, **kwargs)
    monkeypatch.setattr(BoundPipeline, "sample_with_validity", counted)
    return calls


def test_requests_sharing_a_pipeline_are_sampled_by_one_call_and_keep_their_tokens(monkeypatch):
    gen = generator()
    specs = []
    for i in range(16):
        kw = {"max_new_tokens": 6 + (i * 5) % 17, "ignore_eos": i % 4 == 0}
        if i % 3 == 0:
            kw["overrides"] = {"temperature": {"temperature": 0.6}} if i % 2 == 0 else {"top_k": {"top_k": 3}}
        specs.append((PROMPTS[i % 5] + "x" * (i % 4), None if i % 2 == 0 else SHARED, 500 + i, kw))
    ref = [gen.generate([p], seeds=[s], pipelines=[pl], rows=[kw.get("overrides")],
                        **{k: v for k, v in kw.items() if k != "overrides"})[0].token_ids for p, pl, s, kw in specs]
    calls = _count_bound_calls(monkeypatch)
    engine = Engine(gen, max_rows=16)
    reqs = [engine.submit(p, pipeline=pl, seed=s, **kw) for p, pl, s, kw in specs[:9]]
    engine.step()
    engine.step()
    reqs += [engine.submit(p, pipeline=pl, seed=s, **kw) for p, pl, s, kw in specs[9:]]   # join later
    per_turn = []
    while True:
        before = len(calls)
        if not engine.step():
            break
        per_turn.append(calls[before:])
    assert [r.result()[0].token_ids for r in reqs] == ref
    # Once the late requests merged (the turn after they joined), each step is one call per pipeline.
    assert per_turn[1] == [8, 8]
    assert max(len(t) for t in per_turn[1:]) == 2


def test_share_calls_false_samples_each_request_alone_with_the_same_tokens(monkeypatch):
    gen = generator()
    specs = [(PROMPTS[i % 5], None if i % 2 else SHARED, 80 + i) for i in range(6)]
    runs = []
    for share in (True, False):
        calls = _count_bound_calls(monkeypatch)
        engine = Engine(gen, share_calls=share)
        reqs = [engine.submit(p, pipeline=pl, seed=s, max_new_tokens=5, ignore_eos=True) for p, pl, s in specs]
        engine.step()
        engine.step()
        runs.append(([r for r in reqs], calls[:]))
        engine.run_until_idle()
    (shared, shared_calls), (apart, apart_calls) = runs
    assert [r.result()[0].token_ids for r in shared] == [r.result()[0].token_ids for r in apart]
    assert shared_calls == [3, 3, 3, 3] and apart_calls == [1] * 12


def test_a_stateful_sampler_merges_after_its_first_step_and_keeps_its_tokens():
    pytest.importorskip("samplerkit_mirostat")
    gen = generator()
    mirostat = {"sampler": {"name": "mirostat_v2", "tau": 3.0}}
    ref = [alone(gen, PROMPTS[i], 40 + i, pipelines=[mirostat], max_new_tokens=12)[0].token_ids for i in range(4)]
    engine = Engine(gen)
    first = [engine.submit(PROMPTS[i], pipeline=mirostat, seed=40 + i, max_new_tokens=12) for i in range(2)]
    engine.step()
    late = [engine.submit(PROMPTS[i], pipeline=mirostat, seed=40 + i, max_new_tokens=12) for i in range(2, 4)]
    engine.step()                       # admitted: its mu is not there yet, so it samples apart once
    assert len(engine._bundles) == 2
    engine.step()
    assert len(engine._bundles) == 1
    engine.run_until_idle()
    assert [r.result()[0].token_ids for r in first + late] == ref


class BoomOnBang(Processor):
    """A plugin step that fails for any batch holding a prompt with '!' (token 33)."""

    name = "boom_on_bang"

    def apply(self, logits, ctx):
        if any(33 in p for p in ctx.prompt_ids):
            raise RuntimeError("bang")
        return logits


def test_a_failing_pipeline_shared_with_others_ends_only_its_request(monkeypatch):
    from samplerkit import engine as engine_module

    splits = []
    real_split = engine_module._Bundle.split
    monkeypatch.setattr(engine_module._Bundle, "split", lambda self: splits.append(len(self.parts)) or real_split(self))
    gen = generator()
    shared = Pipeline([BoomOnBang.spec()], sampler=Categorical.spec())
    ref = [alone(gen, p, 60 + i, pipelines=[shared])[0].token_ids for i, p in enumerate(PROMPTS[:3])]
    engine = Engine(gen)
    good = [engine.submit(p, pipeline=shared, seed=60 + i) for i, p in enumerate(PROMPTS[:2])]
    engine.step()
    engine.step()
    bad = engine.submit("bang!", pipeline=shared, seed=9)
    good.append(engine.submit(PROMPTS[2], pipeline=shared, seed=62))
    engine.step()
    engine.step()                       # the late two merged with the first two: the call fails
    assert splits == [4]                # ... so each of the four requests sampled alone
    engine.run_until_idle()
    assert [r.result()[0].token_ids for r in good] == ref
    with pytest.raises(PluginError, match="bang"):
        bad.result()


def test_bundles_concatenate_bound_pipelines_only_where_rows_keep_their_state():
    from samplerkit.pipeline import BoundPipeline

    gen = generator()
    assert BoundPipeline.can_concat(gen.pipeline_for(SHARED))
    assert not BoundPipeline.can_concat(gen.pipeline_for({"pipeline": [{"choice": {"options": ["yes", "no"]}}]}))


def test_a_joint_admission_that_fails_requeues_its_requests_one_at_a_time(failing_backend):
    gen = generator(failing_backend)
    ref = [alone(gen, p, 20 + i)[0].token_ids for i, p in enumerate(PROMPTS[:3])]
    engine = Engine(gen)
    reqs = [engine.submit(PROMPTS[0], seed=20), engine.submit("bang!", seed=1)]
    reqs += [engine.submit(p, seed=21 + i) for i, p in enumerate(PROMPTS[1:3])]
    engine.step()                        # the joint prefill failed: all four wait again
    assert engine.waiting == 4 and engine.running_rows == 0 and not any(r.done for r in reqs)
    engine.run_until_idle()
    with pytest.raises(PluginError, match="join broke"):   # the failing one alone, joining the first
        reqs[1].result()
    assert reqs[0].result()[0].token_ids == ref[0]          # the join was atomic: the first goes on
    assert [r.result()[0].token_ids for r in reqs[2:]] == ref[1:]   # admitted after it: not hit


def test_a_joint_admission_failing_after_some_rows_started_spares_the_others(monkeypatch):
    from samplerkit.generate import _Run

    gen = generator()
    ref = [alone(gen, p, 30 + i)[0].token_ids for i, p in enumerate(PROMPTS[:2])]
    real = _Run.start_rows

    def fail_on_x(self):
        if self.inputs == ["x"]:
            raise ZeroDivisionError("a plugin bug")
        return real(self)
    monkeypatch.setattr(_Run, "start_rows", fail_on_x)
    engine = Engine(gen)
    good = [engine.submit(p, seed=30 + i) for i, p in enumerate(PROMPTS[:2])]
    bad = engine.submit("x", seed=1)                   # its rows start after the first two's
    engine.run_until_idle()
    assert [r.result()[0].token_ids for r in good] == ref
    with pytest.raises(ZeroDivisionError):
        bad.result()


@pytest.mark.slow
def test_default_model_16_seeded_requests_over_2_shared_pipelines_keep_their_tokens(monkeypatch, default_model_path):
    gen = Generator({"generation": {"max_new_tokens": 3}})
    words = ["The sky is", "Once upon", "def f(x):", "Colors:", "I like", "Today", "In 1969,", "Rain:"]
    specs = [(words[i % 8], None if i % 2 else "min_p", 900 + i) for i in range(16)]
    ref = [gen.generate([p], pipelines=[pl], seeds=[s])[0].token_ids for p, pl, s in specs]
    calls = _count_bound_calls(monkeypatch)
    engine = Engine(gen, max_rows=16)
    reqs = [engine.submit(p, pipeline=pl, seed=s) for p, pl, s in specs]
    engine.run_until_idle()
    assert [r.result()[0].token_ids for r in reqs] == ref
    assert calls == [8, 8] * 3                # one call per pipeline and step
