"""Hostile command lines (issue 14 items 14-15): bytes that are not UTF-8, Ctrl-C at any time,
and what a single streamed prompt prints. Through the real `samplerkit` command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import samplerkit
from samplerkit.cli import main

ROOT = Path(__file__).resolve().parents[2]


def samplerkit_script() -> str:
    script = shutil.which("samplerkit", path=str(Path(sys.executable).parent))
    assert script is not None, "the samplerkit console script is not installed (pip install -e .)"
    return script


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SAMPLERKIT_QUIET": "1"}


def test_a_prompt_that_is_not_utf8_is_a_clean_error_naming_it():
    """`samplerkit generate --set backend=bigram $'\\xff\\xfe abc'`: a UnicodeEncodeError traceback before."""
    proc = subprocess.run([samplerkit_script(), "generate", "--set", "backend=bigram", "ok", b"\xff\xfe abc"],
                          capture_output=True, env=environment(), timeout=120)
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == 2, err
    assert "Traceback" not in err and proc.stdout == b""
    assert "samplerkit generate: error: PROMPT 2 is not valid UTF-8 text (byte 0xff at character 1 of " \
           "b'\\xff\\xfe abc')" in err


@pytest.mark.parametrize("argv, where", [
    (["generate", "x", "--set", "backend=bigram", "--set", "pipeline[0].temperature=\udcff"], "--set number 2"),
    (["generate", "x", "--set", "backend=bigram", "--preset", "gr\udce9edy"], "--preset"),
    (["validate", "cfg.yaml", "--set", "sampler.name=\udcc3"], "--set number 1"),
])
def test_other_text_arguments_that_are_not_utf8_are_named(capsys, argv, where):
    """As Python hands them over: undecodable bytes become lone surrogates (surrogateescape)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and f"error: {where} is not valid UTF-8 text (byte 0x" in err


def test_a_file_name_that_is_not_utf8_is_passed_on_as_it_is(capsys, tmp_path):
    """File names need not be UTF-8 on POSIX: they are not refused, only opened."""
    name = os.fsdecode(b"conf\xff.yaml")
    (tmp_path / name).write_text("backend: bigram\n")
    code = main(["validate", str(tmp_path / name)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "conf\\xff.yaml: ok" in out                              # shown, escaped


def _interrupt(proc: subprocess.Popen, after: float) -> tuple[int, str]:
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode("utf-8", "replace")


def test_ctrl_c_during_start_up_exits_130_without_a_traceback():
    """0.3 s in, the command is still importing (torch alone takes longer): the interrupt used to
    print a KeyboardInterrupt traceback from the imports."""
    proc = subprocess.Popen([samplerkit_script(), "generate", "--set", "backend=bigram", "--max-new-tokens",
                             "1000000", "The"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
    code, err = _interrupt(proc, 0.3)
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted" in err


def test_ctrl_c_during_generation_exits_130_without_a_traceback():
    proc = subprocess.Popen([samplerkit_script(), "generate", "--set", "backend=bigram", "--max-new-tokens",
                             "1000000", "The"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
    assert proc.stdout.read(8)                                        # streaming: generation is under way
    proc.send_signal(signal.SIGINT)
    proc.stdout.close()
    err = proc.stderr.read().decode("utf-8", "replace")
    assert proc.wait(timeout=60) == 130, err
    assert "Traceback" not in err and "interrupted" in err


def test_a_single_streamed_prompt_is_not_repeated():
    """docs/cli.md: "One prompt and one sample stream the generated text (the prompt is not
    repeated)"; the command printed the prompt glued to the text."""
    proc = subprocess.run([samplerkit_script(), "generate", "--set", "backend=bigram", "--seed", "1",
                           "--max-new-tokens", "24", "The capital"], capture_output=True, env=environment(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    [completion] = samplerkit.generate(["The capital"], {"backend": "bigram", "sampler": {"name": "categorical", "seed": 1},
                                                         "pipeline": [{"temperature": 0.6}, {"top_p": 0.9}]},
                                       max_new_tokens=24)
    assert completion.text and not completion.text.startswith("The capital")
    assert proc.stdout.decode() == completion.text + "\n"


def test_the_cli_default_pipeline_is_the_one_the_stream_test_reproduces(capsys):
    """Keeps the previous test honest: the CLI's default (no --config) is temperature 0.6 -> top_p 0.9."""
    code = main(["generate", "The capital", "--set", "backend=bigram", "--seed", "1", "--max-new-tokens", "24",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    [completion] = samplerkit.generate(["The capital"], {"backend": "bigram", "sampler": {"name": "categorical", "seed": 1},
                                                         "pipeline": [{"temperature": 0.6}, {"top_p": 0.9}]},
                                       max_new_tokens=24)
    assert json.loads(out)["text"] == completion.text


def test_ctrl_c_while_the_command_line_module_imports_exits_130(monkeypatch, capsys):
    """The console script's entry point (samplerkit._console) catches an interrupt that lands
    while samplerkit.cli itself is still importing (a busy machine), before cli.main could."""
    import sys
    import types

    class StillImporting(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "samplerkit.cli", StillImporting("samplerkit.cli"))
    from samplerkit import _console

    assert _console.main() == 130
    assert capsys.readouterr().err == "\ninterrupted\n"
