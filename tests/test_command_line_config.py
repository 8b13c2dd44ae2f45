"""One function reads a config the way the command line does (samplerkit.config.command_line_data):
generate, validate, lint and explain build the same config from the same arguments."""

from __future__ import annotations

import argparse

import pytest

import samplerkit.config
from samplerkit import explain, lint
from samplerkit.cli import _build_config_data, _resolve, main

YAML = "backend: bigram\npreset: llama_cpp\nplugins: {block: [example]}\nsampler: {name: categorical, seed: 4}\n"
SETS = ["pipeline[5].top_k=7", "generation.max_new_tokens=3"]


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = samplerkit.config.command_line_data

    def spy(*args, **kwargs):
        seen.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(samplerkit.config, "command_line_data", spy)
    return seen


def test_every_verb_reads_the_config_through_one_function(tmp_path, calls, capsys):
    path = str(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text(YAML)
    cli_config, _ = _resolve(*_build_config_data(path, SETS))
    document, lint_config = lint.load_config(path, SETS)
    args = argparse.Namespace(config=path, overrides=SETS, preset=None, model=None, seed=None, chat=False)
    explain_config, _ = explain._config(args)
    assert main(["validate", path, *[f"--set={s}" for s in SETS]]) == 0
    assert main(["lint", path, *[f"--set={s}" for s in SETS]]) == 0
    capsys.readouterr()
    assert calls == [path] * 5
    assert document == samplerkit.config.read_yaml(path)          # the file as written, for lint's rules
    for config in (lint_config, explain_config):
        assert config.raw == cli_config.raw and config.processors == cli_config.processors
    # The preset was expanded before --set edited its pipeline; the document's block holds.
    assert cli_config.processors[5].name == "top_k" and cli_config.processors[5].params.top_k == 7
    assert cli_config.plugins.block == ["example"]
