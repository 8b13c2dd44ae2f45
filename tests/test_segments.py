"""Segment-aware pipelines (``segments:``, docs/segments.md) on the byte-level bigram backend:
switching on each row's own text, budgets that force the closing string, constrained segments
that close the segment instead of the row, per-row reproducibility in mixed batches, and the
located errors. The default model's checks are in tests/real_model/test_segments_model.py."""

from __future__ import annotations

import json
import re

import pytest

import samplerkit
from samplerkit.builtins.backends.bigram import BigramBackend
from samplerkit.cli import main
from samplerkit.errors import ConfigError
from samplerkit.generate import load_config
from samplerkit.registry import default_registry
from samplerkit.segments import Segment, SegmentState, closing_overrun, overlap

pytest.importorskip("llguidance")

TEXT = ('{"a": 12, "b": "x"} {"b": "yy", "a": -3, "c": [1, 2.5e3]}\n\n[1, 2, 3] true false null '
        '"hello world" cat car dog 0.5\n\nThe cat sat. The dog ran. A car is red.\n\n')
REGISTRY = default_registry()
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}


def config(segments, *, seed=1, max_new_tokens=60, pipeline=None, **generation):
    return {"backend": {"name": "bigram", "text": TEXT}, "pipeline": pipeline or [{"temperature": 1.0}],
            "sampler": {"name": "categorical", "seed": seed},
            "generation": {"max_new_tokens": max_new_tokens, **generation}, "segments": segments}


@pytest.fixture(scope="module")
def backend():
    return BigramBackend(BigramBackend.Params(text=TEXT))


def gen(backend, cfg):
    return samplerkit.Generator(cfg, backend=backend, registry=REGISTRY)


# -- switching ------------------------------------------------------------------------------

def test_think_then_json_shape(backend):
    """Free text until ".", then a JSON schema: the text after the first "." validates and the
    row ends when the JSON is complete (the last segment has no `until`)."""
    jsonschema = pytest.importorskip("jsonschema")
    g = gen(backend, config([{"until": ".", "max_tokens": 20, "pipeline": [{"min_tokens": 1000}, {"temperature": 1.5}]},
                             {"json_schema": {"schema": SCHEMA, "whitespace_flexible": False},
                              "pipeline": [{"temperature": 0.7}]}]))
    out = g.generate(["The"] * 6, seeds=list(range(6)))
    for c in out:
        think, sep, answer = c.text.partition(".")
        assert sep, c.text
        jsonschema.validate(json.loads(answer), SCHEMA)
        assert c.finish_reason == "stop"
    assert len({c.text for c in out}) > 1


def test_budget_forces_the_closing_string_and_marks_the_tokens(backend):
    g = gen(backend, config([{"until": "XYZ", "max_tokens": 3}], logprobs=1))
    (c,) = g.generate(["The"], seeds=[5])
    assert "XYZ" not in c.text[:3] and c.text[3:6] == "XYZ"
    assert [lp.forced for lp in c.logprobs[:7]] == [False, False, False, True, True, True, False]
    for lp in c.logprobs[3:6]:
        assert lp.processed_logprob is None and lp.logprob < 0 and len(lp.top) == 1
    assert c.token_ids[3:6] == list(b"XYZ")


def test_budget_forcing_completes_a_closing_string_the_row_began(backend):
    """A row whose text already ends with the start of `until` gets only the rest forced."""
    state = SegmentState([Segment((), None, "</think>", 4, "segments[0]")], lambda t: list(t.encode()))
    assert [state.feed(ch) for ch in "ab</"] == [None, None, None, "force"]
    assert bytes(state.forcing) == b"think>"
    assert overlap("xx</th", "</think>") == 4 and overlap("abc", "</think>") == 0


def test_a_segment_without_until_that_spends_its_budget_ends_the_row(backend):
    g = gen(backend, config([{"max_tokens": 4, "pipeline": [{"temperature": 2.0}]}], ignore_eos=True))
    (c,) = g.generate(["The"], seeds=[1])
    assert len(c.token_ids) == 4 and c.finish_reason == "length"


def test_after_the_last_segment_the_top_level_pipeline_runs(backend):
    """A greedy top level after a hot segment: the tail equals greedy decoding from there."""
    cfg = config([{"until": " ", "pipeline": [{"temperature": 3.0}], "max_tokens": 6}], max_new_tokens=20,
                 ignore_eos=True)
    cfg["sampler"] = "greedy"
    cfg["segments"][0]["sampler"] = {"name": "categorical", "seed": 9}
    (c,) = gen(backend, cfg).generate(["The"])
    head, sep, tail = c.text.partition(" ")
    assert sep
    greedy = gen(backend, {**cfg, "segments": None, "generation": {"max_new_tokens": len(tail.encode()),
                                                                  "ignore_eos": True}})
    assert greedy.generate(["The" + head + " "])[0].text == tail


def test_constrained_segment_completes_then_forces_until_and_the_next_segment_runs(backend):
    """A regex segment with `until`: its grammar's completion closes the segment (not the row),
    the closing string is forced, and a second constraint starts fresh after it."""
    g = gen(backend, config([{"regex": {"pattern": "(cat|dog)"}, "until": ";"},
                             {"regex": {"pattern": "[0-9]{2}"}}], logprobs=0))
    out = g.generate(["The"] * 4, seeds=[1, 2, 3, 4])
    for c in out:
        assert re.fullmatch(r"(cat|dog);[0-9]{2}", c.text), c.text
        assert c.finish_reason == "stop"
        assert [lp.forced for lp in c.logprobs] == [False, False, False, True, False, False]


def test_after_on_the_first_segment_runs_the_top_level_until_the_trigger(backend):
    """Lazy grammar: the top-level pipeline until "a", then a regex (then the row ends)."""
    cfg = config([{"after": "a", "regex": {"pattern": "[0-9]{3}"}}], max_new_tokens=200,
                 pipeline=[{"min_tokens": 1000}])
    out = gen(backend, cfg).generate(["The"] * 3, seeds=[1, 2, 3])
    for c in out:
        head, sep, tail = c.text.partition("a")
        assert sep and re.fullmatch("[0-9]{3}", tail), c.text


# -- rows in different segments -------------------------------------------------------------

def test_each_seeded_row_alone_equals_the_row_in_a_mixed_batch(backend):
    """Rows switch on their own text, so one batch holds rows in different segments (and rows
    with their own pipelines); each seeded row is the same as when run alone."""
    segs = [{"until": ".", "max_tokens": 8, "pipeline": [{"min_tokens": 99}, {"temperature": 1.5}]},
            {"json_schema": {"schema": SCHEMA}, "until": "\n"},
            {"until": "dog", "max_tokens": 5, "pipeline": [{"top_k": 5}]}]
    g = gen(backend, config(segs))
    prompts = ["x", "The cat", "a", "{", "The"]
    seeds = [1, 2, 3, 4, 5]
    pipelines = [None, None, {"pipeline": [{"temperature": 0.5}]}, None, None]
    batch = g.generate(prompts, seeds=seeds, pipelines=pipelines, n=2)
    for c in batch:
        i = c.prompt_index
        alone = g.generate([prompts[i]], seeds=[seeds[i]], pipelines=[pipelines[i]], n=2)[c.sample_index]
        assert (alone.text, alone.token_ids, alone.finish_reason) == (c.text, c.token_ids, c.finish_reason)
    assert all("." in c.text for c in batch if pipelines[c.prompt_index] is None)   # every segmented row moved on
    assert len({c.text for c in batch if c.prompt_index == 0}) == 2   # n samples differ


def test_stop_strings_max_new_tokens_and_rows_overrides_keep_working(backend):
    segs = [{"until": "XYZ", "max_tokens": 3, "pipeline": [{"temperature": 1.0}]}]
    g = gen(backend, config(segs, max_new_tokens=5, ignore_eos=True))
    (c,) = g.generate(["The"], seeds=[5])
    assert c.text.endswith("XY") and c.finish_reason == "length"    # the budget ends the row mid-forcing
    (c,) = g.generate(["The"], seeds=[5], stop=["Y"])
    assert c.text.endswith("X") and c.finish_reason == "stop"        # a stop string inside forced text
    cold = g.generate(["The"] * 2, seeds=[5, 5], rows=[{"temperature": {"temperature": 0.01}}, None])
    assert cold[0].text != cold[1].text
    with pytest.raises(ConfigError, match=r"rows\[0\].*'top_p'"):
        g.generate(["The"], rows=[{"top_p": {"top_p": 0.5}}])


def test_logprob_taps_with_segments(backend):
    g = gen(backend, config([{"until": ".", "max_tokens": 4, "pipeline": [{"top_k": 3}]}],
                            pipeline=[{"top_k": 9}], logprobs={"top": 1, "at": ["input", "top_k"]}))
    (c,) = g.generate(["The"], seeds=[2])
    assert all(set(lp.taps) == {"input", "top_k"} for lp in c.logprobs if not lp.forced)
    with pytest.raises(ConfigError, match=r"generation\.logprobs\.at \(segments\[0\]\)\[1\]"):
        gen(backend, config([{"until": ".", "pipeline": [{"temperature": 1.0}]}], pipeline=[{"top_k": 9}],
                            logprobs={"top": 1, "at": ["input", "top_k"]}))


# -- a closing string inside a token ----------------------------------------------------------

def test_text_after_the_closing_string_in_the_same_token_opens_the_next_segment():
    segs = [Segment((), None, "</think>", None, "segments[0]"), Segment((), None, "END", None, "segments[1]")]
    state = SegmentState(segs, lambda t: [])
    assert state.feed("so</thi") is None
    assert state.feed("nk>\n{E") == "switch"
    assert (state.phase, state.text) == (1, "\n{E")
    assert state.feed("ND!") == "switch" and (state.phase, state.text) == (2, "")


def test_closing_overrun_lists_the_tokens_that_write_past_the_closing_string():
    tokens = [b"</", b"think>", b"think>\n", b"</think>", b"</think>{", b"x</think>", b"a", b"nk>!"]
    found = dict(closing_overrun(tokens, "</think>"))
    assert found[b""] == {4}                      # contains the whole string and more
    assert found[b"</"] == {2}                    # completes it from "</" and goes on
    assert found[b"</thi"] == {7}
    assert all(3 not in ids and 5 not in ids for ids in found.values())   # ending exactly is fine


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("segments", "where"), [
    ([], r"segments: is empty"),
    ([{"untl": "x"}], r"segments\[0\] untl: unknown segment key; did you mean 'until'"),
    ([{"until": ""}], r"segments\[0\]\.until: must be a non-empty string"),
    ([{"max_tokens": 0}], r"segments\[0\]\.max_tokens: must be an integer >= 1"),
    ([{"max_tokens": True}], r"segments\[0\]\.max_tokens"),
    ([{"regex": {"pattern": "a"}, "pipeline": [{"regex": {"pattern": "b"}}]}],
     r"segments\[0\] regex: is given both as a segment key and in segments\[0\]\.pipeline"),
    ([{"until": "a"}, {"after": "b"}], r"segments\[1\]\.after: 'b' differs from segments\[0\]\.until 'a'"),
    ([{"max_tokens": 3}, {}], r"segments\[0\]: needs `until`"),
    ([{"until": "x", "pipeline": [{"top_p": 2}]}], r"segments\[0\] pipeline\[0\] top_p: must be in \(0, 1\]"),
    ([{"until": "x", "sampler": "nope"}], r"segments\[0\] sampler\.name: unknown sampler 'nope'"),
    ([{"until": "x", "json_schema": {"schema": {"type": "nope"}}}], r"segments\[0\] json_schema:"),
    ("x", r"segments: input should be a valid list"),
])
def test_bad_segments_are_located_config_errors(segments, where):
    with pytest.raises(ConfigError, match=where):
        load_config(config(segments), REGISTRY)


def test_a_row_pipeline_cannot_carry_segments(backend):
    g = gen(backend, config([{"until": "."}]))
    with pytest.raises(ConfigError, match=r"pipelines\[1\]: 'segments' cannot be set per row"):
        g.generate(["a", "b"], pipelines=[None, {"segments": [{"until": "."}]}])


def test_cli_generate_validate_lint_and_explain_with_segments(tmp_path, capsys):
    path = tmp_path / "seg.yaml"
    path.write_text(json.dumps(config([{"until": ".", "max_tokens": 4, "pipeline": [{"top_k": 1}]},
                                       {"regex": {"pattern": "[0-9]{2}"}}], max_new_tokens=12)))
    assert main(["generate", "The", "--config", str(path), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\.[0-9]{2}$", out.strip()) or re.search(r"^.{4}\.[0-9]{2}", out.strip()), out
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "segments[0]: top_k(top_k=1) => categorical(seed=1), until: '.', max_tokens: 4" in out
    assert "segments[1]: regex(pattern='[0-9]{2}') -> temperature(temperature=1.0)" in out
    assert main(["lint", str(path)]) == 0
    out = capsys.readouterr().out          # each segment's pipeline is linted, located
    assert "segments[0] sampler categorical: draws at random, but segments[0] pipeline[0] top_k leaves one" in out
    assert main(["explain", "The", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "traces the first one's pipeline (segments[0])" in captured.err and "top_k" in captured.out
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(config([{"until": "", "pipeline": [{"top_k": 0.5}]}])))
    for verb in (["generate", "x", "--config", str(bad)], ["validate", str(bad)], ["lint", str(bad)]):
        assert main(verb) == 2
        err = capsys.readouterr().err
        assert "segments[0].until" in err and "Traceback" not in err
    assert main(["verify", str(path), "--no-model"]) == 2           # never verifies the top level alone
    assert "segments: verify checks one pipeline" in capsys.readouterr().err


def test_engine_requests_with_segments_equal_generate(backend):
    """Through the continuous-batching Engine, requests joining at different steps (so rows in
    different segments share steps) give what Generator.generate gives each alone."""
    from samplerkit.engine import Engine

    segs = [{"until": " ", "max_tokens": 5, "pipeline": [{"temperature": 1.5}]},
            {"regex": {"pattern": "(cat|dog)"}, "until": ";"}, {"until": ".", "max_tokens": 4}]
    g = gen(backend, config(segs, max_new_tokens=30))
    prompts = ["The", "A car", "x", "{"]
    ref = [g.generate([p], seeds=[7 + i])[0] for i, p in enumerate(prompts)]
    engine = Engine(g, max_rows=3)
    reqs = [engine.submit(prompts[0], seed=7)]
    engine.step()
    engine.step()
    reqs += [engine.submit(p, seed=7 + i) for i, p in enumerate(prompts) if i]
    engine.run_until_idle()
    for r, c in zip(reqs, ref):
        assert (r.result()[0].text, r.result()[0].token_ids) == (c.text, c.token_ids)
    assert any(";" in c.text for c in ref)


def test_the_library_example_of_docs_segments_prints_what_the_page_shows(capsys):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "segments.md").read_text(encoding="utf-8")
    code, shown = re.search(r"```python\n(.*?)```\n\n```\n(.*?)```", page, flags=re.S).groups()
    exec(compile(code, "docs/segments.md", "exec"), {})
    assert capsys.readouterr().out == shown


def test_a_constrained_segment_closes_on_completion_with_ignore_eos_too(backend):
    g = gen(backend, config([{"regex": {"pattern": "(cat|dog)"}, "until": ";"}, {"max_tokens": 3}], ignore_eos=True))
    (c,) = g.generate(["The"], seeds=[1])
    assert re.fullmatch(r"(cat|dog);...", c.text, flags=re.S) and c.finish_reason == "length", c.text


def test_the_editor_schema_knows_segments():
    jsonschema = pytest.importorskip("jsonschema")
    from samplerkit.schema import run_config_schema

    validator = jsonschema.Draft202012Validator(run_config_schema(REGISTRY))
    good = {"segments": [{"until": "</think>", "max_tokens": 8, "pipeline": [{"temperature": 0.8}]},
                         {"json_schema": {"schema": {"type": "object"}}, "sampler": "greedy"}]}
    assert not list(validator.iter_errors(good))
    for bad in ([], [{"untl": "x"}], [{"until": ""}], [{"max_tokens": 0}], [{"top_p": 0.5}]):
        assert list(validator.iter_errors({"segments": bad})), bad


def test_batch_jobs_run_segments_and_a_line_equals_generate(tmp_path, backend, capsys):
    segs = [{"until": ";", "max_tokens": 4}, {"regex": {"pattern": "(cat|dog)"}}]
    cfg = config(segs, max_new_tokens=12)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "The", "seed": 4}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["batch", "--config", str(path), "--input", str(src), "--output", str(out)]) == 0, capsys.readouterr().err
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert re.fullmatch(r"[^;]{0,4};(cat|dog)", row["text"]), row["text"]
    assert row["text"] == gen(backend, cfg).generate(["The"], seeds=[4])[0].text


def test_seeds_reach_the_segments_that_draw_and_skip_a_greedy_one(backend):
    cfg = config([{"until": " ", "max_tokens": 4, "sampler": "greedy"}, {"max_tokens": 6}], ignore_eos=True)
    g = gen(backend, cfg)
    a, b, c = g.generate(["The"] * 3, seeds=[1, 1, 2])
    assert a.text == b.text and a.text.split(" ")[0] == c.text.split(" ")[0]   # greedy head: seed-free
    assert a.text != c.text                                                     # the drawing tail follows the seed


def test_serve_runs_the_servers_segments_for_requests_that_name_no_pipeline():
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from samplerkit.serve.command import build, running, server_config
    from samplerkit.serve.protocol import Limits

    segs = '[{until: ";", max_tokens: 4}, {regex: {pattern: "(cat|dog)"}}]'
    config, registry = server_config(None, ["backend=bigram", "generation.max_new_tokens=12", f"segments={segs}"])
    ref = samplerkit.Generator(config, registry=registry).generate(["The "], seeds=[4])[0].text
    with running(build(config, registry, Limits(max_rows=4, max_tokens=64))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        text = client.completions.create(model="bigram", prompt="The ", seed=4).choices[0].text
    assert text == ref and re.fullmatch(r"[^;]{0,4};(cat|dog)", text), text


def test_export_to_llamacpp_refuses_segments():
    from samplerkit.export import export_llamacpp

    cfg = load_config(config([{"until": ".", "pipeline": [{"temperature": 0.5}]}]), REGISTRY)[0]
    with pytest.raises(ConfigError, match=r"segments: llama.cpp samples every token with one chain"):
        export_llamacpp(cfg)


def test_compare_refuses_configs_with_segments(backend):
    from samplerkit.compare import compare

    plain = config([{"until": "."}])
    plain.pop("segments")
    with pytest.raises(ConfigError, match=r"segments: config B has segments"):
        compare(plain, config([{"until": "."}]), "The", backend=backend)


def test_every_step_that_declares_completes_is_a_grammar_and_a_segment_key():
    """The shorthand keys come from what steps declare, never from a list of names."""
    completes = {e.name for e in REGISTRY.entries("processor") if getattr(e.cls, "completes", False)}
    assert completes >= {"json_schema", "json_object", "regex", "grammar", "choice"}
    assert all(REGISTRY.entry("processor", n).cls.constrains for n in completes)
    assert not REGISTRY.entry("processor", "min_tokens").cls.completes   # constrains, never completes


def test_batch_line_params_and_seed_may_address_a_segments_steps(tmp_path, backend, capsys):
    """A batch line's ``params`` may name a step that only a segment has (as ``rows=`` may), and
    the line equals ``generate(rows=...)``; a name in no pipeline is still a located error."""
    segs = [{"until": " ", "max_tokens": 6, "pipeline": [{"top_k": 40}, {"temperature": 1.0}]}]
    cfg = config(segs, max_new_tokens=12, pipeline=[{"temperature": 0.8}])
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "The", "seed": 4, "params": {"top_k": {"top_k": 2}}}) + "\n"
                   + json.dumps({"id": "b", "prompt": "The", "seed": 4, "params": {"top_p": {"top_p": 0.5}}}) + "\n")
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    main(["batch", "--config", str(path), "--input", str(src), "--output", str(out), "--errors", str(errors)])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    want = gen(backend, cfg).generate(["The"], seeds=[4], rows=[{"top_k": {"top_k": 2}}])[0]
    assert (row["id"], row["text"]) == ("a", want.text)
    (err,) = [json.loads(line) for line in errors.read_text().splitlines()]
    assert err["id"] == "b" and "params top_p" in err["error"] and "or its segments" in err["error"], err
