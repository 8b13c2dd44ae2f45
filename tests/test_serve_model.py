"""`samplerkit serve` on the real default model: a seeded request is `samplerkit generate`'s run
token for token (completions and chat), through the official `openai` client."""

from __future__ import annotations

import importlib
import json

import openai
import pytest

from samplerkit import cli
from samplerkit.serve.command import build, running, server_config
from samplerkit.serve.protocol import Limits

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served():
    config, registry = server_config(None, [])
    app = build(config, registry, Limits(max_rows=8, max_tokens=32))
    with running(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, client.models.list().data[0].id, app.state.samplerkit_runner.backend


def cli_json(served, monkeypatch, capsys, *args: str) -> list[dict]:
    """`samplerkit generate --json ARGS`, the whole command path, on the model the server loaded
    (loading it twice would double this module's time; the server is idle meanwhile)."""
    monkeypatch.setattr(importlib.import_module("samplerkit.generate"), "load_backend", lambda config: served[2])
    assert cli.main(["generate", "--json", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_the_model_id_is_the_model_file(served):
    assert served[1] == "SmolLM2-135M-Instruct.Q4_1"


def test_seeded_completion_is_samplerkit_generate_token_for_token(served, monkeypatch, capsys):
    client, model, _ = served
    [expected] = cli_json(served, monkeypatch, capsys, "--seed", "7", "--max-new-tokens", "10", PROMPT)
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, seed=7, logprobs=0)
    choice = r.choices[0]
    assert choice.text == expected["text"]
    assert r.usage.completion_tokens == len(expected["token_ids"])
    assert r.usage.prompt_tokens == len(expected["prompt_token_ids"])
    tokens = choice.logprobs.tokens
    assert len(tokens) == len(expected["token_ids"]) and "".join(tokens) == expected["text"]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=10, seed=7, stream=True))
    assert streamed == expected["text"]


def test_seeded_chat_is_samplerkit_generate_chat(served, monkeypatch, capsys, tmp_path):
    client, model, _ = served
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages))
    [expected] = cli_json(served, monkeypatch, capsys, "--seed", "11", "--max-new-tokens", "8", "--messages", str(path))
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, seed=11)
    assert r.choices[0].message.content == expected["text"]
    assert r.usage.completion_tokens == len(expected["token_ids"])
    assert r.usage.prompt_tokens == len(expected["prompt_token_ids"])
