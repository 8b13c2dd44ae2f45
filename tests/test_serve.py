"""`samplerkit serve` on loopback with the official `openai` client, on the bigram backend (fast).

What a request gets back is compared with the library run alone (`Generator`), so a server that
mixed up rows, pipelines or seeds fails here. The real model's checks are in test_serve_model.py.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlparse

import openai
import pytest

from samplerkit.generate import Generator
from samplerkit.serve.command import build, running, server_config
from samplerkit.serve.protocol import ApiError, Limits

BASE = ["backend=bigram", "generation.max_new_tokens=12"]


LIMITS = Limits(max_rows=16, max_tokens=64)


def make_app(*, overrides=(), limits=LIMITS, api_key=None):
    config, registry = server_config(None, [*BASE, *overrides])
    return build(config, registry, limits, api_key=api_key)


@pytest.fixture(scope="module")
def url():
    with running(make_app()) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def raw(url: str, method: str, path: str, body: bytes | str | None = None, headers=None) -> tuple[int, dict]:
    """One HTTP request with no client-side checks (for malformed bodies); the status and JSON body."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else {}
    finally:
        conn.close()


def library(pipeline=None, sampler=None, prompts=("The ",), seed=None, **generation):
    """What the library gives alone for the same request (the reference)."""
    config = {"backend": "bigram", "generation": {"max_new_tokens": 12}}
    if pipeline is not None:
        config["pipeline"] = pipeline
    if sampler is not None:
        config["sampler"] = sampler
    seeds = None if seed is None else [seed] * len(prompts)
    return Generator(config).generate(list(prompts), seeds=seeds, **generation)


# -- the endpoints --------------------------------------------------------------------------------

def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["bigram"]
    status, body = raw(url, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["rows_in_flight"] == 0


def test_completion_with_seed_is_the_library_run(client):
    r = client.completions.create(model="bigram", prompt="The ", max_tokens=12, seed=5)
    expected = library(seed=5)[0]
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.token_ids)


def test_n_samples_and_several_prompts_in_order(client):
    r = client.completions.create(model="bigram", prompt=["The ", "A bird"], max_tokens=8, seed=3, n=2)
    expected = library(prompts=("The ", "A bird"), seed=3, n=2, max_new_tokens=8)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [e.text for e in expected]
    assert r.choices[0].text != r.choices[1].text          # the n samples of a prompt differ
    assert r.usage.prompt_tokens == len(expected[0].prompt_token_ids) + len(expected[2].prompt_token_ids)
    assert r.usage.completion_tokens == sum(len(e.token_ids) for e in expected)


def test_openai_sampling_fields_build_the_pipeline_in_openai_order(client):
    r = client.completions.create(model="bigram", prompt="The ", max_tokens=12, seed=9, temperature=0.7,
                                  top_p=0.8, presence_penalty=0.5, frequency_penalty=0.25)
    expected = library([{"frequency_penalty": 0.25}, {"presence_penalty": 0.5}, {"temperature": 0.7},
                        {"top_p": 0.8}], "categorical", seed=9)[0]
    assert r.choices[0].text == expected.text


def test_temperature_zero_is_greedy_and_logit_bias_forces_a_token(client):
    greedy = client.completions.create(model="bigram", prompt="The ", max_tokens=10, temperature=0)
    assert greedy.choices[0].text == library(sampler="greedy", max_new_tokens=10)[0].text
    forced = client.completions.create(model="bigram", prompt="The ", max_tokens=5, seed=1,
                                       logit_bias={str(ord("z")): 100})
    assert forced.choices[0].text == "zzzzz"


def test_samplerkit_pipeline_and_preset(client):
    pipeline = [{"top_k": 3}, {"temperature": 1.3}]
    r = client.completions.create(model="bigram", prompt="The ", max_tokens=12, seed=2,
                                  extra_body={"samplerkit": {"pipeline": pipeline, "sampler": {"name": "categorical"}}})
    assert r.choices[0].text == library(pipeline, "categorical", seed=2)[0].text
    r = client.completions.create(model="bigram", prompt="The ", max_tokens=12, seed=2,
                                  extra_body={"samplerkit": {"preset": "min_p"}})
    assert r.choices[0].text == Generator({"backend": "bigram", "preset": "min_p"}).generate(
        ["The "], seeds=[2], max_new_tokens=12)[0].text


def test_chat_goes_through_the_chat_template(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    r = client.chat.completions.create(model="bigram", messages=messages, max_tokens=12, seed=4)
    expected = library(prompts=(messages,), seed=4, chat=True)[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streaming_completion_and_chat_equal_the_whole_text(client):
    stream = client.completions.create(model="bigram", prompt="The ", max_tokens=12, seed=5, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == library(seed=5)[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    messages = [{"role": "user", "content": "hi"}]
    chunks = list(client.chat.completions.create(model="bigram", messages=messages, max_tokens=12, seed=4, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    expected = library(prompts=(messages,), seed=4, chat=True, n=2)
    assert [texts[0], texts[1]] == [e.text for e in expected]
    assert chunks[-1].usage.completion_tokens == sum(len(e.token_ids) for e in expected)


def test_logprobs_completions_and_chat(client):
    r = client.completions.create(model="bigram", prompt="The ", max_tokens=6, seed=5, logprobs=2)
    expected = library(seed=5, logprobs=2, max_new_tokens=6)[0]
    lp = r.choices[0].logprobs
    assert lp.tokens == [t.text for t in expected.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in expected.logprobs])
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == len("The ")
    chat = client.chat.completions.create(model="bigram", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          seed=1, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 for t in content)


def test_stop_strings_and_echo(client):
    free = library(seed=5)[0].text
    stop = free[3:5]
    r = client.completions.create(model="bigram", prompt="The ", max_tokens=12, seed=5, stop=[stop])
    assert r.choices[0].text == free[:free.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="bigram", prompt="The ", max_tokens=12, seed=5, echo=True)
    assert r.choices[0].text == "The " + free


# -- bad requests ---------------------------------------------------------------------------------

BAD = [
    ("{", 400, None, "not valid JSON"),
    ("[1, 2]", 400, None, "must be a JSON object"),
    ('{"model": "bigram", "prompt": "a", "temperature": NaN}', 400, None, "NaN is not a JSON number"),
    ('{"model": "bigram", "prompt": "a", "temperature": "0.7"}', 400, "temperature", "not a string"),
    ('{"model": "bigram", "prompt": "a", "temperature": 2.5}', 400, "temperature", "less than or equal to 2"),
    ('{"model": "bigram", "prompt": "a", "top_p": 0}', 400, "top_p", "greater than 0"),
    ('{"model": "bigram", "prompt": "a", "n": true}', 400, "n", "integer"),
    ('{"model": "bigram", "prompt": "a", "max_tokens": 1e400}', 400, "max_tokens", "integer"),
    ('{"model": "bigram", "prompt": "a", "max_tokens": 100000}', 400, "max_tokens", "at most 64"),
    ('{"model": "bigram", "prompt": "a", "seed": -1}', 400, "seed", "greater than or equal to 0"),
    ('{"model": "bigram", "prompt": "a", "n": 17}', 400, "n", "at most 16 rows"),
    ('{"model": "bigram", "prompt": [1, 2, 3]}', 400, "prompt", "token ids"),
    ('{"model": "bigram", "prompt": "a", "logit_bias": {"x": 1}}', 400, "logit_bias", "not a token id"),
    ('{"model": "bigram", "prompt": "a", "logit_bias": {"999": 1}}', 400, "logit_bias", "[0, 258)"),
    ('{"model": "bigram", "prompt": "a", "stop": [""]}', 400, "stop", "must not be empty"),
    ('{"model": "bigram", "prompt": "a", "best_of": 3}', 400, "best_of", "not supported"),
    ('{"model": "bigram", "prompt": "a", "suffix": "b"}', 400, "suffix", "not supported"),
    ('{"model": "bigram", "prompt": "a", "temperature": Infinity}', 400, None, "Infinity is not a JSON number"),
    ('{"model": "bigram", "prompt": "a", "stream": true, "echo": true}', 400, "echo", "not supported"),
    ('{"model": "bigram", "prompt": "a", "n": 100000000000000000000000}', 400, "n", "64-bit"),
    ('{"model": "bigram", "prompt": "a", "samplerkit": {"pipeline": [' + "[" * 50000 + "]" * 50000 + "]}}", 400, None,
     "not valid JSON"),
    ('{"model": "bigram", "prompt": "a", "samplerkit": {"pipeline": [{"top_k": ' + "[" * 200 + "]" * 200 + "}]}}",
     400, "samplerkit.pipeline[0].top_k", "top_k"),
    ('{"model": "bigram", "prompt": "a", "frobnicate": 1}', 400, "frobnicate", "unknown field"),
    ('{"model": "bigram", "prompt": "a", "max_tokens": "\\ud800"}', 400, "max_tokens", "lone surrogate \\ud800"),
    ('{"model": "bigram", "prompt": "a", "samplerkit": {"pipeline": [{"top_k": {"\\ud800": 1}}]}}', 400,
     "samplerkit.pipeline[0].top_k.<key>", "lone surrogate"),
    ('{"model": "other", "prompt": "a"}', 404, "model", "serves 'bigram'"),
    ('{"prompt": "a"}', 400, "model", "required"),
    ('{"model": "bigram", "prompt": "a", "samplerkit": {"pipeline": [{"top_p": 1.5}]}}', 400,
     "samplerkit.pipeline[0]", "samplerkit.pipeline[0] top_p: must be in (0, 1], got 1.5"),
    ('{"model": "bigram", "prompt": "a", "samplerkit": {"pipeline": [{"top_pp": 0.5}]}}', 400,
     "samplerkit.pipeline[0]", "did you mean 'top_p'"),
    ('{"model": "bigram", "prompt": "a", "samplerkit": {"sampler": "top_k"}}', 400, "samplerkit.sampler.name",
     "is a processor"),
    ('{"model": "bigram", "prompt": "a", "samplerkit": {"preset": "nope"}}', 400, "samplerkit.preset", "Presets:"),
    ('{"model": "bigram", "prompt": "a", "samplerkit": {"backend": "llama"}}', 400, "samplerkit.backend",
     "unknown field"),
    ('{"model": "bigram", "prompt": "a", "samplerkit": {"generation": {"max_new_tokens": 9}}}', 400,
     "samplerkit.generation", "unknown field"),
    ('{"model": "bigram", "prompt": "a", "temperature": 0.5, "samplerkit": {"pipeline": []}}', 400, "temperature",
     "both set"),
    ('{"model": "bigram", "prompt": "a", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}',
     400, "response_format.json_schema", "give json_schema.schema"),
]


@pytest.mark.parametrize(("body", "status", "param", "message"), BAD, ids=[b[0][:60] for b in BAD])
def test_bad_requests_get_a_located_4xx(url, body, status, param, message):
    got, data = raw(url, "POST", "/v1/completions", body)
    assert got == status, data
    assert message in data["error"]["message"]
    assert data["error"]["param"] == param or data["error"]["param"].startswith(param + "[")
    assert raw(url, "GET", "/health")[0] == 200


def test_bad_chat_requests(url):
    for body, param, message in [
        ('{"model": "bigram", "messages": []}', "messages", "at least 1"),
        ('{"model": "bigram", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role", "'system'"),
        ('{"model": "bigram", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
         "messages[0].content", "text parts only"),
        ('{"model": "bigram", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', "top_logprobs",
         "needs logprobs"),
    ]:
        status, data = raw(url, "POST", "/v1/chat/completions", body)
        assert status == 400 and data["error"]["param"] == param and message in data["error"]["message"], data


def test_openai_client_raises_its_bad_request_error(client):
    with pytest.raises(openai.BadRequestError, match="must be in"):
        client.completions.create(model="bigram", prompt="a", extra_body={"samplerkit": {"pipeline": [{"min_p": 2}]}})


def test_unknown_route_and_method(url):
    status, data = raw(url, "GET", "/v2/anything")
    assert status == 404 and "/v1/completions" in data["error"]["message"]
    status, data = raw(url, "GET", "/v1/completions")
    assert status == 405 and "error" in data


def test_blocked_plugins_cannot_be_named():
    with running(make_app(overrides=["plugins.block=[example]"])) as base:
        status, data = raw(base, "POST", "/v1/completions", json.dumps(
            {"model": "bigram", "prompt": "a", "samplerkit": {"pipeline": [{"suppress_tokens": {"token_ids": [1]}}]}}))
    assert status == 400 and "unknown processor 'suppress_tokens'" in data["error"]["message"]


# -- auth and limits ------------------------------------------------------------------------------

def test_api_key():
    with running(make_app(api_key="s3cret")) as base:
        assert raw(base, "GET", "/health")[0] == 200                  # health stays open
        status, data = raw(base, "GET", "/v1/models")
        assert status == 401 and data["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="bigram", prompt="a", max_tokens=2)
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="bigram", prompt="a", max_tokens=2).choices[0].finish_reason


def test_body_size_limit():
    with running(make_app(limits=Limits(max_body_bytes=2000))) as base:
        status, data = raw(base, "POST", "/v1/completions", json.dumps({"model": "bigram", "prompt": "x" * 5000}))
        assert status == 413 and "at most 2,000" in data["error"]["message"]
        assert raw(base, "POST", "/v1/completions", json.dumps({"model": "bigram", "prompt": "x",
                                                                 "max_tokens": 1}))[0] == 200


def _held(app):
    """The lock the engine takes to run rows: holding it keeps every job waiting in the engine
    (jobs in flight, deterministically)."""
    return app.state.samplerkit_runner.engine.generator._lock


def _wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_rows_in_flight_limit_is_a_429_then_clears():
    app = make_app(limits=Limits(max_rows=4, max_waiting_rows=0, max_tokens=64))
    with running(app) as base:
        lock = _held(app)
        lock.acquire()
        results = []
        body = json.dumps({"model": "bigram", "prompt": "The ", "n": 3, "max_tokens": 4, "seed": 1})
        waiting = threading.Thread(target=lambda: results.append(raw(base, "POST", "/v1/completions", body)))
        waiting.start()
        try:
            _wait_for(lambda: raw(base, "GET", "/health")[1]["rows_in_flight"] == 3)
            status, data = raw(base, "POST", "/v1/completions", json.dumps(
                {"model": "bigram", "prompt": "a", "n": 2, "max_tokens": 2}))
            assert status == 429 and data["error"]["type"] == "rate_limit_error"
        finally:
            lock.release()
        waiting.join()
        assert results[0][0] == 200 and len(results[0][1]["choices"]) == 3
        _wait_for(lambda: raw(base, "GET", "/health")[1]["rows_in_flight"] == 0)


def test_timeout_is_a_504_and_cancels_the_rows(monkeypatch):
    app = make_app(limits=Limits(max_rows=4, max_tokens=64, request_timeout_s=0.5))
    runner = app.state.samplerkit_runner
    submitted = []
    submit = runner.submit
    monkeypatch.setattr(runner, "submit", lambda job: submitted.append(submit(job)) or submitted[-1])
    with running(app) as base:
        with _held(app):
            status, data = raw(base, "POST", "/v1/completions", json.dumps(
                {"model": "bigram", "prompt": "a", "max_tokens": 60,
                 "samplerkit": {"pipeline": [{"min_tokens": 60}], "sampler": "categorical"}}))
        assert status == 504 and "cancelled" in data["error"]["message"]
        _wait_for(lambda: raw(base, "GET", "/health")[1]["requests_cancelled"] == 1)
        assert raw(base, "GET", "/health")[1]["rows_in_flight"] == 0
        [completion] = submitted[0].requests[0].result(timeout=10)
        assert completion.finish_reason == "cancelled" and len(completion.token_ids) < 60


def test_client_disconnect_cancels_its_rows(monkeypatch):
    app = make_app()
    runner = app.state.samplerkit_runner
    submitted = []
    submit = runner.submit
    monkeypatch.setattr(runner, "submit", lambda job: submitted.append(submit(job)) or submitted[-1])
    # min_tokens keeps EOS away: left alone, each row would run all 60 tokens.
    body = {"model": "bigram", "prompt": "a", "max_tokens": 60,
            "samplerkit": {"pipeline": [{"min_tokens": 60}], "sampler": "categorical"}}
    with running(app) as base:
        parts = urlparse(base)
        with _held(app):                       # both requests wait; their clients leave meanwhile
            for count, stream in enumerate((False, True), start=1):
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
                conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": stream}),
                             headers={"Content-Type": "application/json"})
                _wait_for(lambda n=count: raw(base, "GET", "/health")[1]["requests_in_flight"] == n)
                conn.close()
            _wait_for(lambda: raw(base, "GET", "/health")[1]["requests_cancelled"] == 2)
        health = raw(base, "GET", "/health")[1]
        assert health["rows_in_flight"] == 0 and health["requests_in_flight"] == 0
        for job in submitted:
            [completion] = job.requests[0].result(timeout=10)
            assert completion.finish_reason == "cancelled" and len(completion.token_ids) < 60


def test_streamed_logprobs_are_the_whole_requests(client):
    whole = client.completions.create(model="bigram", prompt="The ", max_tokens=12, seed=5, logprobs=1)
    chunks = list(client.completions.create(model="bigram", prompt="The ", max_tokens=12, seed=5, logprobs=1,
                                            stream=True))
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == whole.choices[0].logprobs.tokens
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="bigram", messages=messages, max_tokens=8, seed=2, logprobs=True)
    chunks = list(client.chat.completions.create(model="bigram", messages=messages, max_tokens=8, seed=2,
                                                 logprobs=True, stream=True))
    streamed = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in whole.choices[0].logprobs.content]


def test_prompt_longer_than_the_context_is_a_400():
    with running(make_app(overrides=["backend.max_context=16"])) as base:
        status, data = raw(base, "POST", "/v1/completions", json.dumps({"model": "bigram", "prompt": "x" * 40}))
        assert status == 400 and "the model's context holds 16" in data["error"]["message"]
        status, data = raw(base, "POST", "/v1/completions", json.dumps(
            {"model": "bigram", "prompt": ["short", "x" * 40]}))
        assert status == 400 and "prompt 1" in data["error"]["message"]
        assert raw(base, "GET", "/health")[1]["rows_in_flight"] == 0


def test_an_error_during_a_stream_is_an_error_event():
    app = make_app(limits=Limits(max_rows=4, max_tokens=64, request_timeout_s=0.5))
    with running(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with _held(app):
            with pytest.raises(openai.APIError, match="longer than 0.5 s"):
                for _ in client.chat.completions.create(model="bigram", messages=[{"role": "user", "content": "x"}],
                                                        stream=True):
                    pass


def test_a_step_parameter_naming_a_file_is_refused():
    """No built-in step reads files; a plugin step's ``file`` parameter must not be reachable
    from a request (it would read a file of the client's choosing)."""
    from pydantic import Field

    from samplerkit.params import StepParams
    from samplerkit.plugins import PluginInfo
    from samplerkit.registry import Entry, Registry
    from samplerkit.serve.protocol import CompletionRequest
    from samplerkit.serve.translate import ServerSide, to_job
    from samplerkit.steps import Processor

    class FromFile(Processor):
        name = "from_file"

        class Params(StepParams):
            file: str | None = Field(None)

        def apply(self, logits, ctx):
            return logits

    base = server_config(None, BASE)[1]
    registry = Registry([*(e for kind in ("processor", "sampler", "backend") for e in base.entries(kind)),
                         Entry("processor", "from_file", FromFile, PluginInfo("toy"))])
    config, _ = server_config(None, BASE)
    server = ServerSide(config, registry, 258, LIMITS)
    ok = CompletionRequest.model_validate({"model": "bigram", "prompt": "a", "samplerkit": {
        "pipeline": [{"from_file": {}}]}})
    assert to_job(ok, server).rows == 1
    bad = CompletionRequest.model_validate({"model": "bigram", "prompt": "a", "samplerkit": {
        "pipeline": [{"top_k": 3}, {"from_file": {"file": "/etc/passwd"}}]}})
    with pytest.raises(ApiError, match=r"samplerkit.pipeline\[1\] from_file: parameter 'file' names a file"):
        to_job(bad, server)


def test_missing_extra_names_it(monkeypatch):
    import sys

    from samplerkit.errors import SamplerkitError
    from samplerkit.serve.app import require_fastapi

    monkeypatch.setitem(sys.modules, "fastapi", None)          # as if not installed
    with pytest.raises(SamplerkitError, match=r"pip install 'samplerkit\[serve\]'"):
        require_fastapi()


def test_cli_usage_errors_exit_2(capsys):
    from samplerkit import cli

    assert cli.main(["serve", "--set", "backend=bigram", "--max-rows", "0"]) == 2
    assert "--max-rows must be at least 1, got 0" in capsys.readouterr().err
    assert cli.main(["serve", "--set", "backend=bigram", "--api-key", " "]) == 2
    assert "--api-key is empty" in capsys.readouterr().err


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "pick", "schema": {"enum": ["the", "then", "there"]}}},
    {"type": "json_object"},
])
def test_response_format_constrains_the_output(response_format):
    """response_format becomes the json_schema / json_object step: every choice parses as JSON
    (and, for a schema, is one of its values), at temperature 1 with several seeds. (The bigram
    model learns its alphabet from its text: this one has JSON's punctuation.)"""
    text = 'backend.text={"the": "then", "there": ["the", 1, true, false, null, 2.5e-3]} the then there'
    with running(make_app(overrides=[text])) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
        _check_response_format(client, response_format)


def _check_response_format(client, response_format):
    for seed in range(3):
        out = client.completions.create(model="bigram", prompt="a", max_tokens=40, seed=seed, temperature=1.0,
                                        extra_body={"response_format": response_format})
        choice = out.choices[0]
        if response_format["type"] == "json_schema":
            assert json.loads(choice.text) in ("the", "then", "there"), choice.text
            assert choice.finish_reason == "stop"
        elif choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict), choice.text
        else:                                  # cut by max_tokens: a valid prefix of an object
            assert choice.text.lstrip().startswith("{"), choice.text
