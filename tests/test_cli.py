"""The `samplerkit` command, in-process through samplerkit.cli.main, plus the console script."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import samplerkit
import samplerkit.plugins
from samplerkit import SamplerkitError, hookimpl
from samplerkit.cli import main

BIGRAM = ["--set", "backend=bigram"]
ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_on_bigram(capsys):
    code, out, err = run(capsys, "generate", "The capital", *BIGRAM, "--seed", "3", "--max-new-tokens", "12")
    assert code == 0, err
    assert out.endswith("\n")                                   # the continuation only (docs/cli.md)
    assert 0 < len(out.rstrip("\n").encode()) <= 12
    again = run(capsys, "generate", "The capital", *BIGRAM, "--seed", "3", "--max-new-tokens", "12")[1]
    assert again == out                                           # seeded: reproducible


def test_generate_json(capsys):
    code, out, err = run(capsys, "generate", "The", "She sells", *BIGRAM, "--seed", "1", "--max-new-tokens", "8",
                         "-n", "2", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rows:
        assert r["finish_reason"] in {"stop", "length"} and len(r["token_ids"]) <= 8
        assert r["text"] == bytes(t for t in r["token_ids"]).decode("utf-8", "replace")
    assert rows[0]["prompt"] == "The"


def test_generate_with_a_config_file_and_overrides(capsys):
    code, out, err = run(capsys, "generate", "The", "A", "--config", str(ROOT / "examples" / "bigram.yaml"),
                         "--set", "generation.max_new_tokens=5", "--set", "pipeline[0].temperature=0.0")
    assert code == 0, err
    assert out.count("--- prompt") == 2 and "(finish: " in out


def test_plugins_lists_builtins_with_plugin_names_and_parameters(capsys):
    code, out, err = run(capsys, "plugins")
    assert code == 0
    assert out.startswith("processors:")
    for name in ("temperature", "top_k", "top_p", "min_p", "greedy", "categorical", "bigram"):
        assert f"  {name}  [" in out
    assert "[samplerkit.builtins.truncation (built-in)]" in out
    assert "top_p: number = 1.0 (> 0.0, <= 1.0)" in out or "top_p: number = 1.0" in out
    assert "cumulative probability kept; 1 disables" in out


def test_plugins_json(capsys):
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    data = json.loads(out)
    top_k = next(e for e in data["processor"] if e["name"] == "top_k")
    assert top_k["plugin"] == "samplerkit.builtins.truncation"
    assert top_k["parameters"][0]["name"] == "top_k" and top_k["parameters"][0]["default"] == 0
    assert {e["name"] for e in data["sampler"]} >= {"greedy", "categorical"}


def test_plugins_block(capsys):
    code, out, _ = run(capsys, "plugins", "--json", "--block", "samplerkit.builtins.samplers")
    assert code == 0
    samplers = json.loads(out)["sampler"]
    assert not {"greedy", "categorical"} & {e["name"] for e in samplers}
    assert all(e["plugin"] != "samplerkit.builtins.samplers" for e in samplers)


def test_validate_ok(capsys, tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("backend: bigram\npipeline:\n  - top_k: 40\n  - top_p: 0.9\nsampler: {name: categorical, seed: 1}\n")
    code, out, err = run(capsys, "validate", str(path))
    assert code == 0 and err == ""
    assert f"{path}: ok" in out
    assert "top_k(top_k=40) -> top_p(top_p=0.9) => categorical(seed=1)" in out


def test_validate_failing(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pipeline:\n  - top_p: 1.5\n  - top_q: 3\n")
    code, out, err = run(capsys, "validate", str(path))
    assert code == 2 and out == ""
    assert "pipeline[0] top_p: must be in (0, 1], got 1.5" in err
    assert "pipeline[1]: unknown processor 'top_q'; did you mean 'top_p'?" in err
    assert "Traceback" not in err and err.startswith("samplerkit validate: error:")


def test_validate_yaml_syntax_error(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("pipeline: [top_p\n")
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2 and "YAML syntax error" in err and "line " in err and "Traceback" not in err


def test_validate_with_set(capsys):
    code, out, err = run(capsys, "validate", str(ROOT / "examples" / "seed.yaml"), "--set", "pipeline[1].top_p=2")
    assert code == 2 and "pipeline[1] top_p: must be in (0, 1], got 2" in err


def test_validate_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file not found" in err


def test_schema_is_json(capsys):
    code, out, _ = run(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "samplerkit run configuration"
    assert "pipeline" in schema["properties"]


def test_unknown_step_exits_2_with_did_you_mean(capsys):
    code, out, err = run(capsys, "generate", "x", *BIGRAM, "--set", "pipeline=[{top_q: 0.9}]")
    assert code == 2
    assert "unknown processor 'top_q'; did you mean 'top_p'?" in err and "Traceback" not in err


def test_prompt_too_long_is_a_user_error(capsys):
    code, _, err = run(capsys, "generate", "x" * 20, *BIGRAM, "--set", "backend.max_context=8")
    assert code == 2 and "context holds 8" in err and "Traceback" not in err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_console_script():
    script = shutil.which("samplerkit", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the samplerkit console script is not installed in this environment (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([script, "generate", "The", "--set", "backend=bigram", "--seed", "2",
                           "--max-new-tokens", "6", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["prompt"] == "The" and len(row["token_ids"]) <= 6
    bad = subprocess.run([script, "validate", "/nonexistent.yaml"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_module_entry_point():
    """`python -m samplerkit.cli` works without the console script."""
    proc = subprocess.run([sys.executable, "-m", "samplerkit.cli", "schema"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["type"] == "object"


# -- verbs from plugins (register_commands) ------------------------------------------------------

class CommandPlugin:
    """A plugin adding `hello`, as docs/cli.md shows."""

    @staticmethod
    @hookimpl
    def register_commands(subparsers):
        hello = subparsers.add_parser("hello", help="say hello")
        hello.add_argument("--name", default="world")
        hello.add_argument("--fail", action="store_true")

        def run(args):
            if args.fail:
                raise SamplerkitError("hello failed as asked")
            print(f"hello {args.name}")
            return 0
        hello.set_defaults(run=run)


class ClashingPlugin:
    @staticmethod
    @hookimpl
    def register_commands(subparsers):
        subparsers.add_parser("generate", help="a second generate")


class RaisingPlugin:
    @staticmethod
    @hookimpl
    def register_commands(subparsers):
        subparsers.add_parser("half", help="added before the plugin fails")
        raise RuntimeError("broken plugin")


class NoHandlerPlugin:
    @staticmethod
    @hookimpl
    def register_commands(subparsers):
        subparsers.add_parser("nohandler")


@pytest.fixture
def with_plugins(monkeypatch):
    def install(*plugins):
        real = samplerkit.plugins.make_plugin_manager
        extra = [(p.__name__, p) for p in plugins]
        monkeypatch.setattr(samplerkit.plugins, "make_plugin_manager", lambda **kw: real(extra=extra, **kw))
    return install


def test_a_plugin_adds_a_command(capsys, with_plugins):
    with_plugins(CommandPlugin)
    code, out, err = run(capsys, "hello", "--name", "samplerkit")
    assert (code, out, err) == (0, "hello samplerkit\n", "")
    code, out, err = run(capsys, "hello", "--fail")
    assert code == 2 and err == "samplerkit hello: error: hello failed as asked\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "say hello" in capsys.readouterr().out


def test_a_plugin_reusing_a_verb_or_raising_is_reported_and_the_rest_works(capsys, with_plugins):
    with_plugins(ClashingPlugin, RaisingPlugin, CommandPlugin)
    code, out, err = run(capsys, "hello")
    assert code == 0 and out == "hello world\n"
    assert "warning: plugin ClashingPlugin (registered in code) failed in register_commands(): ArgumentError" in err
    assert "conflicting subparser: generate" in err
    assert "warning: plugin RaisingPlugin (registered in code) failed in register_commands(): RuntimeError: " \
           "broken plugin" in err
    code, out, err = run(capsys, "generate", "The", *BIGRAM, "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(out.splitlines()[0])["prompt"] == "The"     # the built-in generate
    with pytest.raises(SystemExit):                                   # the failed plugin's verb is left out
        main(["half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "added before the plugin fails" not in capsys.readouterr().out


def test_a_plugin_command_without_a_handler_is_a_clear_error(capsys, with_plugins):
    with_plugins(NoHandlerPlugin)
    code, _, err = run(capsys, "nohandler")
    assert code == 2 and "the plugin command 'nohandler' set no handler" in err and "set_defaults(run=" in err


def test_builtin_verbs_are_declared_once():
    """The parser is built from COMMANDS alone: the same verbs, in order, no other list."""
    from samplerkit.cli import COMMANDS, _parser

    parser = _parser(plugin_commands=False)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [c.name for c in COMMANDS]
    assert len({c.name for c in COMMANDS}) == len(COMMANDS)


def test_a_warning_reaches_the_command_line_user_as_one_line(capsys, monkeypatch):
    """A UserWarning raised while a command runs (a cache that cannot be written, the compiled
    kernels falling back) prints as ``samplerkit: warning: ...``, without Python's source line."""
    import warnings

    from samplerkit import cli

    def command(argv):
        warnings.warn("the cache cannot be written", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "_main", command)
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main([]) == 0
    err = capsys.readouterr().err
    assert err == "samplerkit: warning: the cache cannot be written\n"
    assert warnings.showwarning is before
