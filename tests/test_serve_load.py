"""A bounded load test on loopback: 64 concurrent `openai` clients for a fixed time, each sending
requests with mixed pipelines, lengths, endpoints and streaming, on the bigram backend.

Every response is checked against the library's run of the same request alone (`Generator`):
a lost, duplicated or mixed-up response (another request's text, another row's seed or
pipeline) fails. The server's memory must stay flat and it must be healthy afterwards.
"""

from __future__ import annotations

import gc
import http.client
import json
import random
import resource
import threading
import time
import tracemalloc
from pathlib import Path
from urllib.parse import urlparse

import openai

from samplerkit.generate import Generator
from samplerkit.serve.command import build, running, server_config
from samplerkit.serve.protocol import Limits

CLIENTS = 64
SECONDS = 1.5

PIPELINES = [
    None,                                                          # the server's own
    {"pipeline": [{"temperature": 0.7}, {"top_p": 0.9}], "sampler": "categorical"},
    {"pipeline": [{"top_k": 5}], "sampler": "categorical"},
    {"pipeline": [{"min_p": 0.1}, {"temperature": 1.5}], "sampler": "categorical"},
    {"pipeline": [], "sampler": "greedy"},
    {"pipeline": [{"repetition_penalty": 1.3}, {"typical_p": 0.8}], "sampler": "categorical"},
    {"preset": "min_p"},
    {"pipeline": [{"min_tokens": 6}, {"top_k": 20}, {"temperature": 0.5}], "sampler": "categorical"},
]
PROMPTS = ["The ", "A bird", "She sells", "Time flies", "Peter"]


def rss_bytes() -> int:
    """Resident memory of this process (server and clients alike), from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def expected_text(cache, spec) -> str:
    """The text the library gives for the request alone."""
    if spec not in cache:
        index, prompt, seed, tokens, chat = spec
        entry = PIPELINES[index]
        if index not in cache:
            config = {"backend": "bigram", **(entry or {})}
            cache[index] = Generator(config)
        greedy = entry is not None and entry.get("sampler") == "greedy"
        given = [{"role": "user", "content": prompt}] if chat else prompt
        [completion] = cache[index].generate([given], seeds=None if greedy else [seed], max_new_tokens=tokens,
                                             chat=chat)
        cache[spec] = completion.text
    return cache[spec]


def one_request(client, rng, results):
    index = rng.randrange(len(PIPELINES))
    prompt = rng.choice(PROMPTS)
    greedy = PIPELINES[index] is not None and PIPELINES[index].get("sampler") == "greedy"
    seed = rng.randrange(1000)
    tokens = rng.choice([2, 4, 8])
    chat = rng.random() < 0.3
    stream = rng.random() < 0.4
    extra = {} if PIPELINES[index] is None else {"samplerkit": PIPELINES[index]}
    common = {"model": "bigram", "max_tokens": tokens, "seed": None if greedy else seed, "stream": stream,
              "extra_body": extra}
    if chat:
        response = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
    else:
        response = client.completions.create(prompt=prompt, **common)
    finishes = 0
    if stream:
        text = ""
        for chunk in response:
            for choice in chunk.choices:
                assert choice.index == 0
                text += (choice.delta.content or "") if chat else choice.text
                finishes += choice.finish_reason is not None
    else:
        [choice] = response.choices
        text = choice.message.content if chat else choice.text
        finishes = 1
    results.append(((index, prompt, seed, tokens, chat), text, finishes))


def load(url: str, seconds: float, seed: int) -> tuple[list, list]:
    """Every client sends requests one after another until ``seconds`` have passed since all
    of them were ready (each sends at least one); the requests in flight then finish."""
    results: list = []
    errors: list = []
    ready = threading.Barrier(CLIENTS + 1)
    clock: list[float] = []

    def client_loop(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        ready.wait()
        try:
            while True:
                one_request(client, rng, results)
                if time.monotonic() >= clock[0]:
                    break
        except Exception as exc:                 # reported by the test, not swallowed
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    clock.append(time.monotonic() + seconds)
    ready.wait()
    for t in threads:
        t.join(timeout=seconds + 120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return results, errors


def test_64_concurrent_clients_get_their_own_answers_and_memory_stays_flat():
    config, registry = server_config(None, ["backend=bigram"])
    app = build(config, registry, Limits(max_rows=64, max_tokens=64))
    cache: dict = {}
    with running(app) as url:
        t0 = time.monotonic()
        warm, errors = load(url, 0.5, seed=1)               # warm-up: imports, caches, threads, pipelines
        assert not errors, errors[:3]
        t1 = time.monotonic()
        tracemalloc.start()
        try:
            first, errors = load(url, SECONDS, seed=2)
            assert not errors, errors[:3]
            gc.collect()
            before, rss_before = tracemalloc.get_traced_memory()[0], rss_bytes()
            results, errors = load(url, SECONDS, seed=3)
            gc.collect()
            after, rss_after = tracemalloc.get_traced_memory()[0], rss_bytes()
        finally:
            tracemalloc.stop()
        results += first
        print(f"warm-up {t1 - t0:.1f} s ({len(warm)} requests), load {time.monotonic() - t1:.1f} s "
              f"({len(results)} requests), Python heap {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, "
              f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
        assert not errors, errors[:3]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="bigram", prompt="ok", max_tokens=2).choices[0].finish_reason
        parts = urlparse(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        conn.close()
    assert health["rows_in_flight"] == 0 and health["requests_in_flight"] == 0
    assert len(results) >= 2 * CLIENTS and len(warm) >= CLIENTS   # every client got answers
    t2 = time.monotonic()
    for spec, text, finishes in [*warm, *results]:
        assert finishes == 1, f"{spec}: {finishes} finish reasons (lost or duplicated)"
        assert text == expected_text(cache, spec), f"{spec}: a mixed-up response"
    print(f"checked in {time.monotonic() - t2:.1f} s")
    # Python objects must not accumulate from one round to the next (a leaked request, row,
    # pipeline or event queue would); the process's RSS only within a loose bound, because
    # malloc's per-thread arenas still grow for a few rounds of 64 new client threads.
    assert after - before < 4 * 2**20, f"the Python heap grew by {(after - before) / 2**20:.1f} MiB under load"
    assert rss_after - rss_before < 128 * 2**20, f"RSS grew by {(rss_after - rss_before) / 2**20:.0f} MiB"
