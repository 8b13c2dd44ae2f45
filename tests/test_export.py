"""``samplerkit export llamacpp``: llama.cpp flags for a config, exact or one error listing every problem."""

from __future__ import annotations

import shlex

import pytest

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
    # llama.cpp's own defaults (common_params_sampling), so the flags change nothing there.
    assert out == {**out, "--repeat-penalty": "1", "--repeat-last-n": "64", "--frequency-penalty": "0",
                   "--presence-penalty": "0", "--dry-multiplier": "0", "--dry-base": "1.75",
                   "--dry-allowed-length": "2", "--dry-penalty-last-n": "-1", "--top-nsigma": "-1",
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
    {"pipeline": [{"repetition_penalty": {"repetition_penalty": 1.3, "last_n": 0}}, {"frequency_penalty": 0.0},
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
        {"repetition_penalty": {"repetition_penalty": 1.1, "last_n": 0}},   # 0 = whole context = llama.cpp -1
        {"dry": {"multiplier": 0.8, "base": 2.0, "allowed_length": 3}},     # penalty_last_n 0 = -1
        {"top_n_sigma": 0.0},                                               # off: llama.cpp -1
        {"dynamic_temperature": {"low": 0.25, "high": 1.75, "exponent": 1.5}},
    ], "sampler": {"name": "categorical", "seed": 123}}, registry).args)
    assert out["--samplers"] == "penalties;dry;top_n_sigma;temperature"
    assert out["--repeat-last-n"] == "-1" and out["--repeat-penalty"] == "1.1"
    assert out["--dry-penalty-last-n"] == "-1" and out["--dry-allowed-length"] == "3"
    assert out["--dry-sequence-breaker"] == "none"          # llama.cpp's default breakers would apply otherwise
    assert out["--top-nsigma"] == "-1"
    assert (out["--temp"], out["--dynatemp-range"], out["--dynatemp-exp"]) == ("1", "0.75", "1.5")
    assert out["--seed"] == "123"


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
    where = [issue.location for issue in info.value.issues]
    assert where == ["pipeline[1] min_tokens", "pipeline[2] repetition_penalty", "pipeline[3] top_k",
                     "pipeline[4] presence_penalty", "pipeline[5] no_repeat_ngram", "pipeline[6] dry",
                     "pipeline[7] logit_bias", "pipeline[8] typical_p", "pipeline[10] xtc",
                     "pipeline[11] epsilon_cutoff", "generation.stop", "generation.n"]
    text = str(info.value)
    assert "12 problems" in text
    assert "include_prompt" in text and "already comes from pipeline[0] top_k" in text
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
    exported = export({"pipeline": [{"repetition_penalty": 1.2}, {"top_a": 0.0}, {"presence_penalty": 0.0},
                                    {"temperature": 0.7}, {"typical_p": 1.0}], "sampler": "greedy"}, registry)
    assert flags(exported.args)["--samplers"] == "penalties;temperature;typ_p"
    assert flags(exported.args)["--temp"] == "0"
