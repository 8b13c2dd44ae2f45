"""Configuration: YAML/dict loading, located error messages, overrides, JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from samplerkit import ConfigError, load_pipeline
from samplerkit.config import DEFAULT_PIPELINE, apply_override, parse_yaml, read_yaml, resolve
from samplerkit.registry import default_registry
from samplerkit.schema import run_config_schema

REGISTRY = default_registry()
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def issues(data):
    with pytest.raises(ConfigError) as info:
        resolve(data, REGISTRY)
    return [str(i) for i in info.value.issues], str(info.value)


def test_dict_config_resolves_in_order():
    cfg = resolve({"backend": "bigram", "pipeline": [{"temperature": {"temperature": 0.7}}, {"top_k": 40}, "top_p",
                                                     {"min_p": None}], "sampler": {"name": "categorical", "seed": 3},
                   "generation": {"max_new_tokens": 5, "stop": ["\n"]}}, REGISTRY)
    assert [s.name for s in cfg.processors] == ["temperature", "top_k", "top_p", "min_p"]
    assert cfg.processors[0].params.temperature == 0.7 and cfg.processors[1].params.top_k == 40
    assert cfg.processors[2].params.top_p == 1.0 and cfg.processors[3].params.min_p == 0.0
    assert cfg.sampler.name == "categorical" and cfg.sampler.params.seed == 3
    assert cfg.backend.name == "bigram" and cfg.generation.max_new_tokens == 5 and cfg.generation.stop == ["\n"]
    assert cfg.processors[1].location == "pipeline[1] top_k"


def test_defaults_are_the_seeds_pipeline():
    cfg = resolve({}, REGISTRY)
    assert [(s.name, s.params.model_dump()) for s in cfg.processors] == [
        ("temperature", {"temperature": 0.6}), ("top_p", {"top_p": 0.9})]
    assert cfg.sampler.name == "categorical" and cfg.backend.name == "llama"
    assert DEFAULT_PIPELINE == [{"temperature": {"temperature": 0.6}}, {"top_p": {"top_p": 0.9}}]


def test_yaml_loading_and_scalar_shorthand(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backend: bigram\npipeline:\n  - top_p: 0.9\n  - temperature: {temperature: 0.5}\nsampler: greedy\n")
    cfg = resolve(read_yaml(path), REGISTRY)
    assert [s.params.model_dump() for s in cfg.processors] == [{"top_p": 0.9}, {"temperature": 0.5}]
    assert parse_yaml("") == {}


def test_shorthand_only_for_a_field_named_like_the_step():
    msgs, _ = issues({"pipeline": [{"top_p": [0.9]}]})
    assert msgs and msgs[0].startswith("pipeline[0] top_p")


@pytest.mark.parametrize("data, expected", [
    ({"pipeline": [{"temperature": 0.7}, {"top_k": 5}, {"top_p": 1.5}]}, "pipeline[2] top_p: must be in (0, 1], got 1.5"),
    ({"pipeline": [{"top_p": 0}]}, "pipeline[0] top_p: must be in (0, 1], got 0"),
    ({"pipeline": [{"top_k": -1}]}, "pipeline[0] top_k: must be >= 0, got -1"),
    ({"pipeline": [{"min_p": 1.01}]}, "pipeline[0] min_p: must be in [0, 1], got 1.01"),
    ({"pipeline": [{"temperature": -0.1}]}, "pipeline[0] temperature: must be >= 0, got -0.1"),
    ({"pipeline": [{"top_p": float("nan")}]}, "pipeline[0] top_p: must be a finite number, got nan"),
    ({"pipeline": [{"temperature": float("inf")}]}, "pipeline[0] temperature: must be a finite number, got inf"),
    ({"pipeline": [{"top_k": 2.5}]}, "pipeline[0] top_k"),
    ({"sampler": {"name": "categorical", "seed": -1}}, "sampler categorical.seed: must be"),
    ({"generation": {"max_new_tokens": -1}}, "generation.max_new_tokens: must be >= 0, got -1"),
    ({"generation": {"n": 0}}, "generation.n: must be in [1, 1024], got 0"),
])
def test_located_messages(data, expected):
    msgs, _ = issues(data)
    assert any(m.startswith(expected) for m in msgs), msgs


def test_nan_and_inf_from_yaml_are_rejected():
    for text in ("pipeline:\n  - top_p: .nan\n", "pipeline:\n  - temperature: .inf\n"):
        msgs, _ = issues(parse_yaml(text))
        assert "finite" in msgs[0]


@pytest.mark.parametrize("data, expected", [
    ({"pipeline": [{"top_q": 0.9}]}, "pipeline[0]: unknown processor 'top_q'; did you mean 'top_p'?"),
    ({"pipeline": [{"top_p": {"top_pp": 0.9}}]}, "pipeline[0] top_p.top_pp: unknown parameter 'top_pp'; did you mean 'top_p'?"),
    ({"pipelin": []}, "pipelin: unknown section; did you mean 'pipeline'?"),
    ({"sampler": "categorica"}, "sampler.name: unknown sampler 'categorica'; did you mean 'categorical'?"),
    ({"sampler": {"name": "categorical", "sed": 1}}, "sampler categorical.sed: unknown parameter 'sed'; did you mean 'seed'?"),
    ({"backend": "bigrm"}, "backend.name: unknown backend 'bigrm'; did you mean 'bigram'?"),
    ({"generation": {"max_tokens": 3}}, "generation.max_tokens"),
])
def test_unknown_names_with_did_you_mean(data, expected):
    msgs, _ = issues(data)
    assert any(m.startswith(expected) for m in msgs), msgs


def test_all_errors_are_collected_in_one_config_error():
    msgs, text = issues({"generaton": {}, "pipeline": [{"top_p": 1.5}, {"top_q": 1}, {"temperature": -1}],
                         "sampler": {"name": "categorical", "sed": 1}})
    assert len(msgs) == 5
    assert text.startswith("invalid configuration (5 problems):")
    assert [m.split(":")[0] for m in msgs] == ["generaton", "pipeline[0] top_p", "pipeline[1]", "pipeline[2] temperature",
                                               "sampler categorical.sed"]


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("backend: bigram\npipeline:\n  - top_p: [0.9\nsampler: greedy\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    msg = str(info.value)
    assert str(path) in msg and "YAML syntax error" in msg
    assert info.value.issues[0].location.startswith("line ")
    assert ", column " in info.value.issues[0].location
    with pytest.raises(ConfigError, match=r"line 2, column \d+"):
        parse_yaml("a: 1\n b: 2\n")


def test_top_level_must_be_a_mapping_and_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_yaml("- top_p: 0.9\n")
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")


def test_a_sampler_in_the_pipeline_is_rejected():
    msgs, _ = issues({"pipeline": [{"greedy": {}}]})
    assert msgs == ["pipeline[0]: 'greedy' is a sampler; a pipeline has exactly one sampler, "
                    "set it in the `sampler:` section (sampler: {name: greedy})"]
    msgs, _ = issues({"sampler": "top_p"})
    assert msgs[0].startswith("sampler.name: 'top_p' is a processor")


def test_exactly_one_sampler():
    msgs, _ = issues({"sampler": ["greedy", "categorical"]})
    assert msgs and msgs[0].startswith("sampler")
    cfg = resolve({"pipeline": []}, REGISTRY)
    assert cfg.sampler.name == "categorical"           # absent: the default, never two


def test_same_step_twice_with_different_params():
    cfg = resolve({"pipeline": [{"top_k": 50}, {"temperature": 0.7}, {"top_k": 5}]}, REGISTRY)
    assert [(s.name, s.params.model_dump()) for s in cfg.processors] == [
        ("top_k", {"top_k": 50}), ("temperature", {"temperature": 0.7}), ("top_k", {"top_k": 5})]
    assert cfg.processors[2].location == "pipeline[2] top_k"


def test_pipeline_entry_shapes():
    msgs, _ = issues({"pipeline": [{"top_p": 0.9, "top_k": 3}]})
    assert "exactly one step name" in msgs[0]
    msgs, _ = issues({"pipeline": "top_p"})
    assert msgs[0].startswith("pipeline:")


# -- --set overrides ----------------------------------------------------------------------------

@pytest.mark.parametrize("start, assignment, expected", [
    ({}, "sampler.seed=3", {"sampler": {"seed": 3}}),
    ({"sampler": "greedy"}, "sampler.seed=3", {"sampler": {"name": "greedy", "seed": 3}}),
    ({}, "backend=bigram", {"backend": "bigram"}),
    ({}, 'generation.stop=["\\n", "."]', {"generation": {"stop": ["\n", "."]}}),
    ({}, "pipeline[1].top_p=0.5", {"pipeline": [{"temperature": {"temperature": 0.6}}, {"top_p": 0.5}]}),
    ({"pipeline": [{"top_p": 0.9}]}, "pipeline[0].top_p.top_p=0.3", {"pipeline": [{"top_p": {"top_p": 0.3}}]}),
    ({"pipeline": [{"top_p": 0.9}]}, "pipeline[-1]={min_p: 0.1}", {"pipeline": [{"min_p": 0.1}]}),
    ({}, "pipeline=[]", {"pipeline": []}),
    ({}, "generation.max_new_tokens=7", {"generation": {"max_new_tokens": 7}}),
])
def test_apply_override(start, assignment, expected):
    before = json.dumps(start, sort_keys=True)
    assert apply_override(start, assignment) == expected
    assert json.dumps(start, sort_keys=True) == before           # a new mapping; the input is untouched


def test_override_result_resolves():
    data = apply_override(apply_override({}, "backend=bigram"), "pipeline[1].top_p=0.5")
    cfg = resolve(data, REGISTRY)
    assert cfg.processors[1].params.top_p == 0.5


@pytest.mark.parametrize("assignment, match", [
    ("novalue", "expected KEY=VALUE"),
    ("pipeline[5].top_p=0.5", r"index \[5\] is out of range \(the list has 2 entries\)"),
    ("=3", "empty key"),
    ("generation.stop.x=1", "not inside a mapping"),
    ("generation.stop[1]=x", r"index \[1\] is out of range \(the list has 1 entries\)"),
])
def test_override_errors(assignment, match):
    data = {"generation": {"stop": ["a"]}}
    with pytest.raises(ConfigError, match=match):
        apply_override(data, assignment)


# -- JSON Schema --------------------------------------------------------------------------------

def test_schema_is_valid_json_schema_and_accepts_the_examples():
    jsonschema = pytest.importorskip("jsonschema", reason="validating against the schema needs jsonschema")
    schema = run_config_schema(REGISTRY)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert EXAMPLES
    for path in EXAMPLES:
        errors = list(validator.iter_errors(read_yaml(path)))
        assert not errors, f"{path.name}: {errors[0].message}"
    assert list(validator.iter_errors({"pipeline": [{"top_p": 1.5}]}))
    assert list(validator.iter_errors({"pipelin": []}))


def test_schema_structure_without_jsonschema():
    schema = json.loads(json.dumps(run_config_schema(REGISTRY)))        # JSON-serialisable
    assert schema["$schema"].endswith("2020-12/schema")
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"backend", "pipeline", "sampler", "generation", "plugins", "on_invalid", "preset",
                                         "segments"}
    items = schema["properties"]["pipeline"]["items"]["anyOf"]
    names = {next(iter(v["properties"])) for v in items if v.get("type") == "object"}
    assert names == set(REGISTRY.names("processor"))
    top_p = next(v for v in items if v.get("type") == "object" and "top_p" in v["properties"])
    param_schema = top_p["properties"]["top_p"]["anyOf"][0]["properties"]["top_p"]
    assert param_schema["exclusiveMinimum"] == 0 and param_schema["maximum"] == 1


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_resolve(path):
    cfg = resolve(read_yaml(path), REGISTRY, str(path))     # relative file: paths are read next to the YAML
    assert cfg.sampler is not None


def test_load_pipeline_from_dict_and_path(tmp_path):
    import torch
    pipe = load_pipeline({"pipeline": [{"top_k": 1}], "sampler": "categorical"}, registry=REGISTRY)
    x = torch.tensor([[0.0, 3.0, 1.0]])
    assert pipe.sample(x).tolist() == [1]
    path = tmp_path / "p.yaml"
    path.write_text("pipeline: [{top_k: 1}]\nsampler: greedy\n")
    assert load_pipeline(path, registry=REGISTRY).describe() == "top_k(top_k=1) => greedy()"


def test_docs_state_the_loader_limits():
    """docs/yaml.md's table of limits and the message caps are the code's constants."""
    from samplerkit.config import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, MAX_PIPELINE_STEPS
    from samplerkit.errors import MAX_ISSUES, MAX_VALUE_CHARS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "yaml.md").read_text()
    assert f"| file size | {MAX_CONFIG_BYTES // 2**20} MiB (`MAX_CONFIG_BYTES`) | `the file is larger than {MAX_CONFIG_BYTES:,} bytes" in doc
    assert f"| {MAX_CONFIG_NODES:,} (`MAX_CONFIG_NODES`) | `the document holds more than {MAX_CONFIG_NODES:,} values" in doc
    assert f"| {MAX_CONFIG_DEPTH} levels (`MAX_CONFIG_DEPTH`) | `nested more than {MAX_CONFIG_DEPTH} levels deep`" in doc
    assert f"| {MAX_PIPELINE_STEPS:,} (`MAX_PIPELINE_STEPS`) | `pipeline: has 5,000 steps; at most {MAX_PIPELINE_STEPS:,}" in doc
    assert f"cut to {MAX_VALUE_CHARS} characters" in doc and f"lists at most {MAX_ISSUES} problems" in doc
    with pytest.raises(ConfigError, match=f"pipeline: has 5,000 steps; at most {MAX_PIPELINE_STEPS:,}"):
        resolve({"pipeline": ["top_p"] * 5000}, REGISTRY)


def test_a_lone_surrogate_anywhere_is_a_located_config_error():
    """JSON and Python can carry a lone surrogate ("\\ud800"), which pydantic cannot even word an
    error about: every entry point names where it is instead of crashing."""
    from samplerkit.generate import Generator

    with pytest.raises(ConfigError, match=r"pipeline\[0\]\.top_k\.<key> has a lone surrogate \\ud800"):
        Generator({"backend": "bigram", "pipeline": [{"top_k": {"\ud800": 1}}]})
    gen = Generator({"backend": "bigram"})
    with pytest.raises(ConfigError, match=r"generation\.max_new_tokens has a lone surrogate"):
        gen.generate(["a"], max_new_tokens="\ud800")
    with pytest.raises(ConfigError, match=r"generation\.stop\[0\] has a lone surrogate \\udc00"):
        gen.generate(["a"], stop=["\udc00"])
