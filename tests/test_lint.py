"""`samplerkit lint` (samplerkit/lint.py): each rule fires on a pipeline that has the problem and
stays quiet on a close one that does not; plugin steps take part through what they declare."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import Field

import samplerkit
from samplerkit import Processor, StepParams
from samplerkit.builtins.penalties.allowed_tokens import AllowedTokens
from samplerkit.builtins.penalties.repetition_penalty import RepetitionPenalty
from samplerkit.builtins.samplers.categorical import Categorical
from samplerkit.builtins.samplers.greedy import Greedy
from samplerkit.builtins.shaping.temperature import Temperature
from samplerkit.builtins.truncation.min_p import MinP
from samplerkit.builtins.truncation.top_k import TopK
from samplerkit.builtins.truncation.top_n_sigma import TopNSigma
from samplerkit.builtins.truncation.top_p import TopP
from samplerkit.builtins.truncation.xtc import Xtc
from samplerkit.cli import main
from samplerkit.config import GenerationConfig
from samplerkit.lint import RULES, lint_config, lint_pipeline, load_config
from samplerkit.testing import check_processor, temporary_plugin


def rules(processors, sampler=None, **kwargs) -> list[tuple[str, str]]:
    """(rule, location) of every warning."""
    found = lint_pipeline(processors, sampler or Categorical.spec(), **kwargs)
    return [(w.rule, w.location) for w in found]


def fired(rule, processors, sampler=None, **kwargs) -> list[str]:
    return [where for r, where in rules(processors, sampler, **kwargs) if r == rule]


# -- each rule: fires / does not fire ---------------------------------------------------------------

def test_neutral_step():
    assert fired("neutral", [TopP.spec(top_p=1.0), Temperature.spec(temperature=0.7)]) == ["pipeline[0] top_p"]
    assert fired("neutral", [TopP.spec(top_p=0.9), Temperature.spec(temperature=0.7)]) == []


def test_repeated_step():
    assert fired("repeated", [RepetitionPenalty.spec(repetition_penalty=1.2), TopP.spec(top_p=0.9),
                              RepetitionPenalty.spec(repetition_penalty=1.1)]) == ["pipeline[2] repetition_penalty"]
    assert fired("repeated", [RepetitionPenalty.spec(repetition_penalty=1.2), TopP.spec(top_p=0.9)]) == []


def test_no_effect_top_k_50_after_top_k_10():
    assert fired("no-effect", [TopK.spec(top_k=10), TopK.spec(top_k=50)]) == ["pipeline[1] top_k"]
    assert fired("no-effect", [TopK.spec(top_k=50), TopK.spec(top_k=10)]) == []


def test_no_effect_top_p_after_top_k_1_and_after_temperature_0():
    assert fired("no-effect", [TopK.spec(top_k=1), TopP.spec(top_p=0.9)]) == ["pipeline[1] top_p"]
    assert fired("no-effect", [Temperature.spec(temperature=0.0), MinP.spec(min_p=0.1)]) == ["pipeline[1] min_p"]
    assert fired("no-effect", [TopK.spec(top_k=2), TopP.spec(top_p=0.9)]) == []


def test_ignored_by_greedy():
    assert fired("ignored-by-greedy", [TopP.spec(top_p=0.9)], Greedy.spec()) == ["pipeline[0] top_p"]
    assert fired("ignored-by-greedy", [TopP.spec(top_p=0.9)], Categorical.spec()) == []
    # A step that can move the argmax is not ignored.
    assert fired("ignored-by-greedy", [RepetitionPenalty.spec(repetition_penalty=1.3)], Greedy.spec()) == []


def test_randomness_unused():
    assert fired("randomness-unused", [Temperature.spec(temperature=0.0)], Categorical.spec(seed=1)) == ["sampler categorical"]
    assert fired("randomness-unused", [Temperature.spec(temperature=0.5)], Categorical.spec(seed=1)) == []
    assert fired("randomness-unused", [TopK.spec(top_k=1)], Greedy.spec()) == []


def test_random_under_greedy():
    xtc = Xtc.spec(threshold=0.1, probability=0.5)
    assert fired("random-under-greedy", [xtc], Greedy.spec()) == ["pipeline[0] xtc"]
    assert fired("random-under-greedy", [xtc], Categorical.spec()) == []


def test_temperature_after_truncation():
    assert fired("temperature-after-truncation", [TopP.spec(top_p=0.9), Temperature.spec(temperature=0.7)]) \
        == ["pipeline[1] temperature"]
    assert fired("temperature-after-truncation", [Temperature.spec(temperature=0.7), TopP.spec(top_p=0.9)]) == []
    # top_k and top_n_sigma keep the same set at any temperature: their order does not matter.
    assert fired("temperature-after-truncation", [TopK.spec(top_k=40), TopNSigma.spec(top_n_sigma=1.0),
                                                  Temperature.spec(temperature=0.7)]) == []


def test_can_empty_row():
    assert fired("can-empty-row", [TopK.spec(top_k=5), AllowedTokens.spec(allowed_tokens=[1, 2])]) \
        == ["pipeline[1] allowed_tokens"]
    assert fired("can-empty-row", [AllowedTokens.spec(allowed_tokens=[1, 2]), TopK.spec(top_k=5)]) == []


def test_history_not_kept():
    pipe = [RepetitionPenalty.spec(repetition_penalty=1.3)]
    assert fired("history-not-kept", pipe, generation=GenerationConfig(max_new_tokens=1)) \
        == ["pipeline[0] repetition_penalty"]
    assert fired("history-not-kept", pipe, generation=GenerationConfig(max_new_tokens=16)) == []


def test_preset_order(tmp_path):
    def lint_doc(document):
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(document))          # JSON is YAML
        document, config = load_config(str(path))
        return [(w.rule, w.location) for w in lint_config(config, document=document)]

    swapped = lint_doc({"preset": "transformers", "pipeline": [{"top_p": 0.9}, {"temperature": 0.7}]})
    assert ("preset-order", "pipeline[1] temperature") in swapped
    # The preset decides that pair's order, so the generic temperature rule stays quiet.
    assert not [r for r, _ in swapped if r == "temperature-after-truncation"]
    assert lint_doc({"preset": "transformers", "pipeline": [{"temperature": 0.7}, {"top_p": 0.9}]}) == []
    # llama.cpp's order (temperature last) is what that preset imitates: no warning at all,
    # and its neutral steps (kept so that --set can turn them on) are not reported.
    assert lint_doc({"preset": "llama_cpp"}) == []
    assert lint_doc({"preset": "llama_cpp", "pipeline": [{"top_p": 0.9}, {"temperature": 0.7}]}) == []


def test_every_rule_is_tested_here():
    text = open(__file__, encoding="utf-8").read()
    missing = [rule for rule in RULES if f'"{rule}"' not in text.split("def test_every_rule_is_tested_here")[0]]
    assert not missing


def test_shipped_presets_lint_clean():
    from samplerkit.presets import list_presets

    for name in list_presets():
        document, config = load_config(None, preset=name)
        assert lint_config(config, document=document) == [], name


# -- plugins take part through declared properties ---------------------------------------------------

class _KeepTwoParams(StepParams):
    on: bool = Field(False, description="keep only the two highest logits")


class KeepTwo(Processor):
    """A third-party truncation declaring what it does (no built-in name involved)."""

    name = "keep_two"
    Params = _KeepTwoParams
    truncates = True
    argmax_invariant = True

    @classmethod
    def kept_at_most(cls, params):
        return 2 if params.on else None

    def apply(self, logits, ctx):
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(2, dim=-1).indices, True)
        return logits.masked_fill_(~keep & self.active.unsqueeze(-1), float("-inf"))


class _BanParams(StepParams):
    ids: list[int] = Field(default_factory=list, description="banned ids")


class Ban(Processor):
    """A third-party constraint (as a grammar or JSON-schema step would declare itself)."""

    name = "ban_ids"
    Params = _BanParams
    constrains = True

    def apply(self, logits, ctx):
        if self.any_active:
            logits[:, self.rows[0].ids] = float("-inf")
        return logits


def test_a_plugin_truncation_and_constraint_take_part():
    with temporary_plugin([KeepTwo, Ban]) as registry:
        pipe = samplerkit.load_pipeline({"pipeline": [{"keep_two": {"on": True}}, {"top_k": 5}, {"ban_ids": {"ids": [3]}}]},
                                        registry=registry)
    found = rules(pipe)
    assert ("no-effect", "pipeline[1] top_k") in found
    assert ("can-empty-row", "pipeline[2] ban_ids") in found


def test_example_plugin_declares_a_constraint():
    from samplerkit_example import SuppressTokens

    assert SuppressTokens.constrains and not SuppressTokens.truncates
    assert fired("can-empty-row", [TopK.spec(top_k=3), SuppressTokens.spec(token_ids=[1])]) == ["pipeline[1] suppress_tokens"]


def test_declared_keep_bounds_hold():
    """check_processor tests kept_at_most / keeps_all_of / scale_invariant: a false claim fails."""
    class ClaimsTooMuch(KeepTwo):
        name = "claims_too_much"

        @classmethod
        def kept_at_most(cls, params):
            return 1 if params.on else None

    check_processor(KeepTwo, [{"on": True}])
    with pytest.raises(AssertionError, match=r"kept_at_most.*1.*kept 2"):
        check_processor(ClaimsTooMuch, [{"on": True}])


# -- the command line ----------------------------------------------------------------------------------

def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def noisy(tmp_path):
    path = tmp_path / "noisy.yaml"
    path.write_text("pipeline:\n  - top_k: 10\n  - top_k: 50\nsampler: categorical\n")
    return str(path)


def test_cli_lint_text_json_and_strict(capsys, noisy):
    code, out, err = run(capsys, "lint", noisy)
    assert code == 0, err
    assert "pipeline[1] top_k: can remove nothing: pipeline[0] top_k keeps at most 10 tokens" in out
    assert "    why: " in out and out.rstrip().endswith("2 warnings")
    code, out, _ = run(capsys, "lint", noisy, "--json")
    assert code == 0
    assert {(w["rule"], w["location"]) for w in json.loads(out)} == {("repeated", "pipeline[1] top_k"),
                                                                    ("no-effect", "pipeline[1] top_k")}
    assert run(capsys, "lint", noisy, "--strict")[0] == 1
    # --set can fix it; strict then passes.
    code, out, _ = run(capsys, "lint", noisy, "--strict", "--set", "pipeline[1]={top_p: 0.9}")
    assert code == 0 and out.strip().endswith("0 warnings")


def test_cli_lint_errors_are_user_errors(capsys, tmp_path):
    code, _, err = run(capsys, "lint")
    assert code == 2 and "give a CONFIG file or --preset NAME" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline:\n  - top_k: -1\n")
    code, _, err = run(capsys, "lint", str(bad))
    assert code == 2 and "pipeline[0] top_k" in err and "Traceback" not in err


def test_validate_prints_the_warnings(capsys, noisy):
    code, out, _ = run(capsys, "validate", noisy)
    assert code == 0
    assert "  warning: pipeline[1] top_k: can remove nothing" in out


# -- docs/lint.md shows real output --------------------------------------------------------------------

def _doc_examples():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "lint.md").read_text(encoding="utf-8")
    return re.findall(r"```yaml\n# (\S+)\n(.*?)```\n\n```\n\$ samplerkit lint (\S+)\n(.*?)```", text, flags=re.S)


def test_docs_lint_shows_every_rule():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "lint.md").read_text(encoding="utf-8")
    shown = {line.split("[")[-1].rstrip("]") for _, _, _, out in _doc_examples() for line in out.splitlines()
             if line.endswith("]")}
    assert shown == set(RULES)
    assert all(f"### `{rule}`" in text for rule in RULES)


@pytest.mark.parametrize("name, yaml, file, expected", _doc_examples(), ids=[e[0] for e in _doc_examples()])
def test_docs_lint_output_is_real(capsys, tmp_path, monkeypatch, name, yaml, file, expected):
    assert name == file
    (tmp_path / name).write_text(yaml)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "lint", name)
    assert code == 0, err
    assert out == expected
