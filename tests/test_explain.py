"""`samplerkit explain` and its pictures (samplerkit/plot.py): on the bigram backend, on a
third-party step, and once on the default model."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import samplerkit
from samplerkit.cli import main
from samplerkit.config import read_yaml
from samplerkit.plot import KEPT, REMOVED, label, save, step_figure, steps_figure, token_set

ROOT = Path(__file__).resolve().parents[1]
BIGRAM = str(ROOT / "examples" / "bigram.yaml")          # temperature 0.8 -> min_p 0.05, categorical seed 7


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _generated(prompt, tokens=6):
    """The tokens `samplerkit generate` draws with examples/bigram.yaml (no stop string)."""
    data = {**read_yaml(BIGRAM), "generation": {"max_new_tokens": tokens}}
    [c] = samplerkit.generate([prompt], data)
    return c.token_ids


def test_explain_prints_a_table_per_stage_for_the_first_token(capsys):
    code, out, err = run(capsys, "explain", "The capital", "--config", BIGRAM)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1] == "pipeline: temperature -> min_p => categorical"
    table = lines[lines.index(next(line for line in lines if line.startswith("stage "))):]
    assert [row.split()[0] for row in table[1:]] == ["input", "temperature", "min_p"]
    first = _generated("The capital")[0]
    assert f"step 0: drew {chr(first)!r} (id {first})" in out      # the token `generate` draws, same seed


def test_step_k_explains_the_token_generate_draws_there(capsys):
    tokens = _generated("The capital")
    code, out, _ = run(capsys, "explain", "The capital", "--config", BIGRAM, "--step", "4", "--json")
    assert code == 0
    data = json.loads(out)
    assert [t["id"] for t in data["tokens"]] == tokens[:5]
    [step] = data["steps"]
    assert step["step"] == 4 and step["token"]["id"] == tokens[4]
    assert [s["stage"] for s in step["stages"]] == ["input", "temperature", "min_p"]
    kept = step["stages"][-1]
    assert 1 <= kept["kept"] < step["stages"][0]["kept"] and 0 < kept["mass"] < 1


def test_all_steps_prints_kept_and_entropy_per_step(capsys):
    code, out, _ = run(capsys, "explain", "The capital", "--config", BIGRAM, "--all-steps", "--max-new-tokens", "5")
    assert code == 0
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("step  token")))
    assert lines[header].split() == ["step", "token", "input", "temperature", "min_p"]
    rows = lines[header + 1:]
    assert len(rows) == 5 and [r.split()[0] for r in rows] == ["0", "1", "2", "3", "4"]
    assert all(r.count("H=") == 3 for r in rows)


def test_token_follows_one_token_and_names_the_stage_that_removed_it(capsys):
    # Which byte does min_p remove at the first step? Ask the library, then the command.
    pipe = samplerkit.load_pipeline(BIGRAM)
    from samplerkit.builtins.backends.bigram import BigramBackend

    backend = BigramBackend()
    trace = pipe.trace(backend.prefill([backend.tokenize("The capital")]).last)
    removed = int((trace.removed_at[0] == 2).nonzero()[0])
    kept = int(trace.stage("min_p").top_ids[0, 0])
    code, out, _ = run(capsys, "explain", "The capital", "--config", BIGRAM, "--token", chr(removed))
    assert code == 0
    assert f"token {chr(removed)!r} (id {removed}): p input " in out
    assert out.rstrip().endswith("removed by pipeline[1] min_p, plugin samplerkit.builtins.truncation (built-in)")
    code, out, _ = run(capsys, "explain", "The capital", "--config", BIGRAM, "--token-id", str(kept))
    assert out.rstrip().endswith("kept to the end: it can be drawn")


def test_a_third_party_step_is_explained_like_a_built_in(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("backend: bigram\npipeline:\n  - suppress_tokens: {token_ids: [105]}\n  - top_k: 5\n"
                      "sampler: {name: categorical, seed: 1}\n")
    code, out, err = run(capsys, "explain", "The capital", "--config", str(config), "--token", "i")
    assert code == 0, err
    assert "pipeline: suppress_tokens -> top_k => categorical" in out
    assert "removed by pipeline[0] suppress_tokens, plugin example (samplerkit-example " in out.splitlines()[-1]


@pytest.mark.parametrize("argv,message", [
    (["--token", "ab"], "--token 'ab' is 2 tokens for this model ('a' (id 97), 'b' (id 98)), not one"),
    (["--token-id", "999"], "--token-id 999 is outside the vocabulary [0, 258)"),
    (["--step", "-1"], "--step must be >= 0"),
    (["--plot", "out.pdf"], "unknown picture format '.pdf'; name a file ending in .png, .svg, .html"),
    (["--max-new-tokens", "3"], "--max-new-tokens goes with --all-steps"),
    (["--step", "79"], "the generation ended after"),
    (["--step", "80"], "--step 80 is past generation.max_new_tokens (80): the run draws tokens 0 to 79; choose "
                       "--step 79 or less, or raise it with --set generation.max_new_tokens=81"),
    (["--step", "0", "--set", "generation.max_new_tokens=0"], "--step 0 is past generation.max_new_tokens (0): the run draws no token; raise it"),
    (["--set", "pipeline[0].temperature=-1"], "pipeline[0] temperature"),
    (["--all-steps", "--set", "generation.max_new_tokens=0"], "generation.max_new_tokens is 0"),
])
def test_user_errors_exit_2_with_a_message(capsys, argv, message):
    code, out, err = run(capsys, "explain", "The capital", "--config", BIGRAM, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_without_matplotlib_the_message_names_the_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)          # import fails as if not installed
    code, _, err = run(capsys, "explain", "The capital", "--config", BIGRAM, "--plot", str(tmp_path / "a.png"))
    assert code == 2 and "pip install 'samplerkit[plot]'" in err


# -- the pictures --------------------------------------------------------------------------

def _trace():
    pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": [{"temperature": 0.8}, {"top_k": 4},
                                                                         {"top_p": 0.7}], "sampler": "categorical"})
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5]])
    return pipe.trace(logits)


def test_the_step_figure_has_a_panel_per_stage_labels_and_greyed_removed_bars():
    from matplotlib.colors import to_hex

    trace = _trace()
    text = "abcdefghijkl"
    fig = step_figure(trace, lambda t: text[t], drawn=1)
    axes = fig.axes
    assert [re.split("[: ]", ax.get_title(loc="left"))[0] for ax in axes] == ["input", "temperature", "top_k", "top_p"]
    assert "kept 4," in axes[2].get_title(loc="left")
    ids = token_set(trace, tokens=10)
    assert ids == list(range(10))
    assert [t.get_text() for t in axes[-1].get_xticklabels()] == [label(text[t]) for t in ids]
    for i, ax in enumerate(axes):
        bars = ax.patches
        assert len(bars) == len(ids)
        for t, bar in zip(ids, bars):
            removed = 0 <= int(trace.removed_at[0, t]) <= i
            assert to_hex(bar.get_facecolor()) == (REMOVED if removed else KEPT)
            if not removed:
                assert bar.get_height() == pytest.approx(float(trace.stages[i].probs()[0, t]))
    # A removed bar keeps the height it had just before its removal (token 6: removed by top_k).
    assert axes[3].patches[6].get_height() == pytest.approx(float(trace.stage("temperature").probs()[0, 6]))
    assert axes[0].patches[1].get_linewidth() == 2.0 and axes[0].patches[0].get_linewidth() == 0


def test_the_steps_figure_has_a_line_per_stage_along_the_tokens():
    traces = [_trace(), _trace()]
    fig = steps_figure(traces, ["x", " y"])
    kept, entropy = fig.axes
    assert [line.get_label() for line in kept.get_lines()] == traces[0].names
    assert list(kept.get_lines()[2].get_ydata()) == [4, 4]
    assert [t.get_text() for t in entropy.get_xticklabels()] == ["'x'", "' y'"]
    assert kept.get_yscale() == "log"


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".html", b"<!DOCTYPE html>")])
def test_save_writes_each_format(tmp_path, suffix, magic):
    path = save(step_figure(_trace(), str), tmp_path / f"a{suffix}")
    data = path.read_bytes()
    assert data.startswith(magic)
    if suffix == ".html":
        assert b"<svg" in data and b"<?xml" not in data


# -- the default model ----------------------------------------------------------------------

@pytest.mark.slow
def test_explain_on_the_default_model(capsys, tmp_path):
    picture = tmp_path / "step.svg"
    code, out, err = run(capsys, "explain", "The capital of France is", "--config", str(ROOT / "examples" / "seed.yaml"),
                         "--token", " London", "--json", "--plot", str(picture))
    assert code == 0, err
    data = json.loads(out)
    [step] = data["steps"]
    assert [s["stage"] for s in step["stages"]] == ["input", "temperature", "top_p"]
    assert step["stages"][0]["kept"] == 49152
    assert step["stages"][0]["top"][0]["text"] == step["token"]["text"] == " Paris"
    assert step["follow"]["removed_by"]["location"] == "pipeline[1] top_p"
    svg = picture.read_text()
    assert "input: kept 49152" in svg and "top_p (pipeline[1] top_p)" in svg


# -- the docs show real output ---------------------------------------------------------------

def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("index", [0, 1])
def test_the_library_examples_in_docs_explain_print_what_they_say(index, capsys):
    block = _blocks(ROOT / "docs" / "explain.md", "python")[index]
    code = "\n".join(line for line in block.splitlines() if not line.startswith("# "))
    expected = [line[2:] for line in block.splitlines() if line.startswith("# ")]
    exec(compile(code, f"docs/explain.md python block {index}", "exec"), {})
    assert capsys.readouterr().out.splitlines() == expected


@pytest.mark.parametrize("command", ["--token o", "--all-steps --max-new-tokens 5", "--token ab", "--step 80"])
def test_the_explain_examples_in_docs_cli_are_real(command, capsys):
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    prompt = f'$ samplerkit explain --config examples/bigram.yaml "The capital" {command}\n'
    block = next(b for b in _blocks(ROOT / "docs" / "cli.md", "") if b.startswith(prompt))
    assert prompt in text
    code, out, err = run(capsys, "explain", "--config", BIGRAM, "The capital", *command.split())
    assert (out + err) == block[len(prompt):]


def test_the_picture_in_docs_is_small_and_shows_every_stage():
    svg = (ROOT / "docs" / "explain-step.svg").read_text(encoding="utf-8")
    assert len(svg.encode()) < 60_000
    for title in ("input: kept 49152", "temperature (pipeline[0] temperature)", "top_k (pipeline[1] top_k): kept 50",
                  "top_p (pipeline[2] top_p): kept 32", "min_p (pipeline[3] min_p): kept 4"):
        assert title in svg
    script = (ROOT / "docs" / "explain-step.sh").read_text(encoding="utf-8")
    assert "--plot docs/explain-step.svg" in script and "examples/transformers_order.yaml" in script


def test_a_sample_count_is_not_silently_ignored(capsys):
    code, out, err = run(capsys, "explain", "The capital", "--config", BIGRAM, "--set", "generation.n=3")
    assert code == 0 and "note: generation.n is 3; explain traces one sample" in err


def test_an_unseeded_config_gets_a_printed_seed_that_reproduces_the_run(capsys):
    code, out, _ = run(capsys, "explain", "The capital", "--config", BIGRAM, "--set", "sampler.seed=null",
                       "--all-steps", "--max-new-tokens", "8")
    assert code == 0
    seed = re.search(r"^seed: (\d+) \(the config has none; pass --seed \1 to draw the same tokens\)$", out, re.M)
    assert seed
    generated = next(line for line in out.splitlines() if line.startswith("generated: "))
    code, again, _ = run(capsys, "explain", "The capital", "--config", BIGRAM, "--seed", seed.group(1),
                         "--all-steps", "--max-new-tokens", "8")
    assert generated in again.splitlines() and "seed: " not in again
