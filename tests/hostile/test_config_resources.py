"""Hostile configs, resource exhaustion (issue 14 items 6 and 7): alias bombs, huge files, deep
nesting, millions of entries, megabyte values echoed in messages. Each must end in a clean
ConfigError, quickly: the time bounds are far above the milliseconds these take and far below
the minutes (and gigabytes) they took before."""

from __future__ import annotations

import importlib
import time
from contextlib import contextmanager

import pytest
import yaml

from samplerkit.config import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_NODES,
    MAX_PIPELINE_STEPS,
    apply_override,
    parse_yaml,
    read_yaml,
    resolve,
)
from samplerkit.errors import MAX_ISSUES, MAX_VALUE_CHARS, ConfigError
from samplerkit.registry import default_registry

REGISTRY = default_registry()
config_module = importlib.import_module("samplerkit.config")


@contextmanager
def within(seconds: float):
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    assert elapsed < seconds, f"took {elapsed:.2f} s (bound {seconds} s)"


def config_error(fn, *args) -> str:
    with within(2.0), pytest.raises(ConfigError) as info:
        fn(*args)
    text = str(info.value)
    assert "Traceback" not in text and len(text) < 20_000, text[:500]
    return text


def alias_bomb(levels: int = 9, width: int = 9, as_pipeline: bool = False) -> str:
    """~400 bytes that expand to width**levels values: each anchor lists the previous one
    ``width`` times."""
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    if as_pipeline:
        return "x:\n" + "\n".join("  " + line for line in lines) + f"\npipeline: *a{levels - 1}\n"
    return "\n".join(f"- top_p: {{{line}}}" if i == levels - 1 else f"- {line}" for i, line in enumerate(lines))


def test_yaml_alias_bomb_is_refused_before_expanding():
    text = alias_bomb()
    assert len(text) < 600
    msg = config_error(parse_yaml, text)
    assert f"more than {MAX_CONFIG_NODES:,} values once its aliases are expanded" in msg and "line " in msg


def test_yaml_alias_bomb_as_pipeline_entries():
    msg = config_error(parse_yaml, alias_bomb(as_pipeline=True))
    assert "aliases are expanded" in msg


def test_recursive_alias_is_refused():
    assert "(a cycle)" in config_error(parse_yaml, "pipeline: &a [*a]")


def test_a_shared_list_bomb_from_python_is_refused():
    """The dict path: one list referenced ten times per level, nine levels (10**9 values)."""
    bomb: list = [0.5] * 10
    for _ in range(8):
        bomb = [bomb] * 10
    msg = config_error(resolve, {"pipeline": [{"logit_bias": {"bias": {1: bomb}}}]}, REGISTRY)
    assert f"holds more than {MAX_CONFIG_NODES:,} values" in msg


def test_self_containing_python_list_is_refused():
    loop: list = []
    loop.append(loop)
    assert f"nested more than {MAX_CONFIG_DEPTH} levels deep" in config_error(resolve, {"pipeline": loop}, REGISTRY)


@pytest.mark.parametrize("depth", [2000, 5000, 100_000])
def test_deep_yaml_nesting_is_a_clean_error(depth):
    """Flow style: 100,000 nested ``[`` crashed libyaml's composer (a C stack overflow)."""
    msg = config_error(parse_yaml, "pipeline: " + "[" * depth + "]" * depth)
    # libyaml 0.2.6+ has a nesting limit of its own (1000) that its look-ahead can hit first.
    assert (f"nested more than {MAX_CONFIG_DEPTH} levels deep" in msg or "exceeded maximum nesting depth" in msg), msg
    assert "line 1" in msg


def test_deep_block_mapping_is_a_clean_error():
    text = "".join("  " * i + f"k{i}:\n" for i in range(500)) + "  " * 500 + "x: 1\n"
    assert f"nested more than {MAX_CONFIG_DEPTH} levels deep" in config_error(parse_yaml, text)


@pytest.mark.parametrize("depth", [2000, 5000])
def test_deep_python_dict_is_a_clean_error(depth):
    deep: dict = {}
    node = deep
    for _ in range(depth):
        node["k"] = {}
        node = node["k"]
    msg = config_error(resolve, {"backend": {"name": "bigram", "x": deep}}, REGISTRY)
    assert f"nested more than {MAX_CONFIG_DEPTH} levels deep" in msg and "backend.x.k.k" in msg


def test_deep_set_override_is_a_clean_error():
    # Either the loader's bound refuses the value, or (libyaml 0.2.6+, whose own nesting limit
    # makes it invalid YAML) it stays a string, as any non-YAML --set value does, and is no backend.
    msg = config_error(lambda: resolve(apply_override({}, "backend=" + "[" * 5000 + "]" * 5000), REGISTRY))
    assert "levels deep" in msg or "backend.name: unknown backend '[[[[" in msg, msg
    assert "the key path is more than" in config_error(apply_override, {}, "a" + ".b" * 5000 + "=1")


def test_a_config_file_larger_than_the_limit_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"backend: bigram\npipeline:\n" + b"- top_p: 0.5\n" * (MAX_CONFIG_BYTES // 13 + 10))
    msg = config_error(read_yaml, path)
    assert f"larger than {MAX_CONFIG_BYTES:,} bytes" in msg and str(path) in msg
    assert f"longer than {MAX_CONFIG_BYTES:,} characters" in config_error(parse_yaml, "a: " + "x" * MAX_CONFIG_BYTES)


def test_the_c_yaml_loader_is_used_when_present():
    from samplerkit import yaml_io

    if getattr(yaml, "__with_libyaml__", False):
        assert issubclass(yaml_io._Loader, yaml.CSafeLoader)
    else:
        assert issubclass(yaml_io._Loader, yaml.SafeLoader)


def test_millions_of_invalid_entries_are_refused_at_once():
    """3.5M invalid entries ran past 600 s. From YAML they hit the size limit (above); from
    Python, the value count; below that, the pipeline's length."""
    with within(2.0), pytest.raises(ConfigError) as info:
        resolve({"pipeline": ["top_q"] * 3_500_000}, REGISTRY)
    assert f"pipeline: holds more than {MAX_CONFIG_NODES:,} values" in str(info.value)
    with within(2.0), pytest.raises(ConfigError) as info:
        resolve({"pipeline": ["top_q"] * 50_000}, REGISTRY)
    assert f"has 50,000 steps; at most {MAX_PIPELINE_STEPS:,}" in str(info.value)


def test_reported_problems_are_capped_with_a_count_of_the_rest():
    msg = config_error(resolve, {"pipeline": [{"top_p": 2}] * 900}, REGISTRY)
    assert msg.startswith("invalid configuration (900 problems):")
    assert len(msg.splitlines()) == 1 + MAX_ISSUES + 1
    assert msg.splitlines()[-1].strip() == f"... and {900 - MAX_ISSUES} more problems (fix these and validate again)"


@pytest.mark.parametrize("data", [
    {"pipeline": [{"top_p": "x" * 1_000_000}]},                         # a 1 MB string
    {"pipeline": [{"top_k": [1] * 200_000}]},                           # a long list
    {"pipeline": [["x" * 100] * 10_000]},                               # an entry that is not a mapping
    {"sampler": {"name": "y" * 1_000_000}},                             # an unknown name
    {"preset": "z" * 1_000_000},
    {"generation": {"stop": "s" * 1_000_000}},
    {"w" * 1_000_000: 1},                                                # an unknown section
    {"backend": {"name": "bigram", "v" * 1_000_000: 1}},                # an unknown parameter
])
def test_messages_truncate_the_values_they_echo(data):
    msg = config_error(resolve, data, REGISTRY)
    # Each echo is at most MAX_VALUE_CHARS plus its "... (N chars)" note; the rest is fixed text.
    assert len(msg) < 2 * MAX_VALUE_CHARS + 600, msg[:1000]
    assert "chars)" in msg or "items)" in msg


def test_no_message_echoes_a_value_untruncated():
    """The class of the 2 GB error text: ``got {value!r}``. Every "got <value>" goes through
    samplerkit.errors.short_repr (samplerkit.testing's assertions, about a plugin's own code,
    are not user input)."""
    import re
    from pathlib import Path

    import samplerkit

    pattern = re.compile(r"got \{[^}]*!r\}")
    root = Path(samplerkit.__file__).parent
    offenders = [f"{p.name}: {m.group(0)}" for p in root.rglob("*.py") if p.parent.name != "testing"
                 for m in pattern.finditer(p.read_text())]
    assert offenders == []
