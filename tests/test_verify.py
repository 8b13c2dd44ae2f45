"""`samplerkit verify` / samplerkit.testing.verify: a pipeline draws the distribution it claims.

Correct pipelines (built-ins, the example plugin, a random processor) pass; a sampler drawing
softmax(2x) while claiming softmax(x), a draw outside the kept set and a step whose apply()
disagrees with its reference() fail, with the case, p-value and reason."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import Field

import samplerkit
from samplerkit import Processor, StepParams
from samplerkit.builtins.samplers.categorical import Categorical
from samplerkit.cli import main
from samplerkit.context import StepContext
from samplerkit.pipeline import Pipeline
from samplerkit.seeded import SeededSampler
from samplerkit.testing import temporary_plugin, verify
from samplerkit.testing.verification import DRAWS, LogitsCase, synthetic_cases

CASES = {c.name: c for c in synthetic_cases()}


def cases(*names):
    return [CASES[n] for n in names]


class DrawsSharper(SeededSampler):
    """Third-party and wrong: claims softmax(x) (no distribution()) but draws softmax(2x)."""

    name = "draws_sharper"

    def sample(self, logits, ctx):
        return self.streams.race(logits * 2.0, ctx)


class IgnoresTheCut(SeededSampler):
    """Wrong: draws from the raw logits' top two even when a truncation removed one of them."""

    name = "ignores_the_cut"

    def sample(self, logits, ctx):
        finite = torch.isfinite(logits)
        out = self.streams.race(logits, ctx)
        # 1 draw in 8: the lowest-id removed token, if any.
        removed = (~finite).to(torch.int64).argmax(-1)
        coin = torch.arange(logits.shape[0]) % 8 == 0
        return torch.where(coin & ~finite.all(-1), removed, out)


class _HalveParams(StepParams):
    on: bool = Field(False, description="halve every logit")


class HalvesWithWrongReference(Processor):
    """apply() halves the logits; its reference() claims temperature 1/3 instead."""

    name = "halves"
    Params = _HalveParams

    def apply(self, logits, ctx):
        return logits.mul_(torch.where(self.active, 0.5, 1.0).unsqueeze(-1))

    def reference(self, logits, ctx):
        return logits * torch.where(self.active, 3.0, 1.0).unsqueeze(-1)


def _doc_run(page: str, command: str) -> tuple[str, str]:
    """(the YAML file, the output) that docs/PAGE shows for ``$ COMMAND``."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text(encoding="utf-8")
    name = command.split()[2]
    yaml = re.search(rf"```yaml\n# {re.escape(name)}\n(.*?)```", (Path(__file__).resolve().parents[1] / "docs" /
                                                                   "verify.md").read_text(encoding="utf-8"), re.S)
    out = re.search(rf"\$ {re.escape(command)}\n(.*?)```", text, re.S)
    assert yaml and out, f"docs/{page} shows no {command!r}"
    return yaml.group(1), out.group(1)


@pytest.mark.parametrize("page", ["verify.md", "cli.md"])
def test_docs_show_a_real_run_of_a_four_step_builtin_pipeline(capsys, tmp_path, monkeypatch, page):
    command = "samplerkit verify four.yaml --no-model --case ties"
    yaml, expected = _doc_run(page, command)
    if page == "cli.md":                   # the same run as verify.md's: checked there
        assert expected == _doc_run("verify.md", command)[1]
        return
    (tmp_path / "four.yaml").write_text(yaml)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *command.split()[1:])
    assert code == 0, err
    assert out == expected
    assert f"{DRAWS + 1:,}" in out           # 50,000 rounded up to 7 equal batches


def test_docs_wrong_sampler_example_is_real(capsys):
    """docs/verify.md's third-party sampler drawing softmax(2x) while claiming softmax(x): the
    snippet runs and prints exactly what the page shows (two FAIL cases, flat passes)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "verify.md").read_text(encoding="utf-8")
    section = text.split("## A sampler that draws another distribution than it claims")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shown = re.search(r"```\n(pipeline: .*?)```", section, re.S).group(1)
    exec(compile(code, "docs/verify.md", "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert out == shown
    assert "peaked: the draws do not follow the claimed distribution" in out and out.rstrip().endswith("False")


def test_verify_hard_checks_the_kept_set():
    with temporary_plugin(IgnoresTheCut) as registry:
        pipe = samplerkit.load_pipeline({"pipeline": [{"top_k": 3}], "sampler": "ignores_the_cut"}, registry=registry)
    result = verify(pipe, cases("peaked"), draws=4000).results[0]
    # The pipeline's own output check refuses such a draw; verify reports it as the case's failure.
    assert not result.passed
    assert "chose tokens the processed logits removed" in result.failures[0]


def test_verify_checks_apply_against_a_declared_reference():
    pipe = Pipeline([HalvesWithWrongReference.spec(on=True)], sampler=Categorical.spec(seed=0))
    result = verify(pipe, cases("peaked"), draws=2000).results[0]
    assert any("pipeline[0] halves: apply() vs its reference(): values differ" in f for f in result.failures)


@pytest.mark.parametrize("name", ["top_k", "top_p", "min_p", "temperature"])
def test_builtin_references_agree_with_apply(name):
    """The built-ins' reference() are what verify trusts: they agree with apply() on the corpus
    and on the contract's adversarial rows, and they are not apply() in disguise (a wrong apply
    would be caught: checked by perturbing the parameter)."""
    from samplerkit.registry import default_registry
    from samplerkit.testing.contract import _logit_cases

    cls = default_registry().entry("processor", name).cls
    values = {"top_k": [1, 3, 40], "top_p": [0.3, 0.9], "min_p": [0.05, 0.5], "temperature": [0.0, 0.7, 2.0]}[name]
    rows = [c.logits[:64] for c in synthetic_cases()] + list(_logit_cases(64, 0))
    x = torch.stack(rows)
    for v in values:
        step = cls([cls.Params(**{name: v})] * x.shape[0])
        ref = step.reference(x.clone(), StepContext(x.shape[0], 64))
        out = step.apply(x.clone(), StepContext(x.shape[0], 64))
        assert torch.equal(torch.isfinite(ref), torch.isfinite(out)), (name, v)
        torch.testing.assert_close(ref[torch.isfinite(ref)], out[torch.isfinite(out)], rtol=1e-5, atol=1e-5)


def test_verify_passes_the_example_plugin_and_a_random_processor():
    # The example plugin is installed (entry point), as a user's plugin would be.
    pipe = samplerkit.load_pipeline({"pipeline": [{"suppress_tokens": {"token_ids": [0, 5, 17]}}, {"top_k": 20}],
                                     "sampler": "categorical"})
    report = verify(pipe, cases("ties"), draws=10_000)
    assert report.passed, report
    # xtc flips a coin per row: the expected counts mix both outcomes, and the test still passes.
    xtc = samplerkit.load_pipeline({"pipeline": [{"xtc": {"threshold": 0.05, "probability": 0.5}}]})
    report = verify(xtc, cases("peaked"), draws=10_000)
    assert report.passed, report


def test_categorical_never_draws_a_removed_token_at_the_top_uniform():
    """Regression (found by verify): the 24-bit uniform 2^24 - 0.5 rounded to 1.0 in float32, its
    Gumbel noise was +inf, and a removed token's -inf + inf = NaN won the argmax. Seed 47093 at
    step 0 gives token 61 that uniform."""
    x = torch.zeros(1, 64)
    x[0, 61] = float("-inf")
    assert int(Categorical([Categorical.Params(seed=47093)]).sample(x, StepContext(1))) != 61


# -- the command line ---------------------------------------------------------------------------------

def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_verify_passes_and_reports_per_case(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("pipeline:\n  - top_k: 40\n  - temperature: 0.8\nsampler: greedy\n")
    code, out, err = run(capsys, "verify", str(path), "--no-model")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "pipeline: top_k(top_k=40) -> temperature(temperature=0.8) => greedy()"
    assert lines[2].split() == ["case", "vocab", "kept", "draws", "p-value", "verdict"]
    assert [line.split()[-1] for line in lines[3:8]] == ["pass"] * 5
    assert lines[-1] == "5 of 5 cases pass"
    code, out, _ = run(capsys, "verify", str(path), "--no-model", "--json")
    data = json.loads(out)
    assert data["passed"] and len(data["cases"]) == 5 and data["cases"][0]["verdict"] == "pass"


def test_cli_verify_exits_1_on_a_failing_pipeline(capsys, tmp_path, monkeypatch):
    # The built-in categorical made wrong (softmax(2x)), its fast paths declined.
    monkeypatch.setattr(Categorical, "sample", lambda self, logits, ctx: self.streams.race(logits * 2.0, ctx))
    monkeypatch.setattr(Categorical, "sample_candidates", lambda self, *a: None)
    monkeypatch.setattr(Categorical, "sample_cut", lambda self, *a: None)
    path = tmp_path / "run.yaml"
    path.write_text("pipeline: []\nsampler: categorical\n")
    code, out, _ = run(capsys, "verify", str(path), "--no-model", "--draws", "3000", "--case", "ties")
    assert code == 1
    assert out.splitlines()[3].split() == ["ties", "64", "64", "3,000", out.splitlines()[3].split()[4], "FAIL"]
    assert "ties: the draws do not follow the claimed distribution: chi-square" in out
    assert out.splitlines()[-1] == "0 of 1 cases pass; 1 FAIL"


def test_cli_verify_user_errors(capsys, tmp_path):
    assert run(capsys, "verify")[0] == 2
    path = tmp_path / "run.yaml"
    path.write_text("pipeline: []\n")
    code, _, err = run(capsys, "verify", str(path), "--draws", "0")
    assert code == 2 and "--draws must be at least 1, got 0" in err
    code, _, err = run(capsys, "verify", str(path), "--no-model", "--case", "tie")
    assert code == 2 and "--case 'tie': no such case; did you mean 'ties'?" in err


@pytest.mark.slow
def test_verify_on_the_default_models_logits():
    """The model's logits (computed once, then cached) and docs/verify.md's line for the open
    prompt, reproduced."""
    from pathlib import Path

    from samplerkit.testing.verification import model_cases

    first = model_cases()
    assert [c.logits.shape[0] for c in first] == [49152, 49152]
    again = model_cases()                  # from the cache this time
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(first, again))
    pipe = samplerkit.load_pipeline({"pipeline": [{"temperature": 0.7}, {"top_k": 50}, {"top_p": 0.9},
                                                  {"min_p": 0.05}], "sampler": {"name": "categorical", "seed": 1}})
    report = verify(pipe, first[1:])
    assert report.passed, report
    line = str(report).splitlines()[3].split()
    text = (Path(__file__).resolve().parents[1] / "docs" / "verify.md").read_text(encoding="utf-8")
    shown = next(row for row in text.splitlines() if row.startswith("model: 'Once upon a time")).split()
    assert line[-5:] == shown[-5:]


def test_cases_are_a_list_of_logits_cases():
    assert {c.name for c in synthetic_cases()} == {"peaked", "flat", "ties", "-inf holes", "large vocab"}
    assert all(isinstance(c, LogitsCase) and c.logits.dtype == torch.float32 for c in synthetic_cases())
