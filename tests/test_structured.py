"""Constrained decoding (json_schema, json_object, regex, grammar, choice) on the byte-level
bigram backend: exact masks, per-row constraints, state through compaction and fan-out,
load-time errors, and the exactness of the constrained distribution (chi-square)."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch

import samplerkit
from samplerkit.builtins.backends.bigram import EOS_ID, BigramBackend
from samplerkit.builtins.structured import Constraint, JsonObject, JsonSchema, Regex
from samplerkit.context import StepContext
from samplerkit.errors import ConfigError
from samplerkit.registry import default_registry

pytest.importorskip("llguidance")

ALPHA = 1e-6
# Training text with every character JSON needs, so the bigram model gives them probability.
TEXT = ('{"a": 12, "b": "x"} {"b": "yy", "a": -3, "c": [1, 2.5e3]}\n\n[1, 2, 3] true false null '
        '"hello world" cat car dog 0.5\n\nThe cat sat. The dog ran. A car is red.\n\n')
REGISTRY = default_registry()


def config(pipeline, *, seed=1, max_new_tokens=48, **generation):
    return {"backend": {"name": "bigram", "text": TEXT}, "pipeline": pipeline,
            "sampler": {"name": "categorical", "seed": seed},
            "generation": {"max_new_tokens": max_new_tokens, **generation}}


@pytest.fixture(scope="module")
def backend():
    return BigramBackend(BigramBackend.Params(text=TEXT))


def gen(backend, prompts, cfg, **kw):
    return samplerkit.Generator(cfg, backend=backend).generate(prompts, **kw)


def test_regex_outputs_match_and_stop(backend):
    pattern = r"The (cat|dog|car) [a-z]{2,4}\."
    out = gen(backend, ["x"] * 6, config([{"regex": {"pattern": pattern}}]), seeds=list(range(6)))
    for c in out:
        assert re.fullmatch(pattern, c.text), c.text
        assert c.finish_reason == "stop"            # complete: only EOS was left
    assert len({c.text for c in out}) > 1           # still sampled, not forced to one string


def test_json_schema_per_row_with_fan_out(backend):
    schemas = [
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "yy"]}},
         "required": ["a", "b"], "additionalProperties": False},
        None,
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 3},
        {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
    ]
    rows = [None if s is None else {"json_schema": {"schema": s}} for s in schemas]
    out = gen(backend, ["p0", "p1", "p2", "p3"], config([{"json_schema": {}}], n=3), rows=rows)
    assert len(out) == 12
    for c in out:
        schema = schemas[c.prompt_index]
        if schema is None:
            continue
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), schema)
    free = [c.text for c in out if c.prompt_index == 1]
    assert any(not _is_json(t) for t in free)       # the row without a schema is not constrained
    # The n samples of a constrained prompt advance independently (different texts).
    assert len({c.text for c in out if c.prompt_index == 0}) > 1


def _is_json(text):
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_choice_grammar_and_gbnf(backend):
    out = gen(backend, ["a"] * 8, config([{"choice": {"options": ["cat", "car", "dog"]}}]), seeds=list(range(8)))
    assert {c.text for c in out} <= {"cat", "car", "dog"}
    lark = 'start: item (" and " item)?\nitem: "cat" | "dog"'
    out = gen(backend, ["a"] * 4, config([{"grammar": {"lark": lark}}], max_new_tokens=24), seeds=list(range(4)))
    for c in out:
        assert re.fullmatch(r"(cat|dog)( and (cat|dog))?", c.text) and c.finish_reason == "stop", c
    gbnf = 'root ::= "The " animal "."\nanimal ::= "cat" | "dog"'
    out = gen(backend, ["a"] * 4, config([{"grammar": {"gbnf": gbnf}}]), seeds=list(range(4)))
    assert {c.text for c in out} <= {"The cat.", "The dog."} and all(c.finish_reason == "stop" for c in out)


def test_json_object_and_compact_whitespace(backend):
    out = gen(backend, ["a"] * 4, config([{"json_object": {"whitespace_flexible": False}}], max_new_tokens=200),
              seeds=list(range(4)))
    for c in out:
        if c.finish_reason == "stop":
            value = json.loads(c.text)
            assert isinstance(value, dict)
            # Compact: no whitespace outside strings.
            assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', c.text)), c.text


def _ctx(batch, backend):
    return StepContext(batch, 258, uses=frozenset({"generated"}), max_new_tokens=16,
                       token_vocabulary=backend.token_vocabulary)


def _allowed(step, ctx):
    out = step.apply(torch.zeros(step.batch_size, 258), ctx)
    return [set(torch.isfinite(row).nonzero().squeeze(-1).tolist()) for row in out]


def test_mask_is_exact_and_eos_only_when_complete(backend):
    step = Regex([Regex.Params(pattern="ca(t|r)s?")])
    ctx = _ctx(1, backend)
    seen = []
    for text in ["", "c", "ca", "cat", "cats"]:
        seen.append(_allowed(step, ctx)[0])
        if text != "cats":
            ctx.append(torch.tensor([ord("cats"[len(text)])]))
    assert seen[0] == {ord("c")}
    assert seen[1] == {ord("a")}
    assert seen[2] == {ord("t"), ord("r")}
    assert seen[3] == {ord("s"), EOS_ID}        # "cat" is complete: EOS or one more "s"
    assert seen[4] == {EOS_ID}                  # nothing can follow "cats": only EOS


def test_state_follows_rows_through_select_rows(backend):
    pipe = samplerkit.load_pipeline({"pipeline": [{"regex": {}}], "sampler": "greedy"}, registry=REGISTRY)
    bound = pipe.bind([{"regex": {"pattern": "ab(c|d)"}}, {"regex": {"pattern": "xy(z|w)"}}])
    ctx = _ctx(2, backend)
    bound.process(torch.zeros(2, 258), ctx)
    ctx.append(torch.tensor([ord("a"), ord("x")]))
    bound.process(torch.zeros(2, 258), ctx)
    ctx.append(torch.tensor([ord("b"), ord("y")]))
    # Drop row 0 and duplicate row 1: the copies keep row 1's matcher and then diverge.
    before = bound.steps[0][1]._matchers[1]
    keep = [1, 1]
    bound = bound.select_rows(keep)
    ctx.select_rows(keep)
    step = bound.steps[0][1]
    # Handed over (follow_rows), not rebuilt and replayed: the first keeps the object, the repeat a copy.
    assert step._matchers[0] is before and step._matchers[1] is not before
    assert _allowed(step, ctx) == [{ord("z"), ord("w")}] * 2
    ctx.append(torch.tensor([ord("z"), ord("w")]))
    assert _allowed(step, ctx) == [{EOS_ID}, {EOS_ID}]
    assert step._consumed == [3, 3]


def test_unconstrained_rows_are_untouched(backend):
    step = Regex([Regex.Params(pattern="a"), Regex.Params()])
    logits = torch.randn(2, 258)
    out = step.apply(logits.clone(), _ctx(2, backend))
    assert torch.equal(out[1], logits[1])
    assert torch.isfinite(out[0]).sum() == 1


@pytest.mark.parametrize("step, params, words", [
    ("json_schema", {"schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "not": {}}},
     ["pipeline[0] json_schema", "invalid json schema", "not"]),
    ("json_schema", {"schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}},
     ["pipeline[0] json_schema", "missing"]),
    ("regex", {"pattern": "a["}, ["pipeline[0] regex", "invalid regex", "unclosed character class"]),
    ("grammar", {"lark": "start: foo"}, ["pipeline[0] grammar", "invalid lark", "foo"]),
    ("grammar", {"gbnf": "root ::= ("}, ["pipeline[0] grammar", "invalid gbnf"]),
    ("grammar", {"lark": 'start: "a"', "gbnf": 'root ::= "a"'}, ["either lark or gbnf"]),
    ("choice", {"options": ["a", ""]}, ["options[1]", "empty string"]),
    ("json_schema", {"file": "/nonexistent/schema.json"}, ["cannot read the schema file", "/nonexistent/schema.json"]),
])
def test_bad_constraints_are_config_errors_at_load_time(step, params, words):
    with pytest.raises(ConfigError) as info:
        samplerkit.load_pipeline({"pipeline": [{step: params}], "sampler": "greedy"}, registry=REGISTRY)
    text = str(info.value)
    for word in words:
        assert word in text, text


def test_bad_row_override_is_named_before_generation(backend):
    with pytest.raises(ConfigError, match=r"rows\[1\] regex.*invalid regex"):
        gen(backend, ["a", "b"], config([{"regex": {}}]), rows=[None, {"regex": {"pattern": "(("}}])


def test_schema_file(tmp_path, backend):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"enum": ["cat", "dog"]}))
    out = gen(backend, ["a"] * 3, config([{"json_schema": {"file": str(path)}}]), seeds=[1, 2, 3])
    assert {json.loads(c.text) for c in out} <= {"cat", "dog"}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        samplerkit.load_pipeline({"pipeline": [{"json_schema": {"file": str(tmp_path / "bad.json")}}],
                                  "sampler": "greedy"}, registry=REGISTRY)


def test_steps_declare_constrains():
    for name in ("json_schema", "json_object", "regex", "grammar", "choice"):
        cls = REGISTRY.get("processor", name)
        assert cls.constrains is True and cls.needs_vocabulary is True and issubclass(cls, Constraint)
    assert JsonSchema.Params().is_neutral() and Regex.Params().is_neutral()


def chi2_sf(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_constrained_distribution_is_exact(backend):
    """Tokens drawn after the mask follow ``p_i / sum_{j in A} p_j`` on the allowed set A."""
    draws = 6000
    pattern = "(a|e|o|t|s|h|r|n| )x"          # first token: one of nine bytes
    pipe = samplerkit.load_pipeline({"pipeline": [{"regex": {"pattern": pattern}}],
                                     "sampler": {"name": "categorical", "seed": 5}}, registry=REGISTRY)
    bound = pipe.bind(draws, seeds=list(range(draws)))
    logits = backend.table[ord("c")].unsqueeze(0).expand(draws, -1).contiguous()   # P(next | "c")
    ids = bound.sample(logits, _ctx(draws, backend))
    allowed = [ord(ch) for ch in "aeotshrn "]
    assert set(ids.tolist()) <= set(allowed)
    p = torch.softmax(backend.table[ord("c")].double()[allowed], dim=0)
    counts = torch.bincount(ids, minlength=258)[allowed].double()
    expected = p * draws
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert chi2_sf(stat, len(allowed) - 1) > ALPHA, (counts.tolist(), expected.tolist())
    assert math.isclose(float(p.sum()), 1.0)


CONSTRAINTS = [c for c in REGISTRY.entries("processor") if getattr(c.cls, "needs_vocabulary", False)]


@pytest.mark.parametrize("entry", CONSTRAINTS, ids=lambda e: e.name)
def test_constraint_contract(entry, backend):
    """The processor contract (samplerkit.testing.check_processor) for the constrained steps, with
    a tokenizer: neutral rows are the identity, a row's mask does not depend on its batch or
    position, the pipeline leaves the caller's logits alone, nothing but -inf is written."""
    cls = entry.cls
    examples = [cls.Params(**e) for e in cls.contract_examples()]
    assert examples and not any(p.is_neutral() for p in examples)
    neutral = cls.Params(enabled=False) if cls is JsonObject else cls.Params()
    assert neutral.is_neutral()
    logits = torch.randn(4, 258, generator=torch.Generator().manual_seed(0)) * 3
    rows = [examples[0], neutral, examples[-1], neutral]
    mixed = cls(rows).apply(logits.clone(), _ctx(4, backend))
    flipped = cls(rows[::-1]).apply(logits.flip(0).clone(), _ctx(4, backend)).flip(0)
    for i, p in enumerate(rows):
        alone = cls([p]).apply(logits[i:i + 1].clone(), _ctx(1, backend))
        assert torch.equal(mixed[i:i + 1], alone) and torch.equal(flipped[i:i + 1], alone)
        if p.is_neutral():
            assert torch.equal(mixed[i], logits[i])
        else:
            kept = torch.isfinite(mixed[i])
            assert 0 < int(kept.sum()) < 258 and torch.equal(mixed[i][kept], logits[i][kept])
    assert not mixed.isnan().any()
    pipe = samplerkit.load_pipeline({"pipeline": [{cls.name: examples[0].model_dump(by_alias=True)}],
                                     "sampler": "greedy"}, registry=REGISTRY)
    caller = logits.clone()
    processed = pipe.bind(4).process(caller, _ctx(4, backend))
    assert torch.equal(caller, logits)
    assert torch.equal(processed, cls([examples[0]] * 4).apply(logits.clone(), _ctx(4, backend)))


def _cli(args, capsys):
    from samplerkit.cli import main

    bigram = ["--set", "backend.name=bigram", "--set", f"backend.text={json.dumps(TEXT)}"]
    code = main(["generate", *bigram, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_schema_and_regex_shortcuts(tmp_path, capsys):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["a"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    code, out, _ = _cli(["--json", "--json-schema", str(path), "--seed", "3", "The "], capsys)
    assert code == 0
    completion = json.loads(out)
    jsonschema.validate(json.loads(completion["text"]), schema)
    assert completion["finish_reason"] == "stop"
    code, out, _ = _cli(["--json", "--regex", "(cat|dog)s?", "The "], capsys)
    assert code == 0 and re.fullmatch("(cat|dog)s?", json.loads(out)["text"])


@pytest.mark.parametrize("args, words", [
    (["--regex", "a["], ["pipeline[0] regex", "unclosed character class"]),
    (["--json-schema", "/nonexistent/s.json"], ["pipeline[0] json_schema", "cannot read the schema file"]),
])
def test_cli_bad_constraint_exits_2_without_traceback(args, words, capsys):
    code, _, err = _cli([*args, "The "], capsys)
    assert code == 2 and "Traceback" not in err
    for word in words:
        assert word in err, err


def test_batch_lines_carry_their_own_constraints(tmp_path):
    from samplerkit.batch import run_batch
    from samplerkit.generate import load_config

    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2}
    lines = [{"id": "json", "prompt": "a", "seed": 1, "params": {"json_schema": {"schema": schema}}},
             {"id": "regex", "prompt": "b", "seed": 2, "params": {"regex": {"pattern": "(cat|dog)"}},
              "generation": {"n": 2}},
             {"id": "free", "prompt": "c", "seed": 3},
             {"id": "bad", "prompt": "d", "params": {"regex": {"pattern": "(("}}}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_config, _ = load_config(config([{"json_schema": {}}, {"regex": {}}], max_new_tokens=24))
    summary = run_batch(run_config, src, tmp_path / "out.jsonl", batch_size=8, progress=False)
    rows = {(r["id"], r["sample"]): r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    jsonschema.validate(json.loads(rows["json", 0]["text"]), schema)
    assert {rows["regex", 0]["text"], rows["regex", 1]["text"]} <= {"cat", "dog"}
    assert ("free", 0) in rows and ("bad", 0) not in rows
    errors = (tmp_path / "out.jsonl.errors.jsonl").read_text()
    assert "params regex" in errors and "invalid regex" in errors
    assert summary is not None


def _export(pipeline, sampler="categorical"):
    from samplerkit.export import export_llamacpp
    from samplerkit.generate import load_config

    return export_llamacpp(load_config({"backend": {"name": "bigram"}, "pipeline": pipeline, "sampler": sampler})[0])


def test_export_llamacpp_emits_json_schema_and_grammar(tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    out = _export([{"json_schema": {"schema": schema}}, {"temperature": 0.7}])
    assert out.args[out.args.index("--json-schema") + 1] == json.dumps(schema, separators=(",", ":"))
    assert any("json-schema-to-grammar" in note for note in out.notes)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(schema))
    out = _export([{"json_schema": {"file": str(path)}}], "greedy")
    assert json.loads(out.args[out.args.index("--json-schema") + 1]) == schema
    out = _export([{"grammar": {"gbnf": 'root ::= "x" | "y"'}}, {"repetition_penalty": {"repetition_penalty": 1.1, "last_n": 64}}])
    assert out.args[out.args.index("--grammar") + 1] == 'root ::= "x" | "y"'
    out = _export([{"choice": {"options": ["a", 'say "hi"']}}])
    assert out.args[out.args.index("--grammar") + 1] == 'root ::= "a" | "say \\"hi\\""'


@pytest.mark.parametrize("pipeline, words", [
    ([{"regex": {"pattern": "a+"}}], ["pipeline[0] regex", "no exact GBNF form"]),
    ([{"grammar": {"lark": 'start: "a"'}}], ["pipeline[0] grammar", "Lark"]),
    ([{"top_k": 5}, {"json_schema": {"schema": {"type": "object"}}}], ["pipeline[1] json_schema", "first step"]),
    ([{"json_schema": {"schema": {"type": "object"}}}, {"top_p": 0.9}], ["after its sampler chain", "top_p"]),
    ([{"choice": {"options": ["a"]}}, {"regex": {"pattern": "a"}}], ["one grammar"]),
])
def test_export_refuses_what_llamacpp_runs_differently(pipeline, words):
    with pytest.raises(ConfigError) as info:
        _export(pipeline)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_properties_come_in_schema_order(backend):
    schema = {"type": "object", "properties": {"b": {"enum": ["x"]}, "a": {"enum": ["yy"]}}, "required": ["b", "a"],
              "additionalProperties": False}
    (c,) = gen(backend, ["a"], config([{"json_schema": {"schema": schema, "whitespace_flexible": False}}]))
    assert c.text == '{"b":"x","a":"yy"}'


def test_a_backend_without_a_vocabulary_is_named():
    from samplerkit.backend import Backend

    class NoVocabulary(BigramBackend):
        token_vocabulary = Backend.token_vocabulary         # the base class's: not described

    with pytest.raises(samplerkit.SamplerkitError, match="does not describe its tokenizer"):
        gen(NoVocabulary(BigramBackend.Params(text=TEXT)), ["a"], config([{"regex": {"pattern": "a"}}]))


def test_ignore_eos_after_a_complete_constraint_keeps_emitting_eos(backend):
    """With ignore_eos the row goes on after its text is complete: only EOS is allowed, so the
    text stays the complete one and the row ends at max_new_tokens."""
    (c,) = gen(backend, ["x"], config([{"regex": {"pattern": "The"}}], max_new_tokens=6, ignore_eos=True))
    assert c.text == "The" and c.token_ids == [*b"The", EOS_ID, EOS_ID, EOS_ID] and c.finish_reason == "length"


def test_a_token_the_mask_removed_is_named(backend):
    step = Regex([Regex.Params(pattern="ab")])
    ctx = _ctx(1, backend)
    step.apply(torch.zeros(1, 258), ctx)
    ctx.append(torch.tensor([ord("z")]))         # as if a later step had picked a removed token
    with pytest.raises(samplerkit.SamplerkitError, match=r"row 0 accepted token\(s\) \[122\]") as info:
        step.apply(torch.zeros(1, 258), ctx)
    assert "<state>" not in str(info.value)


F32_MAX = float(torch.finfo(torch.float32).max)


@pytest.mark.parametrize("kind", ["extreme", "inference", "strided", "grad"])
def test_constraints_on_extreme_logits_and_tensor_kinds(kind, backend):
    """Extreme finite logits and unusual tensors (inference mode, strided views, a graph leaf):
    the kept logits come out as they went in, everything else is -inf, no NaN."""
    base = torch.randn(3, 258, generator=torch.Generator().manual_seed(1)) * 5
    if kind == "extreme":
        base[0] = F32_MAX
        base[1, ::2] = -F32_MAX
        base[2, :100] = float("-inf")
    logits = {"extreme": base, "inference": None, "strided": torch.randn(258, 6)[:, ::2].t(),
              "grad": base.clone().requires_grad_(True)}[kind]
    pipe = samplerkit.load_pipeline({"pipeline": [{"regex": {"pattern": "[a-z]{2}"}}], "sampler": "greedy"},
                                    registry=REGISTRY)
    if kind == "inference":
        with torch.inference_mode():
            logits = base.clone()
            out = pipe.bind(3).sample(logits, _ctx(3, backend))
            processed = pipe.bind(3).process(logits, _ctx(3, backend))
    else:
        out = pipe.bind(3).sample(logits, _ctx(3, backend))
        processed = pipe.bind(3).process(logits.detach(), _ctx(3, backend))
    source = logits.detach()
    allowed = torch.zeros(258, dtype=torch.bool)
    allowed[ord("a"):ord("z") + 1] = True
    assert not processed.isnan().any()
    assert torch.equal(processed[:, allowed], source[:, allowed])
    assert bool((processed[:, ~allowed] == float("-inf")).all())
    assert all(ord("a") <= t <= ord("z") for t in out.tolist())
