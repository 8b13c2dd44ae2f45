"""Relative ``file:`` paths in step parameters: read from the YAML file's directory when the
config is a YAML file (library, CLI, lint), from the working directory for a mapping or a
command-line flag; errors name the resolved path."""

from __future__ import annotations

import json
import os

import pytest

import samplerkit
from samplerkit.builtins.structured import JsonSchema
from samplerkit.cli import main
from samplerkit.errors import ConfigError

pytest.importorskip("llguidance")

ENUM = {"enum": ["cat", "dog"]}


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """``cfg/run.yaml`` naming ``schemas/s.json`` next to it; the working directory elsewhere,
    holding a different ``schemas/s.json`` that must not be read."""
    (tmp_path / "cfg" / "schemas").mkdir(parents=True)
    (tmp_path / "cfg" / "schemas" / "s.json").write_text(json.dumps(ENUM))
    (tmp_path / "cfg" / "run.yaml").write_text(
        "backend: {name: bigram, text: '\"cat\" \"dog\" \"elsewhere\"'}\npipeline:\n  - json_schema: {file: schemas/s.json}\nsampler: greedy\n"
        "generation: {max_new_tokens: 8}\n")
    work = tmp_path / "work"
    (work / "schemas").mkdir(parents=True)
    (work / "schemas" / "s.json").write_text(json.dumps({"enum": ["elsewhere"]}))
    monkeypatch.chdir(work)
    return tmp_path


def _step_file(pipeline):
    return pipeline.processors[0].params.file


def test_yaml_file_paths_are_relative_to_the_yaml_file(layout):
    pipe = samplerkit.load_pipeline(str(layout / "cfg" / "run.yaml"))
    assert _step_file(pipe) == str(layout / "cfg" / "schemas" / "s.json")
    # The same config through a relative path to the YAML file.
    pipe = samplerkit.load_pipeline(os.path.join("..", "cfg", "run.yaml"))
    assert _step_file(pipe) == str(layout / "cfg" / "schemas" / "s.json")
    out = samplerkit.Generator(str(layout / "cfg" / "run.yaml")).generate(["x"])
    assert json.loads(out[0].text) in ENUM["enum"]


def test_a_mapping_is_relative_to_the_working_directory(layout):
    pipe = samplerkit.load_pipeline({"pipeline": [{"json_schema": {"file": "schemas/s.json"}}], "sampler": "greedy"})
    assert _step_file(pipe) == str(layout / "work" / "schemas" / "s.json")
    assert JsonSchema.Params(file="schemas/s.json").file == str(layout / "work" / "schemas" / "s.json")


def test_missing_file_names_the_resolved_path(layout):
    (layout / "cfg" / "bad.yaml").write_text("pipeline:\n  - json_schema: {file: nope/s.json}\n")
    with pytest.raises(ConfigError) as info:
        samplerkit.load_pipeline(str(layout / "cfg" / "bad.yaml"))
    text = str(info.value)
    assert str(layout / "cfg" / "nope" / "s.json") in text and "pipeline[0] json_schema" in text, text


def test_cli_config_and_flag(layout, capsys):
    assert main(["lint", str(layout / "cfg" / "run.yaml")]) == 0
    capsys.readouterr()
    # --json-schema is a command-line path: relative to the working directory, even with --config.
    code = main(["generate", "--config", str(layout / "cfg" / "run.yaml"), "--set", "pipeline=[]",
                 "--json-schema", "schemas/s.json", "--max-new-tokens", "12", "x"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out.strip()) == "elsewhere"
    assert main(["generate", "--json-schema", "missing.json", "--set", "backend.name=bigram", "x"]) == 2
    assert str(layout / "work" / "missing.json") in capsys.readouterr().err


def test_set_paths_are_relative_to_the_config_file(layout):
    from samplerkit.lint import load_config

    (layout / "cfg" / "schemas" / "t.json").write_text(json.dumps({"enum": ["t"]}))
    _, config = load_config(str(layout / "cfg" / "run.yaml"), ["pipeline[0].json_schema.file=schemas/t.json"])
    assert config.processors[0].params.file == str(layout / "cfg" / "schemas" / "t.json")


def test_the_shipped_example_reads_its_schema_from_any_directory(layout):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "structured.yaml")
    pipe = samplerkit.load_pipeline(os.path.abspath(example))
    assert _step_file(pipe) == os.path.abspath(os.path.join(os.path.dirname(example), "person.schema.json"))


def test_an_empty_path_is_refused_not_read_as_the_directory(layout):
    (layout / "cfg" / "empty.yaml").write_text("pipeline:\n  - json_schema: {file: ''}\n")
    with pytest.raises(ConfigError, match=r"pipeline\[0\] json_schema.file: string should have at least 1 character"):
        samplerkit.load_pipeline(str(layout / "cfg" / "empty.yaml"))
