"""The decode loop on the built-in bigram backend (no model files)."""

from __future__ import annotations

import pytest
import torch

import samplerkit
from samplerkit import GenerationError, Generator
from samplerkit.builtins.backends.bigram import BOS_ID, EOS_ID, BigramBackend
from samplerkit.registry import default_registry

REGISTRY = default_registry()
FRENCH = ("le café crème est très bon. la crème brûlée est très sucrée. "
          "le thé vert est léger. où est le café? à côté du thé.")


def make(pipeline=(), sampler="greedy", backend=None, **generation):
    config = {"backend": "bigram", "pipeline": list(pipeline), "sampler": sampler,
              "generation": {"max_new_tokens": 40, **generation}}
    return Generator(config, backend=backend or BigramBackend(), registry=REGISTRY)


def sampling(seed=None, temperature=1.5, **kw):
    sampler = {"name": "categorical"} if seed is None else {"name": "categorical", "seed": seed}
    return make([{"temperature": temperature}], sampler, **kw)


def text_of(completion):
    return completion.text


# -- finish reasons and stop strings -----------------------------------------------------------

def test_finish_stop_on_eos():
    backend = BigramBackend(BigramBackend.Params(text="ab"))        # BOS a b EOS
    out = make(backend=backend).generate("a")
    assert out[0].finish_reason == "stop"
    assert out[0].token_ids == [ord("b")] and out[0].text == "b"
    assert EOS_ID not in out[0].token_ids


def test_ignore_eos_runs_to_length():
    backend = BigramBackend(BigramBackend.Params(text="ab"))
    out = make(backend=backend, ignore_eos=True, max_new_tokens=7).generate("a")
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 7


def test_finish_length():
    out = make(max_new_tokens=5).generate("The capital")
    assert out[0].finish_reason == "length"
    assert len(out[0].token_ids) == 5
    assert out[0].text == bytes(out[0].token_ids).decode()


def test_stop_token_ids():
    out = make(stop_token_ids=[ord(" ")], max_new_tokens=50).generate("The q")
    assert out[0].finish_reason == "stop" and " " not in out[0].text and ord(" ") not in out[0].token_ids


def _unstopped(gen_kwargs, prompt):
    backend = BigramBackend(BigramBackend.Params(text=FRENCH))
    return make(backend=backend, **gen_kwargs).generate(prompt)[0].text


@pytest.mark.parametrize("prompt", ["le c", "la cr", "où"])
def test_multibyte_stop_string_across_token_boundaries(prompt):
    full = _unstopped({"max_new_tokens": 60}, prompt)
    # A stop string that starts mid-text and contains a 2-byte character: several tokens.
    idx = next(i for i, ch in enumerate(full) if ord(ch) > 127 and i > 0)
    stop = full[idx - 1: idx + 2]
    assert len(stop.encode()) > len(stop)                         # spans byte tokens inside one char too
    backend = BigramBackend(BigramBackend.Params(text=FRENCH))
    gen = make(backend=backend, max_new_tokens=60, stop=[stop, "zzz"])
    out = gen.generate(prompt)[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:full.index(stop)]
    assert stop not in out.text
    deltas = list(gen.stream(prompt))
    streamed = "".join(d.text for d in deltas)
    assert streamed == out.text and stop not in streamed
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_stop_string_at_the_very_start_gives_empty_text():
    full = _unstopped({"max_new_tokens": 10}, "le c")
    backend = BigramBackend(BigramBackend.Params(text=FRENCH))
    out = make(backend=backend, stop=[full[:2]]).generate("le c")[0]
    assert out.text == "" and out.finish_reason == "stop"


def test_stream_deltas_concatenate_to_the_final_text():
    prompts = ["The", "She sells", "A bird", "Peter"]
    for kw in ({}, {"stop": ["e t", "s."]}):
        gen = sampling(seed=3, max_new_tokens=50, **kw)
        final = gen.generate(prompts)
        pieces = {}
        finishes = {}
        for d in gen.stream(prompts):
            pieces.setdefault(d.prompt_index, []).append(d.text)
            if d.finish_reason:
                assert d.prompt_index not in finishes
                finishes[d.prompt_index] = d.finish_reason
        for c in final:
            assert "".join(pieces[c.prompt_index]) == c.text
            assert finishes[c.prompt_index] == c.finish_reason
            for s in kw.get("stop", []):
                assert s not in c.text


# -- n samples, batches, seeds -----------------------------------------------------------------

def test_n_samples_per_prompt():
    gen = sampling(seed=11, n=4, max_new_tokens=30)
    out = gen.generate(["The", "She"])
    assert [(c.prompt_index, c.sample_index) for c in out] == [(p, s) for p in range(2) for s in range(4)]
    for p in range(2):
        texts = [c.text for c in out if c.prompt_index == p]
        assert len(set(texts)) == 4
    single = sampling(seed=11, max_new_tokens=30).generate(["The", "She"])
    assert out[0].token_ids == single[0].token_ids
    assert out[4].token_ids == single[1].token_ids


def test_n_with_explicit_seeds_sample_zero_matches_n1():
    many = sampling(n=3, max_new_tokens=25).generate(["The", "A"], seeds=[5, 6])
    one = sampling(max_new_tokens=25).generate(["The", "A"], seeds=[5, 6])
    assert many[0].token_ids == one[0].token_ids and many[3].token_ids == one[1].token_ids
    assert many[1].token_ids != many[2].token_ids


def test_prompts_of_different_lengths_match_single_runs():
    prompts = ["T", "The capital of France is", "She sells sea", "Peter Piper picked a peck of pickled"]
    gen = sampling(max_new_tokens=30)
    seeds = [101, 102, 103, 104]
    batch = gen.generate(prompts, seeds=seeds)
    for i, p in enumerate(prompts):
        alone = gen.generate([p], seeds=[seeds[i]])[0]
        assert batch[i].token_ids == alone.token_ids
        assert batch[i].prompt_token_ids == [BOS_ID, *p.encode()]


def test_seeded_row_is_independent_of_batch_and_position():
    prompts = ["The sun", "Time flies", "A bird in", "The capital", "She", "Pe", "The quick brown"]
    gen = sampling(max_new_tokens=40, temperature=1.3)
    alone = gen.generate(["The sun"], seeds=[77])[0]
    seeds = [77 if i == 0 else 1000 + i for i in range(len(prompts))]
    # The same row at another position, among other prompts (other lengths, other finishes).
    order = list(range(1, len(prompts))) + [0]
    batch = gen.generate([prompts[i] for i in order], seeds=[seeds[i] for i in order])
    assert batch[-1].token_ids == alone.token_ids
    assert batch[-1].text == alone.text


def test_unseeded_rows_differ():
    gen = sampling(max_new_tokens=40)
    a, b = gen.generate(["The", "The"])
    c = gen.generate(["The"])[0]
    assert len({tuple(a.token_ids), tuple(b.token_ids), tuple(c.token_ids)}) == 3


def test_seeded_runs_are_reproducible():
    gen = sampling(seed=9, max_new_tokens=30)
    assert [c.token_ids for c in gen.generate(["The", "A"])] == [c.token_ids for c in gen.generate(["The", "A"])]


# -- finished rows leave the batch --------------------------------------------------------------

def test_finished_rows_are_dropped_from_the_backend():
    backend = BigramBackend()
    calls, step_sizes = [], []
    real_select, real_step = backend.select_rows, backend.step

    def select_rows(keep):
        calls.append(list(keep))
        real_select(keep)

    def step(ids):
        step_sizes.append(int(ids.shape[0]))
        return real_step(ids)

    backend.select_rows, backend.step = select_rows, step
    gen = make(backend=backend, stop_token_ids=[ord(" ")], max_new_tokens=30)
    prompts = ["The", "Th", "Peter Pipe", "A bir"]
    out = gen.generate(prompts)
    lengths = [len(c.token_ids) for c in out]
    assert len(set(lengths)) > 1                            # rows finish at different steps
    assert calls, "select_rows never called"
    assert all(len(k) < b for k, b in zip(calls, [4] + [len(c) for c in calls]))
    assert step_sizes == sorted(step_sizes, reverse=True) and step_sizes[-1] < 4
    # Each row stepped exactly as often as it generated tokens beyond the first (finished rows not).
    assert sum(step_sizes) == sum(min(n + 1, 30) for n in lengths) - len(prompts)
    solo = [make(stop_token_ids=[ord(" ")], max_new_tokens=30).generate(p)[0].token_ids for p in prompts]
    assert [c.token_ids for c in out] == solo


# -- logprobs ------------------------------------------------------------------------------------

def test_logprobs_raw_processed_and_top():
    backend = BigramBackend()
    gen = make([{"temperature": 0.5}, {"top_k": 5}], {"name": "categorical", "seed": 4}, backend=backend,
               logprobs=3, max_new_tokens=20)
    out = gen.generate(["The c"])[0]
    assert len(out.logprobs) == len(out.token_ids)
    prev = ord("c")
    for lp, token in zip(out.logprobs, out.token_ids):
        raw = torch.log_softmax(backend.table[prev], -1)
        assert lp.token_id == token and lp.text == bytes([token]).decode()
        assert lp.logprob == pytest.approx(float(raw[token]), abs=1e-5)
        proc = backend.table[prev] / 0.5
        top5 = proc.argsort(descending=True, stable=True)[:5]          # ties: lower ids win
        proc = torch.full_like(proc, float("-inf")).index_copy(0, top5, proc[top5])
        assert lp.processed_logprob == pytest.approx(float(torch.log_softmax(proc, -1)[token]), abs=1e-5)
        top_v, top_i = raw.topk(3)
        assert [t for t, _, _ in lp.top] == top_i.tolist()
        assert [v for _, _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-5)
        prev = token


def test_no_logprobs_by_default():
    assert make(max_new_tokens=3).generate("The")[0].logprobs is None


def test_echo_prompt_logprobs():
    backend = BigramBackend()
    prompt = "The cat"
    out = make(backend=backend, echo=True, max_new_tokens=2).generate(prompt)[0]
    ids = [BOS_ID, *prompt.encode()]
    assert out.prompt_token_ids == ids
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for prev, lp, token in zip(ids, out.prompt_logprobs[1:], ids[1:]):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(torch.log_softmax(backend.table[prev], -1)[token]), abs=1e-5)


def test_echo_with_max_new_tokens_zero():
    out = make(echo=True, max_new_tokens=0).generate(["ab", "The"])
    assert [c.token_ids for c in out] == [[], []] and all(c.finish_reason == "length" for c in out)
    assert len(out[1].prompt_logprobs) == 4


# -- edge cases ------------------------------------------------------------------------------------

def test_max_new_tokens_zero():
    gen = make(max_new_tokens=0)
    out = gen.generate(["The", "A"])
    assert [(c.text, c.token_ids, c.finish_reason) for c in out] == [("", [], "length")] * 2
    assert [d.finish_reason for d in gen.stream(["The"])] == ["length"]


def test_empty_prompt_gets_bos():
    out = make(max_new_tokens=5).generate("")[0]
    assert out.prompt_token_ids == [BOS_ID]
    assert len(out.token_ids) == 5 or out.finish_reason == "stop"
    assert out.token_ids[0] == int(BigramBackend().table[BOS_ID].argmax())


def test_prompt_longer_than_context_is_an_error():
    backend = BigramBackend(BigramBackend.Params(max_context=8))
    with pytest.raises(GenerationError, match="prompt 1 has 11 tokens"):
        make(backend=backend).generate(["ok", "0123456789"])


def test_context_limit_ends_rows_with_length():
    backend = BigramBackend(BigramBackend.Params(max_context=10))
    out = make(backend=backend, max_new_tokens=100, ignore_eos=True).generate(["abc", "a"])
    assert [len(c.token_ids) for c in out] == [6, 8]
    assert all(c.finish_reason == "length" for c in out)


def test_no_prompts_is_an_error():
    with pytest.raises(GenerationError):
        make().generate([])


def test_seeds_length_mismatch_is_an_error():
    with pytest.raises(GenerationError, match="seeds has 1 entries for 2 prompts"):
        sampling().generate(["a", "b"], seeds=[1])


def test_per_row_overrides():
    gen = make([{"top_k": 0}, {"temperature": 1.5}], {"name": "categorical"}, max_new_tokens=25)
    greedy = make(max_new_tokens=25).generate(["The", "The"])
    out = gen.generate(["The", "The"], rows=[{"top_k": {"top_k": 1}}, None], seeds=[1, 2])
    assert out[0].token_ids == greedy[0].token_ids             # top_k 1 on that row only: greedy
    assert out[1].token_ids != greedy[1].token_ids
    from samplerkit import ConfigError
    with pytest.raises(ConfigError, match="rows\\[0\\]"):
        gen.generate(["The"], rows=[{"top_p": {"top_p": 0.5}}])
    with pytest.raises(ConfigError, match="rows\\[0\\] top_k"):
        gen.generate(["The"], rows=[{"top_k": {"top_k": -1}}])


def test_seed_precedence_and_distinct_samples():
    import samplerkit as sk

    cfg = {"backend": "bigram", "sampler": {"name": "categorical", "seed": 1},
           "generation": {"max_new_tokens": 10, "n": 3}}
    from_config = [c.token_ids for c in sk.generate(["The"], cfg)]
    none_seed = [c.token_ids for c in sk.generate(["The"], cfg, seeds=[None])]
    assert none_seed == from_config                      # None falls back to the config seed
    assert len({tuple(t) for t in from_config}) == 3     # the n samples differ
    by_override = [c.token_ids for c in sk.generate(["The"], cfg, rows=[{"categorical": {"seed": 5}}])]
    by_seeds = [c.token_ids for c in sk.generate(["The"], cfg, seeds=[5])]
    assert by_override == by_seeds != from_config        # a row override's seed is the row's seed


def test_seeded_row_alone_equals_the_same_row_in_a_batch_of_64():
    import random

    import samplerkit as sk

    config = {"backend": "bigram", "sampler": "categorical",
              "pipeline": [{"temperature": 1.2}, {"top_k": 40}, {"top_p": 0.95}],
              "generation": {"max_new_tokens": 48, "stop": [". "]}}
    gen = sk.Generator(config)
    alone = gen.generate(["The capital of"], seeds=[4242])[0]
    rng = random.Random(0)
    for position in (0, 17, 63):
        prompts = ["".join(rng.choice("abcdefgh T.") for _ in range(rng.randint(1, 30))) for _ in range(64)]
        seeds = [rng.randrange(10**6) for _ in range(64)]
        rows = [{"top_p": {"top_p": rng.choice([0.5, 0.8, 1.0])}} for _ in range(64)]
        prompts[position], seeds[position], rows[position] = "The capital of", 4242, None
        batch = gen.generate(prompts, seeds=seeds, rows=rows)
        assert batch[position].token_ids == alone.token_ids, position
        assert batch[position].finish_reason == alone.finish_reason


# -- chat input (issue 13 defect 6) ------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital"},
                {"role": "assistant", "content": "of France?"}, {"role": "user", "content": "Yes"}]


def test_chat_accepts_a_list_of_messages_through_the_template():
    backend = BigramBackend()
    gen = make(backend=backend, max_new_tokens=5)
    out = gen.generate([CONVERSATION, "The"], chat=True)
    rendered = "S: Be brief.\nQ: The capital\nA: of France?\nQ: Yes\nA:"
    assert out[0].prompt == rendered and out[0].messages == CONVERSATION
    assert out[0].prompt_token_ids == backend.tokenize(rendered)
    assert out[1].prompt == "Q: The\nA:" and out[1].messages is None
    # One conversation may be passed as the prompts themselves.
    assert make(backend=backend, max_new_tokens=5).generate(CONVERSATION, chat=True)[0].token_ids == out[0].token_ids
    # The same text as a plain prompt gives the same tokens: the template is all that chat adds.
    assert make(backend=backend, max_new_tokens=5).generate(rendered)[0].token_ids == out[0].token_ids


def test_library_generate_with_messages_and_chat_true():
    import samplerkit as sk

    out = sk.generate([[{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]],
                      {"backend": "bigram", "generation": {"max_new_tokens": 3}}, chat=True)
    assert out[0].prompt == "S: S\nQ: Hi\nA:"


@pytest.mark.parametrize(("prompts", "words"), [
    ([CONVERSATION], "set chat=True"),
])
def test_messages_without_chat_are_an_error(prompts, words):
    with pytest.raises(GenerationError, match=words):
        make().generate(prompts)


@pytest.mark.parametrize(("messages", "words"), [
    ([{"role": "wizard", "content": "x"}], r"prompt 1 message 0: role must be one of"),
    ([{"role": "user", "content": None}], r"prompt 1 message 0: content must be a string"),
    ([{"role": "user", "content": "ok"}, "hi"], r"prompt 1 message 1: must be a mapping"),
    ([], r"prompt 1: a chat conversation is a non-empty list"),
])
def test_bad_messages_name_the_prompt_and_message(messages, words):
    with pytest.raises(GenerationError, match=words):
        make().generate(["fine", messages], chat=True)


class _NoTemplate(BigramBackend):
    apply_chat_template = BigramBackend.__mro__[1].apply_chat_template     # Backend's: no template


class _OldProtocol(BigramBackend):
    def apply_chat_template(self, user_message):
        raise NotImplementedError("no template here")


@pytest.mark.parametrize("backend_cls", [_NoTemplate, _OldProtocol])
def test_chat_on_a_backend_without_template_is_a_clear_error(backend_cls):
    with pytest.raises(GenerationError, match="prompt 0: .*no chat template"):
        make(backend=backend_cls()).generate("Hi", chat=True)


# -- prompts, rows and seeds that are not what they should be (issue 14 item 14) ---------------

@pytest.mark.parametrize(("prompts", "words"), [
    ([None], r"prompt 0 must be a string or a list of chat messages, got NoneType"),
    (["ok", b"x"], r"prompt 1 must be a string .* got bytes; decode bytes to str first"),
    ([3], r"prompt 0 must be a string .* got int"),
    (b"x", r"prompts must be a string or a list of prompts, got bytes"),
    (None, r"prompts must be a string or a list of prompts, got NoneType"),
    (["ok", "\ud800 x"], r"prompt 1 contains a lone surrogate '\\ud800' at character 0"),
    ("a\udfff", r"prompt 0 contains a lone surrogate '\\udfff' at character 1"),
])
def test_bad_prompts_are_clear_errors_naming_the_index(prompts, words):
    with pytest.raises(GenerationError, match=words):
        make().generate(prompts)


def test_lone_surrogate_in_a_chat_message_is_named():
    with pytest.raises(GenerationError, match=r"prompt 0 message 1 contains a lone surrogate"):
        make().generate([[{"role": "system", "content": "s"}, {"role": "user", "content": "\ud800"}]], chat=True)


@pytest.mark.parametrize(("rows", "words"), [
    (["top_p", None], r"rows\[0\] must be a mapping of step name to parameters"),
    ([None, {"top_p": 0.5}], r"rows\[1\] top_p: parameters must be a mapping"),
    ([None, {"top_k": {"top_k": 3}}], r"rows\[1\]: overrides name steps not in this pipeline"),
    ([{"top_p": {"top_p": 7}}, None], r"rows\[0\] top_p"),
    ("ab", r"rows must be a list with one entry per prompt, got str"),
])
def test_bad_row_overrides_name_the_prompt_index(rows, words):
    from samplerkit import SamplerkitError

    with pytest.raises(SamplerkitError, match=words):
        make([{"top_p": 0.9}], "categorical").generate(["The", "A"], rows=rows)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "3", True])
def test_bad_seeds_are_named(seed):
    with pytest.raises(GenerationError, match=r"seeds\[1\] must be an integer in \[0, 2\*\*63\)"):
        make([], "categorical").generate(["a", "b"], seeds=[1, seed])


# -- history buffers grow with the text (issue 14 item 8) --------------------------------------

@pytest.mark.parametrize("max_new_tokens", [10**12, 2**63 - 1])
@pytest.mark.parametrize("step", [{"dry": {"multiplier": 0.8}}, {"repetition_penalty": 1.3},
                                  {"frequency_penalty": 0.5}, {"no_repeat_ngram": 3}])
def test_huge_max_new_tokens_allocates_only_what_is_generated(max_new_tokens, step):
    backend = BigramBackend(BigramBackend.Params(max_context=60))
    gen = make([step], backend=backend, max_new_tokens=max_new_tokens, ignore_eos=True)
    out = gen.generate(["The", "A bird in"])
    assert [len(c.token_ids) for c in out] == [60 - 4, 60 - 10]      # ended by the context
    assert all(c.finish_reason == "length" for c in out)


def test_max_new_tokens_beyond_int64_is_a_config_error():
    backend = BigramBackend(BigramBackend.Params(max_context=60))
    from samplerkit import ConfigError
    with pytest.raises(ConfigError, match=r"max_new_tokens: must lie in the 64-bit integer range"):
        make([{"dry": {"multiplier": 0.8}}], backend=backend, max_new_tokens=10**30).generate(["The"])


def test_generated_buffer_doubles_and_matches_a_preallocated_one():
    from samplerkit.context import StepContext

    grown = StepContext(2, 10, uses=frozenset({"generated"}), max_new_tokens=10**12)
    assert grown.generated.shape[1] <= 64
    fixed = StepContext(2, 10, uses=frozenset({"generated"}), max_new_tokens=300)
    fixed.reserve(300)
    assert fixed.generated.shape[1] == 300
    widths = set()
    for t in range(300):
        ids = torch.tensor([t % 10, (3 * t) % 10, (7 * t) % 10][:grown.batch_size])
        grown.append(ids)
        fixed.append(ids)
        widths.add(grown.generated.shape[1])
        if t == 150:
            grown.select_rows([1, 0, 1])
            fixed.select_rows([1, 0, 1])
    assert sorted(widths) == [64, 128, 256, 512]                     # doubling, not one column per token
    assert torch.equal(grown.generated[:, :300], fixed.generated)
    assert (grown.generated[:, 300:] == -1).all()
    assert torch.equal(grown.context_ids()[:, -300:], fixed.context_ids()[:, -300:])


# -- one Generator from many threads (issue 14 item 10) ----------------------------------------

def _threaded(gen, jobs, threads=8):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda job: gen.generate(job[0], seeds=job[1]), jobs))


class _Yielding(BigramBackend):
    """The bigram model, letting other threads run inside each forward pass as a real model does."""

    def step(self, next_ids):
        import time

        time.sleep(0.0005)
        return super().step(next_ids)


def test_one_generator_shared_by_8_threads_gives_each_call_its_own_result():
    gen = make([{"temperature": 1.3}, {"top_k": 30}], "categorical", backend=_Yielding(), max_new_tokens=30)
    jobs = [([f"The {'c' * (i % 5)}", "A bird" + " x" * (i % 3)], [i, 1000 + i]) for i in range(24)]
    expected = [gen.generate(p, seeds=s) for p, s in jobs]
    got = _threaded(gen, jobs)
    assert [[c.token_ids for c in r] for r in got] == [[c.token_ids for c in r] for r in expected]


def test_streams_from_threads_are_serialised_and_a_nested_run_is_an_error():
    import threading

    gen = make([{"temperature": 1.3}], "categorical", max_new_tokens=20)
    stream = gen.stream("The", seeds=[3])
    first = next(stream)
    with pytest.raises(GenerationError, match="already running a stream in this thread"):
        gen.generate("The")
    done = []
    other = threading.Thread(target=lambda: done.append(gen.generate("The", seeds=[3])[0].text))
    other.start()
    other.join(0.3)
    assert other.is_alive() and not done                  # waits for the open stream
    text = first.text + "".join(d.text for d in stream)
    other.join(30)
    assert done == [text]


# -- backend output checked and attributed (issue 15 item 2) -----------------------------------

def _broken(**what):
    class Broken(BigramBackend):
        name = "broken"

        @property
        def vocab_size(self):
            return what.get("vocab", super().vocab_size)

        @property
        def eos_token_ids(self):
            return what.get("eos", super().eos_token_ids)

        def prefill(self, prompts, *, keep_all_logits=False):
            out = super().prefill(prompts, keep_all_logits=keep_all_logits)
            if "prefill" in what:
                return what["prefill"](out)
            return out

        def step(self, next_ids):
            logits = super().step(next_ids)
            return what["step"](logits) if "step" in what else logits

    return Broken()


@pytest.mark.parametrize(("what", "words"), [
    ({"vocab": 300}, r"prefill\(\) returned logits of shape \(1, 258\); expected \[1, 300\]"),
    ({"step": lambda x: x[:, :200]}, r"step\(\) returned logits of shape \(1, 200\); expected \[1, 258\]"),
    ({"step": lambda x: torch.cat([x, x])}, r"step\(\) returned logits of shape \(2, 258\); expected \[1, 258\]"),
    ({"step": lambda x: x.fill_(float("nan"))}, r"step\(\) returned NaN logits in row\(s\) \[0\]"),
    ({"prefill": lambda out: out.last}, r"prefill\(\) returned Tensor; it must return a samplerkit.PrefillOutput"),
    ({"step": lambda x: x.tolist()}, r"step\(\) returned list; expected a \[B, V\] float tensor"),
    ({"step": lambda x: x.long()}, r"step\(\) returned torch.int64 logits"),
    ({"eos": 257}, r"eos_token_ids 257 \(int\); it must be a collection of ints"),
    ({"eos": ["a"]}, r"eos_token_ids .*every id must be an int"),
])
def test_a_misbehaving_backend_is_a_plugin_error_naming_it(what, words):
    from samplerkit import PluginError

    gen = make(backend=_broken(**what), max_new_tokens=5, ignore_eos=True)
    with pytest.raises(PluginError, match=words) as info:
        gen.generate("The")
    assert "backend 'broken'" in str(info.value) and "distribution" in str(info.value)


def test_nan_from_the_model_is_left_to_a_tolerant_on_invalid_policy():
    config = {"backend": "bigram", "pipeline": [], "sampler": "greedy", "on_invalid": "mark_invalid",
              "generation": {"max_new_tokens": 5, "ignore_eos": True}}
    out = Generator(config, backend=_broken(step=lambda x: x.fill_(float("nan"))), registry=REGISTRY).generate("The")
    assert out[0].finish_reason == "invalid" and len(out[0].token_ids) == 1


def test_an_exception_in_a_backend_init_names_the_backend_and_distribution():
    from dataclasses import replace

    from samplerkit import PluginError
    from samplerkit.generate import load_backend, load_config

    config, _ = load_config({"backend": "bigram"}, REGISTRY)

    class Exploding(BigramBackend):
        def __init__(self, params=None):
            raise KeyError("weights")

    config = replace(config, backend=replace(config.backend, cls=Exploding))
    with pytest.raises(PluginError, match=r"backend 'bigram' .*Exploding.*distribution .* failed to start: KeyError"):
        load_backend(config)


# -- logprobs under the distribution actually drawn from (issue 13 defect 8) -------------------

def test_greedy_processed_logprob_is_under_the_processed_distribution():
    backend = BigramBackend()
    out = make([{"temperature": 0.5}], "greedy", backend=backend, logprobs=2, max_new_tokens=6).generate("The c")[0]
    prev = ord("c")
    for lp, token in zip(out.logprobs, out.token_ids):
        proc = torch.log_softmax(backend.table[prev] / 0.5, -1)
        assert token == int(proc.argmax())
        assert lp.processed_logprob == pytest.approx(float(proc[token]), abs=1e-5)
        assert lp.processed_logprob != pytest.approx(lp.logprob, abs=1e-3)
        prev = token


def test_top_logprobs_from_the_processed_distribution():
    backend = BigramBackend()
    gen = make([{"top_k": 2}], {"name": "categorical", "seed": 1}, backend=backend, logprobs=4, max_new_tokens=8,
               top_logprobs_from="processed")
    out = gen.generate("The c")[0]
    prev = ord("c")
    for lp, token in zip(out.logprobs, out.token_ids):
        row = backend.table[prev]
        keep = row.argsort(descending=True, stable=True)[:2]
        proc = torch.log_softmax(torch.full_like(row, float("-inf")).index_copy(0, keep, row[keep]), -1)
        assert [t for t, _, _ in lp.top] == keep.tolist()          # only the 2 kept tokens: removed ones never appear
        assert [v for _, _, v in lp.top] == pytest.approx(proc[keep].tolist(), abs=1e-5)
        prev = token


def test_prompt_logprobs_carry_top_alternatives_and_echo_returns_the_prompt_text():
    backend = BigramBackend()
    prompt = "The cat"
    out = make(backend=backend, echo=True, logprobs=3, max_new_tokens=2).generate(prompt)[0]
    assert out.prompt_text == prompt                                # BOS is not rendered
    ids = [BOS_ID, *prompt.encode()]
    for prev, lp in zip(ids, out.prompt_logprobs[1:]):
        top_v, top_i = torch.log_softmax(backend.table[prev], -1).topk(3)
        assert [t for t, _, _ in lp.top] == top_i.tolist()
        assert [v for _, _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-5)
        assert lp.processed_logprob is None
    assert make(backend=backend, max_new_tokens=2).generate(prompt)[0].prompt_text is None


def test_a_sampler_that_truncates_itself_reports_logprobs_under_its_kept_set():
    mirostat = pytest.importorskip("samplerkit_mirostat")
    backend = BigramBackend()
    registry = default_registry()
    config = {"backend": "bigram", "pipeline": [], "sampler": {"name": "mirostat_v2", "tau": 1.0, "eta": 0.0, "seed": 5},
              "generation": {"max_new_tokens": 12, "logprobs": 0}}
    out = Generator(config, backend=backend, registry=registry).generate("The c")[0]
    prev = ord("c")
    assert mirostat.MirostatV2.name == "mirostat_v2"
    for lp, token in zip(out.logprobs, out.token_ids):
        row = backend.table[prev]
        logp = torch.log_softmax(row, -1)
        keep = (-logp / torch.log(torch.tensor(2.0))) <= 2.0          # mu = 2 tau, constant with eta 0
        keep[row.argmax()] = True
        kept = torch.log_softmax(row.masked_fill(~keep, float("-inf")), -1)
        assert bool(keep[token])
        assert lp.processed_logprob == pytest.approx(float(kept[token]), abs=1e-5)
        assert lp.processed_logprob > lp.logprob                    # renormalised over fewer tokens
        prev = token


# -- the CLI's --messages (a minimal addition to cli.py) ---------------------------------------

def test_cli_messages_file_runs_each_conversation(tmp_path, capsys):
    import json

    from samplerkit.cli import main

    path = tmp_path / "chat.json"
    path.write_text(json.dumps([CONVERSATION, [{"role": "user", "content": "Hi"}]]))
    code = main(["generate", "--set", "backend=bigram", "--set", "sampler=greedy", "--max-new-tokens", "3",
                 "--messages", str(path), "--json", "The"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [r["prompt"] for r in rows] == ["Q: The\nA:", "S: Be brief.\nQ: The capital\nA: of France?\nQ: Yes\nA:",
                                           "Q: Hi\nA:"]
    assert rows[1]["messages"] == CONVERSATION


@pytest.mark.parametrize(("content", "words"), [
    ("{not json", "cannot read a JSON file"),
    ('{"role": "user"}', "expected a list of {role, content} messages"),
    ('[{"role": "user", "content": 5}]', "prompt 0 message 0: content must be a string"),
])
def test_cli_bad_messages_file_exits_2(tmp_path, capsys, content, words):
    from samplerkit.cli import main

    path = tmp_path / "chat.json"
    path.write_text(content)
    code = main(["generate", "--set", "backend=bigram", "--messages", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err


def test_cli_generate_without_prompt_or_messages_exits_2(capsys):
    from samplerkit.cli import main

    assert main(["generate", "--set", "backend=bigram"]) == 2
    assert "give at least one PROMPT" in capsys.readouterr().err


def test_the_n_samples_of_a_prompt_differ_when_only_a_processor_is_seeded():
    """Under greedy only xtc draws: the n samples of a seeded prompt get row_seed(base, j), so
    their coins differ, and sample 0 keeps the prompt's own seed."""
    from samplerkit.generate import row_seed, row_seeds

    pipe = samplerkit.load_pipeline({"pipeline": [{"xtc": {"threshold": 0.1, "probability": 0.5}}], "sampler": "greedy"})
    assert row_seeds(pipe, 2, 3, seeds=[5, None]) == [5, row_seed(5, 1), row_seed(5, 2), None, None, None]
    assert len({*row_seeds(pipe, 1, 3, seeds=[5])}) == 3
    assert row_seeds(pipe, 2, 3) is None
