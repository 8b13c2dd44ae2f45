"""`samplerkit compare` and samplerkit.compare: two configs, common random numbers.

Fast tests run on the built-in bigram backend (no model files); the default-model tests are
marked slow and load the model once for the module."""

from __future__ import annotations

import json

import pytest
import torch

from samplerkit import cli
from samplerkit.builtins.backends.bigram import BigramBackend
from samplerkit.compare import compare, format_comparison, plot, race_coupling, total_variation
from samplerkit.errors import SamplerkitError
from samplerkit.pipeline import Pipeline
from samplerkit.plugins import PluginInfo
from samplerkit.registry import Entry, Registry, default_registry
from samplerkit.seeded import SeededSampler

REGISTRY = default_registry()
PROMPTS = ["The ", "A bird"]


def config(pipeline, sampler="categorical", backend="bigram", **generation):
    return {"backend": backend, "pipeline": list(pipeline), "sampler": sampler,
            "generation": {"max_new_tokens": 20, **generation}}


BASE = [{"temperature": 0.8}, {"top_k": 10}]


@pytest.fixture(scope="module")
def bigram():
    return BigramBackend()


def run(a, b, backend, **kw):
    return compare(config(a), config(b), PROMPTS, backend=backend, registry=REGISTRY, **kw)


# -- common random numbers ------------------------------------------------------------------

@pytest.mark.parametrize("extra", [[{"temperature": 1.0}, {"top_p": 1.0}], [{"min_p": 0.0}, {"top_k": 0}],
                                   [{"suppress_tokens": {"token_ids": [10**6]}}]],
                         ids=["neutral-builtins", "neutral-truncations", "plugin-changes-nothing"])
def test_a_neutral_extra_step_changes_no_draw(bigram, extra):
    # suppress_tokens with an id outside the vocabulary is an *active* plain processor that
    # changes nothing: the pipeline takes the dense path instead of the fused one, and the
    # race still draws the same tokens (noise per token id, not per position in a list).
    result = run(BASE, [*BASE, *extra], bigram, seeds=[3, 4])
    for row in result.rows:
        assert row.tokens_a == row.tokens_b and len(row.tokens_a) == 20
        assert row.first_divergence is None and row.agreement == 1.0
        assert all(s.tv < 1e-9 and s.draw_a == s.draw_b == s.token for s in row.steps)
        assert row.seed in (3, 4)
    assert result.same_draw == 1.0 and result.mean_tv < 1e-9


@pytest.mark.parametrize("b_steps", [[{"temperature": 0.8}, {"top_k": 3}],
                                     [{"repetition_penalty": 3.0}, *BASE]], ids=["top_k", "uses-history"])
def test_different_configs_report_divergence_tv_and_draws(bigram, b_steps):
    # With a penalty, B's forced draws equal its real tokens before the divergence only if the
    # forced pass gives B the same history (A's tokens = B's tokens there) as its own run.
    result = run(BASE, b_steps, bigram, seeds=[1, 2])
    assert result.mean_tv > 0.05
    for row in result.rows:
        d = row.first_divergence
        assert d is not None and row.tokens_a[:d] == row.tokens_b[:d] and row.tokens_a[d] != row.tokens_b[d]
        assert row.agreement == sum(x == y for x, y in zip(row.tokens_a, row.tokens_b)) / 20
        assert row.replayed == 1.0                 # A's forced draws are A's own tokens
        # On the shared prefix, B's forced draws are B's real tokens (same prefix, same noise),
        # and the first divergence is the first step where B draws another token.
        assert [s.draw_b for s in row.steps[:d + 1]] == row.tokens_b[:d + 1]
        assert all(s.draw_a == s.draw_b for s in row.steps[:d]) and row.steps[d].draw_a != row.steps[d].draw_b
        assert all(s.kept_a == 10 and s.kept_b == b_steps[-1].get("top_k", 10) for s in row.steps)


def test_tv_is_that_of_the_two_processed_distributions_on_a_prefix(bigram):
    # The bigram model's logits after a prefix are table[last token]: recompute both
    # distributions independently of compare and check TV_t at every step.
    a_steps = [{"temperature": 0.8}, {"min_p": 0.2}]
    b_steps = [{"temperature": 1.2}, {"min_p": 0.05}]
    result = compare(config(a_steps), config(b_steps), ["The "], backend=bigram, registry=REGISTRY)
    row = result.rows[0]
    previous = [ord(" "), *row.tokens_a]

    def dist(logits, temperature, min_p):
        p = torch.softmax(logits.double() / temperature, -1)
        p = torch.where(p >= min_p * p.max(), p, 0.0)
        return p / p.sum()

    for step, last in zip(row.steps, previous):
        logits = bigram.table[last]
        expected = total_variation(dist(logits, 0.8, 0.2), dist(logits, 1.2, 0.05))
        assert step.tv == pytest.approx(expected, abs=1e-5)


def test_greedy_is_a_point_mass(bigram):
    result = compare(config([]), config([], sampler="greedy"), ["The "], backend=bigram, registry=REGISTRY)
    for step in result.rows[0].steps:
        p = torch.softmax(bigram.table[ord(" ") if step.position == 0 else result.rows[0].tokens_a[step.position - 1]]
                          .double(), -1)
        assert step.kept_b == 1
        assert step.tv == pytest.approx(1 - float(p[step.draw_b]), abs=1e-6)


def test_seeds_are_shared_and_explicit(bigram):
    a = config(BASE, sampler={"name": "categorical", "seed": 7})
    b = config(BASE, sampler={"name": "categorical", "seed": 9})
    result = compare(a, b, PROMPTS, backend=bigram, registry=REGISTRY)
    assert [r.seed for r in result.rows] == [7, 7]
    assert result.notes and "both runs use 7" in result.notes[0]
    assert all(r.first_divergence is None for r in result.rows)      # same config, same seed: same text
    unseeded = run(BASE, BASE, bigram)
    assert [r.seed for r in unseeded.rows] == [0, 1]
    with pytest.raises(SamplerkitError, match="seed for every prompt"):
        run(BASE, BASE, bigram, seeds=[1, None])


def test_n_samples_and_mismatched_n(bigram):
    result = run(BASE, [*BASE, {"top_p": 1.0}], bigram, n=2, max_new_tokens=6)
    assert [(r.prompt_index, r.sample_index) for r in result.rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r.first_divergence is None for r in result.rows)
    assert result.rows[0].tokens_a != result.rows[1].tokens_a        # the samples of a prompt differ
    with pytest.raises(SamplerkitError, match="generation.n"):
        compare(config(BASE, n=2), config(BASE), PROMPTS, backend=bigram, registry=REGISTRY)


def test_stop_token_is_a_compared_position(bigram):
    # A row that ends on EOS drew that token too: it is the last forced step.
    result = run([{"temperature": 1.0}], [{"temperature": 1.0}, {"top_k": 50}], bigram, seeds=[5, 6],
                 max_new_tokens=400)
    stopped = [r for r in result.rows if r.finish_a == "stop"]
    assert stopped, "the bigram model should end some text within 400 tokens"
    for row in stopped:
        assert len(row.steps) == len(row.tokens_a) + 1
        assert row.steps[-1].token in bigram.eos_token_ids and row.replayed == 1.0


class _SharpSampler(SeededSampler):
    """A deliberately wrong sampler: claims to draw softmax(x) (it records nothing) but races
    on 2x, i.e. draws softmax(2x)."""

    name = "sharp_categorical"

    def sample(self, logits, ctx):
        return self.streams.race(2 * logits, ctx)


def _with_sharp_sampler():
    entries = [e for kind in ("processor", "sampler", "backend") for e in REGISTRY.entries(kind)]
    return Registry([*entries, Entry("sampler", "sharp_categorical", _SharpSampler, PluginInfo("test-wrong-sampler"))])


def test_same_distribution_different_draw_flags_a_wrong_sampler(bigram):
    registry = _with_sharp_sampler()
    result = compare(config(BASE), config(BASE, sampler="sharp_categorical"), PROMPTS, seeds=[1, 2],
                     backend=bigram, registry=registry)
    flagged = [p for row in result.rows for p in row.uncoupled]
    assert result.mean_tv < 1e-9 and flagged          # the same claimed distribution, other draws
    assert "warning: same distribution, different draw" in format_comparison(result)
    honest = compare(config(BASE), config(BASE, sampler={"name": "categorical"}), PROMPTS, seeds=[1, 2],
                     backend=bigram, registry=registry)
    assert all(not row.uncoupled for row in honest.rows)
    assert "warning" not in format_comparison(honest)


# -- how strongly the race couples draws ------------------------------------------------------

@pytest.mark.parametrize("vocab", [200, 700], ids=["one-race", "two-stage-race"])
def test_race_coupling_closed_form_matches_the_samplers_draws(vocab):
    torch.manual_seed(0)
    logits = torch.randn(1, vocab) * 2.0
    pa = Pipeline([REGISTRY.get("processor", "top_k").spec(top_k=40)], REGISTRY.get("sampler", "categorical").spec())
    pb = Pipeline([REGISTRY.get("processor", "temperature").spec(temperature=1.3), REGISTRY.get("processor", "min_p").spec(min_p=0.05)],
                  REGISTRY.get("sampler", "categorical").spec())
    draws = 12000
    seeds = list(range(draws))
    x = logits.expand(draws, vocab)
    same = float((pa.sample(x, seeds) == pb.sample(x, seeds)).double().mean())
    p = torch.softmax(pa.process(logits)[0].double(), -1)
    q = torch.softmax(pb.process(logits)[0].double(), -1)
    tv = total_variation(p, q)
    exact = race_coupling(p, q, block=256)
    assert 0.1 < tv < 0.9
    assert same == pytest.approx(exact, abs=4.5 * (0.25 / draws) ** 0.5)
    assert same <= 1 - tv + 0.01                   # never better than the maximal coupling
    if vocab <= 256:
        assert (1 - tv) / (1 + tv) <= exact <= 1 - tv


def test_the_race_never_draws_a_removed_token_whose_noise_is_the_largest():
    # Found by benchmarks/compare_coupling.py: for seed 1610 at counter 0, token 2837's 24-bit
    # uniform is the largest, (2^24 - 1/2) 2^-24, which float32 rounds to 1.0: its Gumbel noise was
    # +inf, -inf + inf = NaN, and argmax picked that removed token (~1 draw in 60,000 on a
    # 256-token block). samplerkit.ops.random clamps the uniform below 1.
    from samplerkit.ops.random import gumbel_noise, row_keys

    assert torch.isfinite(gumbel_noise(row_keys(torch.tensor([1610]), torch.tensor([0])), torch.tensor([2837]))).all()
    x = torch.full((1, 49152), float("-inf"))
    x[0, 2837] = 0.0                                   # the block race must pick token 284's block
    x[0, [260, 284]] = torch.tensor([14.4, 16.6])
    top_p = Pipeline([REGISTRY.get("processor", "top_p").spec(top_p=0.6)], REGISTRY.get("sampler", "categorical").spec())
    assert int(top_p.sample(x, [1610])[0]) in (260, 284)


def test_race_coupling_edge_cases():
    p = torch.tensor([0.5, 0.5, 0.0])
    assert race_coupling(p, p) == pytest.approx(1.0)
    assert race_coupling(p, torch.tensor([0.0, 0.0, 1.0])) == 0.0
    # One race: the probability that both pick each token sums over the common support.
    q = torch.tensor([0.25, 0.75, 0.0])
    expected = 1 / (1 + max(0.5 / 0.5, 0.75 / 0.25)) + 1 / (1 + max(0.5 / 0.5, 0.25 / 0.75))
    assert race_coupling(p, q) == pytest.approx(expected)


# -- the command line -----------------------------------------------------------------------

@pytest.fixture
def yaml_files(tmp_path):
    def write(name, pipeline, sampler="categorical", **generation):
        path = tmp_path / name                 # JSON is YAML
        path.write_text(json.dumps(config(pipeline, sampler, max_new_tokens=12, **generation)))
        return str(path)
    return write


def test_cli_json_and_text(yaml_files, capsys):
    a = yaml_files("a.yaml", BASE)
    b = yaml_files("b.yaml", [{"temperature": 0.8}, {"top_k": 3}])
    assert cli.main(["compare", a, b, "The ", "A bird", "--seed", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["seed"] for r in out["rows"]] == [5, 5] and len(out["rows"][0]["steps"]) == 12
    assert {"first_divergence", "agreement", "mean_tv", "same_draw", "tokens_a", "tokens_b"} <= set(out["rows"][0])
    assert cli.main(["compare", a, b, "The ", "--steps", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert "first divergence at token" in text and "kept A" in text and text.count("\n     ") >= 5
    assert "B draws A's token at" in text and "overall: mean TV" in text


def test_cli_takes_a_preset_and_marks_differing_draws(yaml_files, tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    preset.write_text("preset: min_p\nbackend: bigram\ngeneration: {max_new_tokens: 12}\n")
    same = yaml_files("same.yaml", [{"temperature": 1.0}, {"min_p": 0.1}])
    assert cli.main(["compare", str(preset), same, "The ", "--steps"]) == 0
    text = capsys.readouterr().out
    assert "identical tokens" in text and "min_p(min_p=0.1)" in text and "  *" not in text
    other = yaml_files("other.yaml", [{"temperature": 1.0}, {"top_k": 2}])
    assert cli.main(["compare", str(preset), other, "The ", "--steps", "--seed", "1", "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)["rows"][0]["steps"]
    differ = sum(s["draw_a"] != s["draw_b"] for s in steps)
    assert cli.main(["compare", str(preset), other, "The ", "--steps", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert differ > 0 and sum(line.endswith("  *") for line in text.splitlines()) == differ


def test_cli_usage_errors_exit_2(yaml_files, tmp_path, capsys):
    a = yaml_files("a.yaml", BASE)
    b = yaml_files("b.yaml", BASE, n=2)
    assert cli.main(["compare", a, str(tmp_path / "missing.yaml"), "x"]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert cli.main(["compare", a, b, "x"]) == 2
    assert "generation.n" in capsys.readouterr().err
    assert cli.main(["compare", a, a, "x", "--plot", str(tmp_path / "out.gif")]) == 2
    err = capsys.readouterr().err
    assert ".png" in err and "Traceback" not in err


def test_cli_model_and_missing_matplotlib_are_usage_errors(yaml_files, tmp_path, capsys, monkeypatch):
    llama = tmp_path / "llama.yaml"
    llama.write_text("pipeline: [{top_k: 5}]\nsampler: categorical\n")
    missing = str(tmp_path / "nope.gguf")
    assert cli.main(["compare", str(llama), str(llama), "x", "--model", missing]) == 2
    assert missing in capsys.readouterr().err                   # --model reached both configs' backend
    a = yaml_files("a.yaml", BASE)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)    # import matplotlib fails
    assert cli.main(["compare", a, a, "x", "--max-new-tokens", "2", "--plot", str(tmp_path / "tv.png")]) == 2
    err = capsys.readouterr().err
    assert "samplerkit[plot]" in err and "Traceback" not in err


def test_plot_has_a_panel_per_row_and_a_bar_per_step(bigram, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra (samplerkit[plot]) is not installed")
    result = run(BASE, [{"temperature": 0.8}, {"top_k": 3}], bigram, seeds=[1, 2])
    out = tmp_path / "tv.png"
    fig = plot(result, out)
    assert out.stat().st_size > 10_000
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax, row in zip(axes, result.rows):
        bars = ax.patches
        assert len(bars) == len(row.steps)
        assert [round(b.get_height(), 6) for b in bars] == [round(s.tv, 6) for s in row.steps]
        red = [b for b in bars if b.get_facecolor()[0] > 0.8 and b.get_facecolor()[2] < 0.3]
        assert len(red) == sum(s.draw_a != s.draw_b for s in row.steps)
        assert f"prompt {row.prompt_index}" in ax.get_title() and ax.get_ylabel() == "TV(A, B)"
        assert [t.get_text() for t in ax.get_xticklabels()][:3] == [repr(s.text)[1:-1] for s in row.steps[:3]]
        assert any(line.get_linestyle() == "--" for line in ax.get_lines())        # the first divergence
    assert "top_k(top_k=3)" in fig._suptitle.get_text()


def test_format_mentions_replay_only_when_it_failed(bigram):
    result = run(BASE, BASE, bigram, seeds=[1, 2])
    text = format_comparison(result)
    assert "identical tokens" in text and "replay" not in text
    result.rows[0].steps[0].draw_a = -1
    assert "replay matched" in format_comparison(result)


# -- the default model (slow) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    from samplerkit.builtins.backends.llama import LlamaBackend

    return LlamaBackend()


@pytest.mark.slow
def test_default_model_neutral_steps_change_no_draw(llama):
    a = {"pipeline": [{"temperature": 0.8}, {"top_p": 0.9}], "sampler": "categorical",
         "generation": {"max_new_tokens": 8}}
    b = {"pipeline": [{"suppress_tokens": {"token_ids": [10**7]}}, {"temperature": 0.8}, {"temperature": 1.0},
                      {"top_p": 0.9}, {"top_p": 1.0}, {"min_p": 0.0}], "sampler": "categorical",
         "generation": {"max_new_tokens": 8}}
    result = compare(a, b, ["The capital of France is", "Once upon a time"], seeds=[11, 12], backend=llama)
    for row in result.rows:
        assert row.first_divergence is None and row.tokens_a == row.tokens_b and len(row.tokens_a) >= 5
        assert row.replayed == 1.0
        assert all(s.tv < 1e-6 and s.draw_a == s.draw_b for s in row.steps)


def test_the_python_example_in_docs_compare_prints_what_the_page_shows(capsys):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "compare.md").read_text()
    code, shown = re.search(r"## From Python.*?```python\n(.*?)```\n\n```\n(.*?)```", page, flags=re.S).groups()
    exec(compile(code, "docs/compare.md", "exec"), {})
    assert capsys.readouterr().out == shown


def test_a_shared_backend_is_replayed_once(monkeypatch):
    backend = BigramBackend()
    prefills = []
    original = backend.prefill
    monkeypatch.setattr(backend, "prefill", lambda *a, **k: prefills.append(1) or original(*a, **k))
    run(BASE, [{"top_k": 3}], backend, max_new_tokens=4)
    assert len(prefills) == 3                  # A's run, B's run, one replay along A for both
