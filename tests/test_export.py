"""``samplerkit export llamacpp``: llama.cpp flags for a config, exact or one error listing every problem."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import samplerkit
from samplerkit.cli import main
from samplerkit.config import resolve
from samplerkit.errors import ConfigError
from samplerkit.export import DEFAULT_CHAIN, export_llamacpp, import_llamacpp


@pytest.fixture(scope="module")
def registry():
    return samplerkit.default_registry()


def export(data, registry):
    return export_llamacpp(resolve(data, registry))


def flags(args: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of an argv (switches map to "")."""
    out, i = {}, 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]] = args[i + 1]
            i += 2
        else:
            out[args[i]] = ""
            i += 1
    return out


def test_llama_cpp_preset_is_llama_cpps_default_chain(registry):
    out = flags(export({"preset": "llama_cpp"}, registry).args)
    assert out["--samplers"] == ";".join(DEFAULT_CHAIN)
    assert out["--samplers"] == "penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature"
    # llama.cpp's own defaults (common_params_sampling), so the flags change nothing there (DRY is off:
    # multiplier 0, and its window 0 = whole context in samplerkit is llama.cpp's 0 = off).
    assert out == {**out, "--repeat-penalty": "1", "--repeat-last-n": "64", "--frequency-penalty": "0",
                   "--presence-penalty": "0", "--dry-multiplier": "0", "--dry-base": "1.75",
                   "--dry-allowed-length": "2", "--dry-penalty-last-n": "0", "--top-nsigma": "-1",
                   "--top-k": "40", "--typical": "1", "--top-p": "0.95", "--min-p": "0.05",
                   "--xtc-probability": "0", "--xtc-threshold": "0.1", "--temp": "0.8", "-n": "128"}
    assert "--seed" not in out


def test_import_of_no_flags_is_the_llama_cpp_preset(registry):
    imported = resolve(import_llamacpp([]), registry)
    preset = resolve({"preset": "llama_cpp"}, registry)
    assert [(s.name, s.params) for s in imported.processors] == [(s.name, s.params) for s in preset.processors]


@pytest.mark.parametrize("data", [
    {"preset": "llama_cpp"},
    {"preset": "llama_cpp", "sampler": {"name": "categorical", "seed": 42}, "generation": {"max_new_tokens": 7}},
    {"pipeline": [{"top_k": 40}, {"top_p": 0.9}, {"temperature": 0.7}]},
    {"pipeline": [{"temperature": 0.7}, {"min_p": 0.1}]},                          # any order is expressible
    {"pipeline": [{"repetition_penalty": {"repetition_penalty": 1.3, "last_n": 512}}, {"frequency_penalty": 0.0},
                  {"presence_penalty": 0.0}, {"dry": {"multiplier": 0.8, "penalty_last_n": 256}},
                  {"dynamic_temperature": {"low": 0.5, "high": 1.5, "exponent": 2.0}}]},
    {"pipeline": [{"logit_bias": {"bias": {5: -3.5, 7: 2.0}}}, {"top_n_sigma": 1.5}, {"xtc": {"probability": 0.5}},
                  {"temperature": 1.2}], "generation": {"ignore_eos": True}},
])
def test_round_trip(data, registry):
    config = resolve(data, registry)
    args = export_llamacpp(config).args
    again = resolve(import_llamacpp(args), registry)
    assert export_llamacpp(again).args == args
    assert again.generation.max_new_tokens == config.generation.max_new_tokens
    assert again.sampler.params == config.sampler.params
    original = [(s.name, s.params) for s in config.processors]
    # Import spells a `penalties` sampler as all three steps; the others come back as written.
    assert [x for x in ((s.name, s.params) for s in again.processors) if x in original] == original


def test_string_round_trip():
    text = "--samplers 'top_k;temperature' --top-k 5 --temp 0.7 --seed 3 -n 20"
    config = resolve(import_llamacpp(text), samplerkit.default_registry())
    assert export_llamacpp(config).command_line() == text


def test_values_translated_exactly(registry):
    out = flags(export({"pipeline": [
        {"repetition_penalty": {"repetition_penalty": 1.1, "last_n": 256}},
        {"dry": {"multiplier": 0.8, "base": 2.0, "allowed_length": 3, "penalty_last_n": 128}},
        {"top_n_sigma": 0.0},                                               # off: llama.cpp -1
        {"dynamic_temperature": {"low": 0.25, "high": 1.75, "exponent": 1.5}},
    ], "sampler": {"name": "categorical", "seed": 123}}, registry).args)
    assert out["--samplers"] == "penalties;dry;top_n_sigma;temperature"
    assert out["--repeat-last-n"] == "256" and out["--repeat-penalty"] == "1.1"
    assert out["--dry-penalty-last-n"] == "128" and out["--dry-allowed-length"] == "3"
    assert out["--dry-sequence-breaker"] == "none"          # llama.cpp's default breakers would apply otherwise
    assert out["--top-nsigma"] == "-1"
    assert (out["--temp"], out["--dynatemp-range"], out["--dynatemp-exp"]) == ("1", "0.75", "1.5")
    assert out["--seed"] == "123"


def test_a_whole_context_window_is_refused_llama_cpp_has_none(registry):
    # llama.cpp (llama-cpp-python 0.3.36) rejects --repeat-last-n -1 and reads 0 as "off".
    with pytest.raises(ConfigError) as info:
        export({"pipeline": [{"repetition_penalty": 1.1}, {"dry": {"multiplier": 0.8}}]}, registry)
    assert [i.location for i in info.value.issues] == ["pipeline[0] repetition_penalty", "pipeline[1] dry"]
    assert "set a window as long as your context" in str(info.value)
    # Off, the window does not matter: 0 is llama.cpp's "off" too.
    out = flags(export({"pipeline": [{"repetition_penalty": 1.0}, {"dry": {"multiplier": 0.0}}]}, registry).args)
    assert (out["--repeat-last-n"], out["--dry-penalty-last-n"]) == ("0", "0")


def test_greedy_is_temp_zero(registry):
    assert export({"pipeline": [{"top_k": 40}], "sampler": "greedy"}, registry).args == [
        "--samplers", "top_k;temperature", "--top-k", "40", "--temp", "0", "-n", "128"]
    # An existing temperature step becomes the argmax; argmax-invariant steps may follow it.
    out = flags(export({"pipeline": [{"temperature": 0.7}, {"top_p": 0.9}], "sampler": "greedy"}, registry).args)
    assert (out["--samplers"], out["--temp"]) == ("temperature;top_p", "0")


def test_mirostat(registry):
    args = export({"pipeline": [{"temperature": 0.7}], "sampler": {"name": "mirostat_v2", "tau": 4.0, "eta": 0.2}},
                  registry).args
    assert args == ["--temp", "0.7", "--mirostat", "2", "--mirostat-lr", "0.2", "--mirostat-ent", "4", "-n", "128"]
    assert resolve(import_llamacpp(args), registry).sampler.name == "mirostat_v2"


def test_every_inexpressible_step_in_one_error(registry):
    data = {"pipeline": [
        {"top_k": 40},
        {"min_tokens": {"min_tokens": 3, "eos_token_ids": [2]}},
        {"repetition_penalty": {"repetition_penalty": 1.2, "include_prompt": False}},
        {"top_k": 5},
        {"presence_penalty": 0.5},
        {"no_repeat_ngram": 3},
        {"dry": {"multiplier": 0.8, "sequence_breakers": [198]}},
        {"logit_bias": {"bias": {1: 1.0}}},
        {"typical_p": {"typical_p": 0.9, "min_tokens_to_keep": 3}},
        {"temperature": 0.7},
        {"xtc": {"probability": 0.5}},
        {"epsilon_cutoff": 0.001},
    ], "sampler": "greedy", "generation": {"stop": ["\n"], "n": 2}}
    with pytest.raises(ConfigError) as info:
        export(data, registry)
    # In pipeline order; repetition_penalty, presence_penalty and dry have two problems each (dry and
    # repetition_penalty: their whole-context window too).
    where = list(dict.fromkeys(issue.location for issue in info.value.issues))
    assert where == ["pipeline[1] min_tokens", "pipeline[2] repetition_penalty", "pipeline[3] top_k",
                     "pipeline[4] presence_penalty", "pipeline[5] no_repeat_ngram", "pipeline[6] dry",
                     "pipeline[7] logit_bias", "pipeline[8] typical_p", "pipeline[10] xtc",
                     "pipeline[11] epsilon_cutoff", "generation.stop", "generation.n"]
    text = str(info.value)
    assert "15 problems" in text
    assert "include_prompt" in text and "already comes from pipeline[0] top_k with --top-k 40" in text
    assert "not adjacent" in text and "first step" in text and "token ids" in text
    assert "can change the argmax" in text


def test_frequency_penalty_semantics_differ(registry):
    with pytest.raises(ConfigError, match="generated tokens only"):
        export({"pipeline": [{"repetition_penalty": 1.1}, {"frequency_penalty": 0.3}]}, registry)


def test_mirostat_takes_only_temperature(registry):
    with pytest.raises(ConfigError, match=r"pipeline\[0\] top_k: llama.cpp ignores --samplers under --mirostat"):
        export({"pipeline": [{"top_k": 40}], "sampler": "mirostat"}, registry)


def test_seed_range(registry):
    with pytest.raises(ConfigError, match="sampler.seed: llama.cpp seeds are 32-bit"):
        export({"sampler": {"name": "categorical", "seed": 2**40}}, registry)


def test_model_path_is_passed(registry):
    args = export({"backend": {"name": "llama", "model": "/m/x.gguf"}, "pipeline": []}, registry).args
    assert args[:2] == ["-m", "/m/x.gguf"]


def test_import_rejects_unknown_flags_and_llama_only_semantics():
    with pytest.raises(ConfigError) as info:
        import_llamacpp("--frobnicate 3 --top-k 2")
    assert "--frobnicate" in str(info.value)
    with pytest.raises(ConfigError, match="generated tokens only"):
        import_llamacpp("--presence-penalty 0.5")
    with pytest.raises(ConfigError, match="breakers"):
        import_llamacpp("--dry-multiplier 0.8")


def test_cli_prints_flags(capsys):
    assert main(["export", "llamacpp", "--preset", "llama_cpp", "--set", "sampler.seed=5"]) == 0
    out = capsys.readouterr().out
    assert shlex.split(out)[:2] == ["--samplers", ";".join(DEFAULT_CHAIN)]
    assert "--seed 5" in out


def test_cli_error_exits_2_without_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("pipeline: [{bad_words: {bad_words: [[3]]}}, {top_k: 4}, {top_k: 5}]\n")
    assert main(["export", "llamacpp", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pipeline[0] bad_words" in err and "pipeline[2] top_k" in err and "Traceback" not in err


def test_neutral_inexpressible_steps_are_left_out_with_a_note(registry):
    exported = export({"preset": "transformers"}, registry)          # epsilon_cutoff 0, eta_cutoff 0
    assert "epsilon" not in exported.command_line()
    assert [n.split(":")[0] for n in exported.notes] == ["pipeline[6] epsilon_cutoff", "pipeline[7] eta_cutoff"]
    assert all("left out, it is neutral" in n for n in exported.notes)


def test_a_neutral_step_left_out_keeps_penalties_adjacent(registry):
    exported = export({"pipeline": [{"repetition_penalty": {"repetition_penalty": 1.2, "last_n": 64}}, {"top_a": 0.0},
                                    {"presence_penalty": 0.0},
                                    {"temperature": 0.7}, {"typical_p": 1.0}], "sampler": "greedy"}, registry)
    assert flags(exported.args)["--samplers"] == "penalties;temperature;typ_p"
    assert flags(exported.args)["--temp"] == "0"


# -- import -> export -> import ----------------------------------------------------------------

def same_config(a, b) -> bool:
    return ([(s.name, s.params) for s in a.processors] == [(s.name, s.params) for s in b.processors]
            and (a.sampler.name, a.sampler.params) == (b.sampler.name, b.sampler.params)
            and a.generation == b.generation and a.backend.params == b.backend.params)


def assert_round_trips(argv, registry):
    """What import gives exports, and those flags import to the same config."""
    config = resolve(import_llamacpp(argv, registry), registry)
    args = export_llamacpp(config).args
    again = resolve(import_llamacpp(args, registry), registry)
    assert same_config(config, again), (argv, args)


def test_a_sampler_named_twice_round_trips(registry):
    # Issue 13 defect 5: llama.cpp runs top_k twice with the one --top-k value.
    assert_round_trips(["--samplers", "top_k;temperature;top_k"], registry)
    out = flags(export({"pipeline": [{"top_k": 20}, {"temperature": 0.7}, {"top_k": 20}]}, registry).args)
    assert out["--samplers"] == "top_k;temperature;top_k" and out["--top-k"] == "20"
    assert_round_trips(["--samplers", "penalties;top_k;penalties", "--repeat-penalty", "1.2"], registry)


def test_a_second_instance_with_other_values_is_refused(registry):
    with pytest.raises(ConfigError, match=r"pipeline\[2\] top_k: llama.cpp's 'top_k' sampler already comes from "
                                          r"pipeline\[0\] top_k with --top-k 20.*this step: --top-k 5"):
        export({"pipeline": [{"top_k": 20}, {"temperature": 0.7}, {"top_k": 5}]}, registry)
    with pytest.raises(ConfigError, match="--dynatemp-range 0"):
        export({"pipeline": [{"temperature": 0.7}, {"dynamic_temperature": {"low": 0.5, "high": 0.9}}]}, registry)


def test_an_empty_pipeline_is_an_empty_chain_not_llama_cpps_default(registry):
    args = export({"pipeline": []}, registry).args
    assert args[:2] == ["--samplers", ""]
    assert resolve(import_llamacpp(args, registry), registry).processors == ()


def test_import_maps_llama_cpps_off_values_and_refuses_what_it_cannot_represent(registry):
    out = import_llamacpp("--samplers 'top-k;Top_P;dry;typ' --top-k -1 --top-p 1.5 --dry-multiplier 0.8 "
                          "--dry-penalty-last-n 0 --typical 2", registry)
    assert out["pipeline"] == [{"top_k": {"top_k": 0}}, {"top_p": {"top_p": 1.0}},
                               {"dry": {"multiplier": 0.0, "base": 1.75, "allowed_length": 2, "penalty_last_n": 0}},
                               {"typical_p": {"typical_p": 1.0}}]
    with pytest.raises(ConfigError) as info:
        import_llamacpp("--samplers 'top_p;xtc' --top-p 0 --xtc-probability 0.5 --xtc-threshold 0 --temp x", registry)
    assert [i.location for i in info.value.issues] == ["--temp"]
    with pytest.raises(ConfigError) as info:
        import_llamacpp("--samplers 'top_p;xtc' --top-p 0 --xtc-probability 0.5 --xtc-threshold 0", registry)
    assert [i.location for i in info.value.issues] == ["--top-p", "--xtc-threshold"]
    assert "use --top-k 1" in str(info.value)
    with pytest.raises(ConfigError, match=r"--logit-bias: '9-inf': samplerkit takes .* bias in \[-100, 100\]"):
        import_llamacpp("--logit-bias 9-inf", registry)
    # Flags of samplers not in --samplers do not matter to llama.cpp, so not to import either.
    assert import_llamacpp("--samplers top_k --top-p 0", registry)["pipeline"] == [{"top_k": {"top_k": 40}}]


def test_conformance_refusals_name_the_step_its_position_and_the_difference(registry):
    with pytest.raises(ConfigError) as info:
        export({"pipeline": [{"top_n_sigma": 1.5}, {"typical_p": 0.8}, {"temperature": 1.2}]}, registry)
    assert str(info.value.issues[0]).startswith("pipeline[1] typical_p: after pipeline[0] top_n_sigma: ")
    assert "-0 * log 0 = NaN" in str(info.value) and "a top_p or min_p step between them" in str(info.value)
    with pytest.raises(ConfigError, match=r"pipeline\[1\] dynamic_temperature: .*log\(candidates\)"):
        export({"pipeline": [{"top_n_sigma": 1.5}, {"dynamic_temperature": {"low": 0.5, "high": 1.5}}]}, registry)
    # A min_p (or top_p) in between removes llama.cpp's -inf entries; under greedy, --temp 0 replaces
    # the dynamic temperature; a neutral typical_p does nothing: all export.
    export({"pipeline": [{"top_n_sigma": 1.5}, {"min_p": 0.01}, {"typical_p": 0.8}]}, registry)
    export({"pipeline": [{"top_n_sigma": 1.5}, {"dynamic_temperature": {"low": 0.5, "high": 1.5}}],
            "sampler": "greedy"}, registry)
    export({"pipeline": [{"top_n_sigma": 1.5}, {"typical_p": 1.0}]}, registry)


def test_import_refuses_a_chain_llama_cpp_runs_differently(registry):
    # pipeline[6]: `penalties` imports as three steps, then dry, top_n_sigma (pipeline[4]), top_k, typ_p.
    with pytest.raises(ConfigError, match=r"cannot be exported back exactly.*pipeline\[6\] typical_p: after "
                                          r"pipeline\[4\] top_n_sigma"):
        import_llamacpp("--top-nsigma 1.5 --typical 0.8", registry)


_SAMPLER_NAMES = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature",
                  "top-k", "TEMP", "typ", "minp", "nucleus", "typical"]
_VALUES = {
    "--top-k": st.integers(-3, 60).map(str),
    "--top-p": st.sampled_from(["-0.5", "0", "0.3", "0.9", "0.95", "1", "1.5"]),
    "--min-p": st.sampled_from(["-1", "0", "0.05", "0.2", "1", "2"]),
    "--typical": st.sampled_from(["0", "0.5", "0.9", "1", "3"]),
    "--top-nsigma": st.sampled_from(["-1", "0", "1", "2.5"]),
    "--temp": st.sampled_from(["-1", "0", "0.7", "1", "1.5"]),
    "--dynatemp-range": st.sampled_from(["0", "0.25", "2"]),
    "--dynatemp-exp": st.sampled_from(["-1", "1", "2"]),
    "--xtc-probability": st.sampled_from(["0", "0.5", "1", "2"]),
    "--xtc-threshold": st.sampled_from(["0", "0.1", "0.6", "1.5"]),
    "--repeat-penalty": st.sampled_from(["0", "1", "1.1", "2"]),
    "--repeat-last-n": st.sampled_from(["-2", "-1", "0", "64"]),
    "--frequency-penalty": st.sampled_from(["0", "0.5"]),
    "--presence-penalty": st.sampled_from(["0", "0.5"]),
    "--dry-multiplier": st.sampled_from(["0", "0.8"]),
    "--dry-base": st.sampled_from(["0.5", "1.75"]),
    "--dry-allowed-length": st.sampled_from(["0", "2", "4"]),
    "--dry-penalty-last-n": st.sampled_from(["-1", "0", "128"]),
    "--dry-sequence-breaker": st.sampled_from(["none", "\n"]),
    "--mirostat": st.sampled_from(["0", "0", "0", "1", "2", "3"]),
    "--mirostat-lr": st.sampled_from(["0.1", "0.3"]),
    "--mirostat-ent": st.sampled_from(["3", "5"]),
    "--seed": st.sampled_from(["-1", "0", "42", "4294967295"]),
    "-n": st.sampled_from(["-1", "0", "16"]),
    "--logit-bias": st.sampled_from(["5+1.5", "7-3", "9-inf", "x"]),
}


@st.composite
def llama_argv(draw):
    argv = ["--samplers", ";".join(draw(st.lists(st.sampled_from(_SAMPLER_NAMES), max_size=8)))]
    for flag in draw(st.lists(st.sampled_from(sorted(_VALUES)), unique=True, max_size=10)):
        argv += [flag, draw(_VALUES[flag])]
    if draw(st.booleans()):
        argv.append("--ignore-eos")
    return argv


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=llama_argv())
def test_import_export_import_is_the_identity(argv, registry):
    """Whatever import accepts round-trips exactly; whatever it refuses, it says which flag and why."""
    try:
        imported = import_llamacpp(argv, registry)
    except ConfigError as exc:
        assert exc.issues and all(i.location and i.message for i in exc.issues), str(exc)
        assert all(i.location.startswith(("-", "pipeline[", "sampler")) for i in exc.issues), str(exc)
        return
    config = resolve(imported, registry)
    args = export_llamacpp(config).args
    again = resolve(import_llamacpp(args, registry), registry)
    assert same_config(config, again), (argv, args)


def test_a_plugin_sampler_exports_through_its_llamacpp_declaration():
    """No sampler name in export: a sampler of any name exports from its `llamacpp` attribute,
    and import finds it by its flags."""
    import torch
    from pydantic import Field

    from samplerkit import Sampler, StepParams
    from samplerkit.export import LlamaCppSampler
    from samplerkit.plugins import PluginInfo
    from samplerkit.registry import Entry, Registry

    class Adaptive(Sampler):
        name = "toy_adaptive"
        llamacpp = LlamaCppSampler(flags={"--mirostat": "2"}, params={"tau": "--mirostat-ent", "seed": "--seed"},
                                   fixed={"window": 100}, replaces_chain=True)

        class Params(StepParams):
            tau: float = Field(5.0, ge=0)
            window: int = Field(100, ge=1)
            seed: int | None = None

        def sample(self, logits, ctx):
            return torch.argmax(logits, dim=-1)

    base = samplerkit.default_registry()
    entries = [e for kind in ("processor", "backend") for e in base.entries(kind)]
    entries += [e for e in base.entries("sampler") if e.name in ("categorical", "greedy")]
    toy = Registry([*entries, Entry("sampler", "toy_adaptive", Adaptive, PluginInfo("toy"))])
    config = resolve({"pipeline": [{"temperature": 0.9}], "sampler": {"name": "toy_adaptive", "tau": 3.5,
                                                                       "seed": 7}}, toy)
    args = export_llamacpp(config).args
    assert args == ["--temp", "0.9", "--mirostat", "2", "--mirostat-ent", "3.5", "--seed", "7", "-n", "128"]
    again = resolve(import_llamacpp(args, toy), toy)
    assert (again.sampler.name, again.sampler.params) == ("toy_adaptive", config.sampler.params)
    with pytest.raises(ConfigError, match=r"sampler toy_adaptive.window: llama.cpp's toy_adaptive uses window = 100"):
        export_llamacpp(resolve({"sampler": {"name": "toy_adaptive", "window": 5}}, toy))
    with pytest.raises(ConfigError, match=r"pipeline\[0\] top_k: llama.cpp ignores --samplers under --mirostat 2"):
        export_llamacpp(resolve({"pipeline": [{"top_k": 5}], "sampler": "toy_adaptive"}, toy))
    # Without a sampler declaring --mirostat 1, import says what to install.
    with pytest.raises(ConfigError, match="--mirostat: 1: no installed sampler declares llama.cpp's mirostat 1"):
        import_llamacpp("--mirostat 1", toy)


def test_the_cli_docs_export_examples_are_what_the_cli_prints(tmp_path, monkeypatch, capsys):
    """docs/cli.md's `samplerkit export llamacpp` session, run: each command prints (stderr, then
    stdout) exactly the lines shown under it; `$ cat FILE` blocks are written first."""
    doc = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    section = doc[doc.index("## `samplerkit export llamacpp`"):]
    section = section[:section.index("\n## ", 10)] if "\n## " in section[10:] else section
    monkeypatch.chdir(tmp_path)
    commands = 0
    for block in re.findall(r"```\n(.*?)```", section, flags=re.S):
        steps = re.split(r"^\$ ", block, flags=re.M)[1:]
        for step in steps:
            command, _, shown = step.partition("\n")
            if command.startswith("cat "):
                Path(command.split()[1]).write_text(shown)
                continue
            argv = shlex.split(command)
            assert argv[:3] == ["samplerkit", "export", "llamacpp"]
            code = main(argv[1:])
            out = capsys.readouterr()
            assert (out.err + out.out).splitlines() == shown.splitlines(), command
            assert code == (2 if "error:" in shown else 0)
            commands += 1
    assert commands == 4
