"""Hostile configs, wrong types and encodings (issue 14 items 11 and 12): each is a ConfigError
naming where the problem is, and through the real ``samplerkit`` command exit 2 with no
traceback, in ``validate`` and ``generate`` alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from samplerkit.config import apply_override, parse_yaml, read_yaml, resolve
from samplerkit.errors import ConfigError
from samplerkit.registry import default_registry

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = default_registry()


def problems(data) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(data, REGISTRY)
    return str(info.value)


def samplerkit_command() -> list[str]:
    """The installed console script; where it is not installed, the same entry point run as a
    module (never a skip)."""
    script = shutil.which("samplerkit", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "samplerkit.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*samplerkit_command(), *args], capture_output=True, text=True, env=env, timeout=120)


# -- encodings --------------------------------------------------------------------------

@pytest.mark.parametrize("encoding, hint", [("latin-1", ""), ("utf-16", " (it looks like UTF-16)"),
                                            ("utf-16-be", " (it looks like UTF-16)")])
def test_a_config_that_is_not_utf8_is_a_located_error(tmp_path, encoding, hint):
    path = tmp_path / "c.yaml"
    path.write_bytes("backend: bigram\ngeneration: {stop: [\"café\"]}\n".encode(encoding))
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    msg = str(info.value)
    assert f"in {path}: line " in msg and f"the file is not UTF-8 text{hint}" in msg and "save it as UTF-8" in msg
    if encoding == "latin-1":
        assert "line 2, column 25: the file is not UTF-8 text: byte 0xe9" in msg


# -- names that are not strings ----------------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    ({"sampler": {"name": ["categorical"]}}, "sampler.name: must be the name of a sampler (a string), got ['categorical']"),
    ({"backend": {"name": {"a": 1}}}, "backend.name: must be the name of a backend (a string), got {'a': 1}"),
    ({"backend": "bigram", "pipeline": [{1: 0.5}]}, "pipeline[0]: a step name is a string, like `- top_p: 0.9`; got 1"),
])
def test_unhashable_or_non_string_names(data, expected):
    assert expected in problems(data)


def test_set_an_unhashable_name():
    data = apply_override({"backend": "bigram"}, "sampler.name=[1]")
    assert "sampler.name: must be the name of a sampler (a string), got [1]" in problems(data)


@pytest.mark.parametrize("block, expected", [
    ([[1]], "plugins.block[0]: must be a plugin name (a string), got [1]"),
    ([None], "plugins.block[0]: must be a plugin name (a string), got None"),
    (["samplerkit.builtins.truncaton"], "plugins.block[0]: unknown plugin 'samplerkit.builtins.truncaton'; "
                                        "did you mean 'samplerkit.builtins.truncation'?"),
])
def test_bad_plugin_block_entries(block, expected):
    with pytest.raises(ConfigError) as info:
        default_registry(block)
    assert expected in str(info.value)


def test_device_name_is_checked_at_validation():
    assert "backend bigram.device: not a torch device name" in problems({"backend": {"name": "bigram", "device": "potato"}})
    assert "backend llama.device: not a torch device name" in problems({"backend": {"name": "llama", "device": "potato"}})
    # Whether the machine has the device is checked when the backend starts, so this validates anywhere.
    assert resolve({"backend": {"name": "bigram", "device": "cuda:1"}}, REGISTRY).backend.params.device == "cuda:1"


# -- strict numbers, int64 ranges, duplicate keys -------------------------------------------

@pytest.mark.parametrize("data, expected", [
    ({"pipeline": [{"top_k": 10**29}]}, "pipeline[0] top_k: must lie in the 64-bit integer range"),
    ({"pipeline": [{"top_k": "1e29"}]}, "pipeline[0] top_k: input should be an integer, not a string, got '1e29'"),
    ({"pipeline": [{"logit_bias": {"bias": {10**23: 1.0}}}]}, "pipeline[0] logit_bias.bias.100000000000000000000000: must lie in"),
    ({"pipeline": [{"allowed_tokens": {"allowed_tokens": [10**23]}}]}, "pipeline[0] allowed_tokens.0: must lie in"),
    ({"pipeline": [{"bad_words": {"bad_words": [[1, 10**23]]}}]}, "pipeline[0] bad_words.0.1: must lie in the 64-bit integer range [-2**63, 2**63), got 1000000"),
    ({"generation": {"stop_token_ids": [-1]}}, "generation.stop_token_ids.0: must be >= 0, got -1"),
    ({"generation": {"stop_token_ids": [10**23]}}, "generation.stop_token_ids.0: must lie in the 64-bit"),
    ({"generation": {"stop_token_ids": [1e23]}}, "generation.stop_token_ids.0: input should be an integer, not a float, got 1e+23"),
    ({"pipeline": [{"min_tokens": {"min_tokens": -5}}]}, "pipeline[0] min_tokens: must be >= 0, got -5"),
    ({"pipeline": [{"top_k": True}]}, "pipeline[0] top_k: input should be an integer, not true/false, got True"),
    ({"pipeline": [{"top_k": "50"}]}, "pipeline[0] top_k: input should be an integer, not a string, got '50'"),
    ({"pipeline": [{"top_k": 50.0}]}, "pipeline[0] top_k: input should be an integer, not a float, got 50.0"),
    ({"pipeline": [{"top_p": "0.5"}]}, "pipeline[0] top_p: input should be a number, not a string, got '0.5'"),
    ({"pipeline": [{"temperature": True}]}, "pipeline[0] temperature: input should be a number, not true/false"),
    ({"generation": {"max_new_tokens": "5"}}, "generation.max_new_tokens: input should be an integer, not a string"),
    ({"generation": {"ignore_eos": 1}}, "generation.ignore_eos: input should be true or false, got 1"),
    ({"sampler": {"name": "categorical", "seed": 2**64}}, "sampler categorical.seed: must lie in the 64-bit"),
])
def test_strict_types_and_int64_ranges(data, expected):
    assert expected in problems({"backend": "bigram", **data})


def test_int_to_float_stays_accepted():
    cfg = resolve({"backend": "bigram", "pipeline": [{"top_p": 1}, {"temperature": 2}, {"top_k": 50}]}, REGISTRY)
    assert [s.params.model_dump() for s in cfg.processors] == [{"top_p": 1.0}, {"temperature": 2.0}, {"top_k": 50}]
    assert isinstance(cfg.processors[0].params.top_p, float)
    # JSON objects have string keys: an integer-keyed mapping still takes them.
    cfg = resolve({"backend": "bigram", "pipeline": [{"logit_bias": {"bias": {"5": 1.5}}}]}, REGISTRY)
    assert cfg.processors[0].params.bias == {5: 1.5}


@pytest.mark.parametrize("text, expected", [
    ("pipeline:\n  - top_k: 5\nsampler: greedy\npipeline: []\n",
     "line 4, column 1: duplicate key 'pipeline' (first on line 1, again on line 4)"),
    ("sampler: {name: categorical, seed: 1, seed: 2}\n", "duplicate key 'seed' (first on line 1, again on line 1)"),
])
def test_duplicate_yaml_keys_name_both_lines(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_yaml(text)
    assert expected in str(info.value)


def test_merge_keys_still_override():
    assert parse_yaml("d: &d {seed: 1, name: categorical}\nsampler: {<<: *d, seed: 2}\n")["sampler"] == {
        "seed": 2, "name": "categorical"}


# -- through the real command ------------------------------------------------------------

# Each case runs once, through `validate` or `generate` (a subprocess costs seconds; both
# commands share the loading path these exercise).
@pytest.mark.parametrize("command, content, expected", [
    ("validate", b"backend: bigram\nsampler: {name: [categorical]}\n", "sampler.name: must be the name of a sampler"),
    ("validate", b"backend: bigram\nplugins: {block: [[1]]}\n", "plugins.block[0]: must be a plugin name"),
    ("generate", b"backend: bigram\nplugins: {block: [null]}\n", "plugins.block[0]: must be a plugin name"),
    ("generate", b"backend: {name: bigram, device: potato}\n", "backend bigram.device: not a torch device name"),
    ("validate", b"backend: bigram\npipeline: [{top_k: 100000000000000000000000000000}]\n", "top_k: must lie in the 64-bit"),
    ("generate", "backend: bigram\n".encode("utf-16"), "the file is not UTF-8 text (it looks like UTF-16)"),
])
def test_cli_validate_and_generate_exit_2(tmp_path, command, content, expected):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    args = ["validate", str(path)] if command == "validate" else ["generate", "--config", str(path), "The"]
    proc = run_cli(*args)
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_cli_set_unhashable_name_exits_2():
    proc = run_cli("generate", "--set", "backend=bigram", "--set", "sampler.name=[1]", "The")
    assert proc.returncode == 2 and "sampler.name: must be the name of a sampler" in proc.stderr
    assert "Traceback" not in proc.stderr
