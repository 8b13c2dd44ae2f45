"""Presets (samplerkit/presets/*.yaml, samplerkit.presets): listing, loading, `preset:` in a
config with overrides, the CLI's `--preset` and `presets` command."""

from __future__ import annotations

import pytest

import samplerkit
from samplerkit import ConfigError
from samplerkit.cli import main as cli_main
from samplerkit.config import resolve
from samplerkit.presets import apply_preset, describe_preset, list_presets, load_preset, merge_under

REGISTRY = samplerkit.default_registry()
EXPECTED = {"seed", "llama_cpp", "vllm", "transformers", "greedy", "creative", "min_p"}


def chain(data):
    config = resolve(data, REGISTRY)
    return [s.name for s in config.processors], config


def test_shipped_presets_are_listed():
    assert EXPECTED <= set(list_presets())
    assert list_presets() == sorted(list_presets())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_preset_resolves_and_has_a_description(name):
    data = load_preset(name)
    assert "description" not in data
    assert set(data) <= {"pipeline", "sampler", "generation"}
    resolve(data, REGISTRY, f"preset {name}")
    assert describe_preset(name)


def test_seed_preset_is_the_default_pipeline():
    names, config = chain({"preset": "seed"})
    default_names, default = chain({})
    assert names == default_names == ["temperature", "top_p"]
    assert [s.params for s in config.processors] == [s.params for s in default.processors]


def test_llama_cpp_order_and_values():
    names, config = chain({"preset": "llama_cpp"})
    assert names == ["repetition_penalty", "frequency_penalty", "presence_penalty", "dry", "top_n_sigma", "top_k",
                     "typical_p", "top_p", "min_p", "xtc", "temperature"]
    params = {s.name: s.params for s in config.processors}
    assert params["top_k"].top_k == 40 and params["top_p"].top_p == 0.95 and params["min_p"].min_p == 0.05
    assert params["temperature"].temperature == 0.8
    assert params["repetition_penalty"].last_n == 64
    # llama.cpp's off-by-default steps are present but neutral.
    for name in ("repetition_penalty", "frequency_penalty", "presence_penalty", "dry", "top_n_sigma", "typical_p", "xtc"):
        assert params[name].is_neutral(), name
    pipe = samplerkit.Pipeline.from_config(config)
    assert [s.name for s, _ in pipe.bind(2).steps] == ["top_k", "top_p", "min_p", "temperature"]


def test_engine_orders():
    assert chain({"preset": "vllm"})[0] == ["repetition_penalty", "frequency_penalty", "presence_penalty",
                                            "temperature", "min_p", "top_k", "top_p"]
    names, config = chain({"preset": "transformers"})
    assert names == ["repetition_penalty", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
                     "eta_cutoff"]
    assert config.processors[2].params.top_k == 50
    assert chain({"preset": "greedy"})[1].sampler.name == "greedy"
    assert chain({"preset": "greedy"})[0] == []
    assert "min_p" in chain({"preset": "min_p"})[0]


# -- `preset:` in a config ------------------------------------------------------------------

def test_document_sections_override_the_preset():
    config = resolve({"preset": "llama_cpp", "pipeline": [{"top_k": 5}], "sampler": {"seed": 9},
                      "backend": "bigram", "generation": {"max_new_tokens": 3}}, REGISTRY)
    assert [s.name for s in config.processors] == ["top_k"]
    assert config.sampler.name == "categorical" and config.sampler.params.seed == 9       # merged
    assert config.backend.name == "bigram" and config.generation.max_new_tokens == 3


def test_a_different_sampler_replaces_the_presets():
    config = resolve({"preset": "seed", "sampler": "greedy"}, REGISTRY)
    assert config.sampler.name == "greedy"
    assert [s.name for s in config.processors] == ["temperature", "top_p"]


def test_merge_under_rules():
    base = {"sampler": {"name": "categorical", "seed": 1}, "pipeline": [{"top_k": 3}], "generation": {"n": 2, "stop": ["a"]}}
    out = merge_under(base, {"sampler": {"name": "greedy"}, "generation": {"stop": ["b"]}})
    assert out == {"sampler": {"name": "greedy"}, "pipeline": [{"top_k": 3}], "generation": {"n": 2, "stop": ["b"]}}
    assert base["generation"]["stop"] == ["a"]                      # no aliasing
    assert apply_preset({"x": 1}) == {"x": 1}


def test_unknown_preset_is_collected_with_the_other_errors():
    with pytest.raises(ConfigError) as info:
        resolve({"preset": "lama_cpp", "pipeline": [{"top_p": 1.5}], "sampler": "nope"}, REGISTRY)
    text = str(info.value)
    assert "preset: unknown preset 'lama_cpp'; did you mean 'llama_cpp'?" in text
    assert "pipeline[0] top_p: must be in (0, 1]" in text
    assert "sampler.name: unknown sampler 'nope'" in text
    assert "Presets: creative, greedy" in text
    with pytest.raises(ConfigError, match="unknown preset 3"):
        load_preset(3)


def test_preset_from_a_yaml_file_through_generate(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: llama_cpp\nbackend: bigram\nsampler: {seed: 4}\ngeneration: {max_new_tokens: 16}\n",
                    encoding="utf-8")
    first = samplerkit.generate(["The"], str(path))
    assert first[0].token_ids and first[0].token_ids == samplerkit.generate(["The"], str(path))[0].token_ids
    pipe = samplerkit.load_pipeline(str(path))
    assert [s.name for s in pipe.processors][-1] == "temperature"


def test_schema_accepts_preset():
    from samplerkit.schema import run_config_schema

    prop = run_config_schema(REGISTRY)["properties"]["preset"]
    assert set(prop["enum"]) == set(list_presets())


# -- CLI --------------------------------------------------------------------------------------

def test_cli_presets_lists_names_and_pipelines(capsys):
    assert cli_main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert f"\n{name}  " in "\n" + out
    assert "temperature(temperature=0.6) -> top_p(top_p=0.9) => categorical(seed=None)" in out
    assert "top_k(top_k=40)" in out


def test_cli_generate_with_preset(capsys):
    args = ["generate", "The", "--preset", "greedy", "--set", "backend=bigram", "--max-new-tokens", "8", "--json"]
    assert cli_main(args) == 0
    greedy = capsys.readouterr().out
    assert cli_main(args) == 0
    assert capsys.readouterr().out == greedy
    # --set edits the preset's pipeline; --seed merges into its sampler.
    assert cli_main(["generate", "The", "--preset", "seed", "--set", "backend=bigram", "--set", "pipeline[1].top_p=0.5",
                     "--seed", "3", "--max-new-tokens", "8", "--json"]) == 0


def test_cli_preset_file_overrides(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("backend: bigram\npipeline: []\nsampler: greedy\n", encoding="utf-8")
    # The file's sections win over --preset's.
    assert cli_main(["generate", "Th", "--preset", "creative", "-c", str(path), "--max-new-tokens", "4", "--json"]) == 0
    assert cli_main(["generate", "Th", "--preset", "greedy", "-c", str(path), "--max-new-tokens", "4", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == out[1]


def test_cli_unknown_preset_is_a_user_error(capsys):
    assert cli_main(["generate", "The", "--preset", "creativ", "--set", "backend=bigram"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'creativ'; did you mean 'creative'?" in err
    assert "Traceback" not in err
