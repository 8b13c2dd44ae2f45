"""`samplerkit batch`: JSONL in, JSONL out; validation per line, grouping, resume, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import samplerkit
from samplerkit.batch import Job, Output, plan_batches, read_jobs, result_row, run_batch
from samplerkit.cli import main
from samplerkit.config import resolve
from samplerkit.registry import default_registry

CONFIG = {
    "backend": "bigram",
    "pipeline": [{"temperature": 0.9}, {"top_p": 0.95}],
    "sampler": {"name": "categorical", "seed": 11},
    "generation": {"max_new_tokens": 10},
}
PROMPTS = ["The capital", "She sells", "A bird", "Peter", "Time flies", "The sun", "The quick", "Paris"]


def resolved(data=CONFIG):
    return resolve(data, default_registry())


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_key(rows):
    return sorted(rows, key=lambda r: (json.dumps(r["id"]), r["sample"]))


def seeded_lines(count=8, **extra):
    return [{"id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": 100 + i,
             **({"params": {"top_p": {"top_p": 0.5}}} if i % 3 == 0 else {}), **extra} for i in range(count)]


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(CONFIG))          # JSON is YAML
    return path


def cli(capsys, *argv):
    code = main(["batch", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# -- the command end to end --------------------------------------------------------------

def test_batch_writes_one_row_per_id_and_sample(tmp_path, cfg_file, capsys):
    src = write_lines(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "The capital", "seed": 3},
        {"id": 7, "prompt": "She sells", "generation": {"n": 2, "logprobs": 2, "max_new_tokens": 4}},
        {"id": "c", "prompt": "A bird", "params": {"temperature": {"temperature": 0.0}}},
        "",                                               # blank lines are skipped
    ])
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli(capsys, "--config", cfg_file, "--input", src, "--output", out)
    assert code == 0, err
    assert stdout == ""                                   # quiet when stderr is not a terminal
    assert "3 lines, 4 rows written, 0 lines already done, 0 errors" in err
    rows = read_rows(out)
    assert sorted((json.dumps(r["id"]), r["sample"]) for r in rows) == [('"a"', 0), ('"c"', 0), ("7", 0), ("7", 1)]
    for r in rows:
        assert set(r) >= {"id", "sample", "text", "token_ids", "finish_reason"}
        assert r["text"] == bytes(r["token_ids"]).decode("utf-8", "replace")
        assert ("logprobs" in r) == (r["id"] == 7)
    sevens = [r for r in rows if r["id"] == 7]
    assert all(len(r["token_ids"]) <= 4 and len(r["logprobs"]) == len(r["token_ids"]) for r in sevens)
    assert all(len(lp["top"]) == 2 for r in sevens for lp in r["logprobs"])
    assert (tmp_path / "out.jsonl.errors.jsonl").read_text() == ""


BAD_LINES = [
    ('{"id": "x", "prompt": "hi"', "invalid JSON: Expecting ',' delimiter"),
    ('["a list"]', "each line is a JSON object"),
    ({"id": "x"}, "prompt: is required"),
    ({"prompt": "hi"}, "id: is required"),
    ({"id": 1.5, "prompt": "hi"}, "id: must be a string or an integer, got 1.5"),
    ({"id": "x", "prompt": "hi", "params": {"top_q": {"top_p": 0.5}}},
     "params top_q: not a step of this pipeline (steps: categorical, temperature, top_p); did you mean 'top_p'?"),
    ({"id": "x", "prompt": "hi", "params": {"top_p": {"top_p": 1.5}}}, "params top_p: must be in (0, 1], got 1.5"),
    ({"id": "x", "prompt": "hi", "params": {"top_p": 0.5}}, "params top_p: must be an object of field: value"),
    ({"id": "x", "prompt": "hi", "params": {"temperature": {"temperatur": 1}}},
     "params temperature.temperatur: unknown parameter 'temperatur'; did you mean 'temperature'?"),
    ({"id": "x", "prompt": "hi", "seed": -1}, "seed: must be in [0, 2**63), got -1"),
    ({"id": "x", "prompt": "hi", "seed": "7"}, "seed: must be an integer, got '7'"),
    ({"id": "x", "prompt": "hi", "generation": {"max_new_tokens": -1}}, "generation.max_new_tokens: must be >= 0, got -1"),
    ({"id": "x", "prompt": "hi", "generation": {"nn": 2}}, "generation.nn: unknown parameter 'nn'; did you mean 'n'?"),
    ({"id": "x", "prompt": "hi", "max_new_tokens": 3}, 'max_new_tokens: unknown key; generation options go in "generation"'),
    ({"id": "x", "prompt": "hi", "promt": "hi"}, "promt: unknown key; did you mean 'prompt'?"),
]


@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_LINES)])
def test_a_bad_line_goes_to_the_errors_file_and_the_job_continues(tmp_path, cfg_file, capsys, line, message):
    src = write_lines(tmp_path / "in.jsonl", [{"id": "ok1", "prompt": "The"}, line, {"id": "ok2", "prompt": "She"}])
    out = tmp_path / "out.jsonl"
    code, _, err = cli(capsys, "-c", cfg_file, "-i", src, "-o", out, "--errors", tmp_path / "bad.jsonl")
    assert code == 0, err
    assert {r["id"] for r in read_rows(out)} == {"ok1", "ok2"}
    [error] = read_rows(tmp_path / "bad.jsonl")
    assert error["line"] == 2
    assert message in error["error"], error["error"]
    assert "1 errors (see " in err


def test_every_problem_of_a_line_is_reported_at_once(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        {"id": "x", "prompt": 3, "params": {"top_p": {"top_p": 2}}, "generation": {"n": 0}}])
    jobs, errors = read_jobs(src, resolved())
    assert jobs == []
    assert errors == [{"line": 1, "id": "x", "error": "prompt: must be a string, got 3; params top_p: must be in (0, 1], "
                                                     "got 2; generation.n: must be in [1, 1024], got 0"}]


def test_a_line_that_is_not_utf8_is_an_error_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "\xff"}\n')   # a BOM is fine
    jobs, errors = read_jobs(src, resolved())
    assert [j.id for j in jobs] == [1]
    assert errors == [{"line": 2, "id": None, "error": "not UTF-8 text (byte 22)"}]


def test_duplicate_ids_are_errors_after_the_first(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}, {"id": "1", "prompt": "b"},
                                              {"id": 1, "prompt": "c"}])
    jobs, errors = read_jobs(src, resolved())
    assert [(j.line, j.id) for j in jobs] == [(1, 1), (2, "1")]        # 1 and "1" are different ids
    assert errors == [{"line": 3, "id": 1, "error": "id: duplicate id 1 (first on line 1)"}]


def test_a_seed_for_a_sampler_without_one_is_an_error(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a", "seed": 1}])
    _, errors = read_jobs(src, resolved({**CONFIG, "sampler": "greedy"}))
    assert errors[0]["error"].startswith("seed: no step of this pipeline takes a seed (sampler 'greedy')")


def test_a_seed_reaches_a_random_processor_under_greedy(tmp_path):
    # xtc draws its coin from the row's seed even though greedy itself takes none.
    config = resolved({**CONFIG, "pipeline": [{"xtc": {"threshold": 0.1, "probability": 0.5}}], "sampler": "greedy"})
    src = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a", "seed": 7}, {"id": 2, "prompt": "b", "seed": -1}])
    jobs, errors = read_jobs(src, config)
    assert [(j.id, j.seed) for j in jobs] == [(1, 7)]
    assert errors == [{"line": 2, "id": 2, "error": "seed: must be in [0, 2**63), got -1"}]


def test_a_failure_at_generation_time_is_isolated_to_its_line(tmp_path):
    config = resolved({**CONFIG, "backend": {"name": "bigram", "max_context": 16}})
    src = write_lines(tmp_path / "in.jsonl", seeded_lines(3) + [{"id": "long", "prompt": "far too long for sixteen tokens"}])
    out = tmp_path / "out.jsonl"
    summary = run_batch(config, src, out, batch_size=16)
    assert summary.errors == 1 and summary.rows_written == 3
    [error] = read_rows(tmp_path / "out.jsonl.errors.jsonl")
    assert error["line"] == 4 and error["id"] == "long" and "the model's context holds 16" in error["error"]
    # The other lines ran alone after the batch failed: seeded, so the same as in one batch.
    assert by_key(read_rows(out)) == by_key(run_reference(config, seeded_lines(3)))


# -- determinism and grouping -------------------------------------------------------------

def run_reference(config, lines, **generation):
    """The same lines through one samplerkit.generate call."""
    seeds = [line.get("seed", 11) for line in lines]
    completions = samplerkit.generate([line["prompt"] for line in lines], config, seeds=seeds,
                                      rows=[line.get("params") for line in lines], **generation)
    options = config.generation.model_dump() | generation
    jobs = [Job(0, line["id"], line["prompt"], None, None, options) for line in lines]
    return [json.loads(json.dumps(result_row(jobs[c.prompt_index], c))) for c in completions]   # tuples -> lists


@pytest.mark.parametrize("batch_size", [1, 3, 16, 100])
def test_seeded_lines_equal_one_generate_call_whatever_the_batch_size(tmp_path, batch_size):
    config = resolved()
    lines = seeded_lines(10)
    out = tmp_path / "out.jsonl"
    run_batch(config, write_lines(tmp_path / "in.jsonl", lines), out, batch_size=batch_size)
    assert by_key(read_rows(out)) == by_key(run_reference(config, lines))


def test_lines_with_other_generation_options_run_apart_and_match_their_own_call(tmp_path):
    config = resolved()
    plain = seeded_lines(5)
    sampled = [{**line, "id": f"n{i}", "generation": {"n": 3, "logprobs": 1, "max_new_tokens": 6}}
               for i, line in enumerate(seeded_lines(4))]
    mixed = [line for pair in zip(plain, sampled) for line in pair] + plain[4:]
    out = tmp_path / "out.jsonl"
    run_batch(config, write_lines(tmp_path / "in.jsonl", mixed), out, batch_size=4)
    expected = run_reference(config, plain) + run_reference(
        config, [{k: v for k, v in line.items() if k != "generation"} for line in sampled], n=3, logprobs=1, max_new_tokens=6)
    assert by_key(read_rows(out)) == by_key(expected)


def test_a_line_without_a_seed_takes_the_configs_seed(tmp_path):
    config = resolved()
    lines = [{"id": 1, "prompt": "The", "generation": {"n": 2}}, {"id": 2, "prompt": "She", "seed": 5}]
    out = tmp_path / "out.jsonl"
    run_batch(config, write_lines(tmp_path / "in.jsonl", lines), out)
    rows = by_key(read_rows(out))
    assert rows[:2] == by_key(run_reference(config, lines[:1], n=2))   # seed 11, samples 0 and 1 differ
    assert rows[0]["token_ids"] != rows[1]["token_ids"]


def test_plan_batches_groups_by_generation_options_and_never_splits_a_line():
    base = resolved().generation.model_dump()
    jobs = [Job(i, i, "p", None, None, {**base, "n": n, "max_new_tokens": m})
            for i, (n, m) in enumerate([(1, 5), (1, 6), (1, 5), (2, 5), (5, 5), (1, 5), (1, 6), (2, 5)])]
    batches = plan_batches(jobs, batch_size=3)
    for batch in batches:
        assert len({json.dumps(j.options, sort_keys=True) for j in batch}) == 1
        assert sum(j.rows for j in batch) <= 3 or len(batch) == 1
    assert sorted(j.line for b in batches for j in b) == list(range(8))
    assert [[j.line for j in b] for b in batches] == [[0, 2, 5], [1, 6], [3], [7], [4]]


# -- resume ------------------------------------------------------------------------------------

class Crash(Exception):
    pass


def crash_after(batches: int):
    def hook(index: int) -> None:
        if index + 1 >= batches:
            raise Crash
    return hook


def test_a_crashed_job_resumes_without_losing_or_duplicating_rows(tmp_path):
    config = resolved()
    lines = seeded_lines(9, generation={"n": 2})
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Crash):
        run_batch(config, src, out, batch_size=4, on_batch=crash_after(1))
    assert len(read_rows(out)) == 4                                 # one batch: two lines, two samples each
    summary = run_batch(config, src, out, batch_size=4)
    assert summary.skipped == 2 and summary.rows_written == 14
    rows = read_rows(out)
    assert len(rows) == 18 and len({(r["id"], r["sample"]) for r in rows}) == 18
    assert by_key(rows) == by_key(run_reference(config, [{k: v for k, v in line.items() if k != "generation"}
                                                         for line in lines], n=2))
    again = run_batch(config, src, out, batch_size=4)                # nothing left to do
    assert (again.skipped, again.rows_written) == (9, 0) and read_rows(out) == rows


def test_ctrl_c_then_the_same_command_finishes_the_job(tmp_path, cfg_file, capsys, monkeypatch):
    src = write_lines(tmp_path / "in.jsonl", seeded_lines(6))
    out = tmp_path / "out.jsonl"
    real_write = Output.write
    calls = []

    def write_then_interrupt(self, rows):
        real_write(self, rows)
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(Output, "write", write_then_interrupt)
    code, _, err = cli(capsys, "-c", cfg_file, "-i", src, "-o", out, "--batch-size", 2)
    assert code == 130 and "rerun the same command to resume" in err
    assert len(read_rows(out)) == 4
    monkeypatch.setattr(Output, "write", real_write)
    code, _, err = cli(capsys, "-c", cfg_file, "-i", src, "-o", out, "--batch-size", 2)
    assert code == 0, err
    assert "2 rows written, 4 lines already done" in err
    assert by_key(read_rows(out)) == by_key(run_reference(resolved(), seeded_lines(6)))


def test_a_truncated_last_line_is_dropped_and_rewritten_cleanly(tmp_path):
    config = resolved()
    lines = seeded_lines(5)
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    run_batch(config, src, out)
    complete = out.read_text()
    out.write_text(complete[: len(complete) - 25])                 # a crash in the middle of the last row
    summary = run_batch(config, src, out)
    assert summary.rows_written == 1 and summary.skipped == 4
    assert out.read_text().endswith("\n")
    assert by_key(read_rows(out)) == by_key(json.loads(line) for line in complete.splitlines())


def test_a_line_with_only_some_of_its_samples_written_runs_again(tmp_path):
    config = resolved()
    src = write_lines(tmp_path / "in.jsonl", seeded_lines(3, generation={"n": 3}))
    out = tmp_path / "out.jsonl"
    run_batch(config, src, out)
    full = read_rows(out)
    partial = [r for r in full if not (r["id"] == "p2" and r["sample"] > 0)]
    out.write_text("".join(json.dumps(r) + "\n" for r in partial))
    summary = run_batch(config, src, out)
    assert (summary.skipped, summary.rows_written) == (2, 3)
    assert by_key(read_rows(out)) == by_key(full) and len(read_rows(out)) == 9


def test_an_output_file_that_is_not_results_is_a_user_error(tmp_path, cfg_file, capsys):
    src = write_lines(tmp_path / "in.jsonl", seeded_lines(2))
    out = tmp_path / "out.jsonl"
    out.write_text("hello\n{}\n")
    code, _, err = cli(capsys, "-c", cfg_file, "-i", src, "-o", out)
    assert code == 2 and "Traceback" not in err
    assert f"output file {out} line 1 is not a result row of samplerkit batch" in err
    assert out.read_text() == "hello\n{}\n"                         # never overwritten


# -- the command's user errors and output ----------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--input", "missing.jsonl"], "cannot read input file missing.jsonl"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--set", "pipeline[1].top_p=2"], "pipeline[1] top_p: must be in (0, 1], got 2"),
])
def test_user_errors_exit_2_with_one_message(tmp_path, cfg_file, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "in.jsonl", seeded_lines(2))
    args = ["-c", cfg_file, "-i", "in.jsonl", "-o", "out.jsonl"]
    code, _, err = cli(capsys, *args, *argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.startswith("samplerkit batch: error: ")


def test_ray_flag_without_ray_installed_is_a_user_error(tmp_path, cfg_file, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)                  # import ray -> ImportError
    src = write_lines(tmp_path / "in.jsonl", seeded_lines(2))
    code, _, err = cli(capsys, "-c", cfg_file, "-i", src, "-o", tmp_path / "out.jsonl", "--ray")
    assert code == 2 and "pip install 'samplerkit[ray]'" in err


def test_the_local_path_never_imports_ray(tmp_path, cfg_file):
    src = write_lines(tmp_path / "in.jsonl", seeded_lines(2))
    code = ("import sys; from samplerkit.cli import main; "
            f"rc = main(['batch', '-c', {str(cfg_file)!r}, '-i', {str(src)!r}, '-o', {str(tmp_path / 'o.jsonl')!r}]); "
            "assert rc == 0; assert 'ray' not in sys.modules, 'ray was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_progress_bar_shows_rows_and_tokens_per_second(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", seeded_lines(4))
    run_batch(resolved(), src, tmp_path / "out.jsonl", batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "row/s" in err and "tok/s" in err


# -- continuous batching (the Engine) ----------------------------------------------------------

def test_a_short_line_does_not_wait_for_a_long_one_and_rows_are_written_as_lines_finish(tmp_path):
    config = resolved()
    lines = [{"id": "long", "prompt": "The capital", "seed": 1, "generation": {"max_new_tokens": 40, "ignore_eos": True}}]
    lines += [{"id": f"s{i}", "prompt": PROMPTS[i], "seed": 10 + i, "generation": {"max_new_tokens": 3, "ignore_eos": True}}
              for i in range(5)]
    out = tmp_path / "out.jsonl"
    writes = []
    run_batch(config, write_lines(tmp_path / "in.jsonl", lines), out, batch_size=2,
              on_batch=lambda i: writes.append([r["id"] for r in read_rows(out)]))
    # With 2 rows, the long line holds one and the short lines pass through the other,
    # each written when it finishes (completion order): the long line comes last.
    assert [r["id"] for r in read_rows(out)] == ["s0", "s1", "s2", "s3", "s4", "long"]
    assert len(writes) == 6
    expected = run_reference(config, lines[:1], max_new_tokens=40, ignore_eos=True) + run_reference(
        config, lines[1:], max_new_tokens=3, ignore_eos=True)
    assert by_key(read_rows(out)) == by_key(expected)


def test_lines_with_different_generation_options_share_engine_steps(tmp_path, monkeypatch):
    from samplerkit.engine import Engine

    seen = []
    real = Engine._sample_and_step

    def spy(self):
        seen.append({json.dumps([g.run.gen.max_new_tokens, g.run.gen.n, g.run.gen.stop]) for g in self._groups})
        return real(self)
    monkeypatch.setattr(Engine, "_sample_and_step", spy)
    config = resolved()
    lines = [{"id": i, "prompt": PROMPTS[i], "seed": i,
              "generation": [{}, {"max_new_tokens": 4}, {"n": 2}, {"stop": [" "]}][i % 4]} for i in range(8)]
    out = tmp_path / "out.jsonl"
    run_batch(config, write_lines(tmp_path / "in.jsonl", lines), out, batch_size=16)
    assert max(len(s) for s in seen) == 4                 # the four option sets in one step
    for i in range(4):
        mine = [line for line in lines if line["id"] % 4 == i]
        expected = run_reference(config, [{k: v for k, v in line.items() if k != "generation"} for line in mine],
                                 **mine[0]["generation"])
        assert by_key([r for r in read_rows(out) if r["id"] % 4 == i]) == by_key(expected)


def test_output_order_is_the_same_on_every_run(tmp_path):
    config = resolved()
    lines = [{**line, "generation": {"max_new_tokens": 3 + (i * 7) % 11}} for i, line in enumerate(seeded_lines(10))]
    src = write_lines(tmp_path / "in.jsonl", lines)
    orders = []
    for k in range(2):
        run_batch(config, src, tmp_path / f"out{k}.jsonl", batch_size=3)
        orders.append((tmp_path / f"out{k}.jsonl").read_text())
    assert orders[0] == orders[1]


@pytest.mark.parametrize("bang_at", [0, 2, 5])
def test_a_line_failing_in_the_backend_fails_alone(tmp_path, bang_at, failing_backend):
    from samplerkit.batch import local_executor

    config = resolved()
    lines = seeded_lines(6)
    lines[bang_at] = {"id": "bang", "prompt": "bang!", "seed": 3}
    out = tmp_path / "out.jsonl"
    summary = run_batch(config, write_lines(tmp_path / "in.jsonl", lines), out, batch_size=4,
                        executor=local_executor(config, backend=failing_backend))
    assert summary.errors == 1 and summary.rows_written == 5
    [error] = read_rows(tmp_path / "out.jsonl.errors.jsonl")
    assert error["id"] == "bang" and error["line"] == bang_at + 1 and "broke" in error["error"]
    good = [line for line in lines if line["id"] != "bang"]
    assert by_key(read_rows(out)) == by_key(run_reference(config, good))


def test_a_line_with_more_rows_than_the_batch_size_runs_whole(tmp_path):
    config = resolved()
    lines = seeded_lines(3)
    lines[1] = {**lines[1], "generation": {"n": 5}}
    out = tmp_path / "out.jsonl"
    summary = run_batch(config, write_lines(tmp_path / "in.jsonl", lines), out, batch_size=2)
    assert summary.rows_written == 7
    expected = run_reference(config, [lines[0], lines[2]]) + run_reference(
        config, [{k: v for k, v in lines[1].items() if k != "generation"}], n=5)
    assert by_key(read_rows(out)) == by_key(expected)


# -- chat lines ---------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital"}]


def test_chat_lines_render_through_the_chat_template_like_generate_chat(tmp_path):
    config = resolved()
    lines = [{"id": "c", "messages": CHAT, "seed": 4}, {"id": "p", "prompt": "The capital", "seed": 4},
             {"id": "u", "messages": [{"role": "user", "content": "She sells"}], "seed": 5, "generation": {"n": 2}}]
    out = tmp_path / "out.jsonl"
    summary = run_batch(config, write_lines(tmp_path / "in.jsonl", lines), out, batch_size=3)
    assert summary.errors == 0
    rows = {(r["id"], r["sample"]): r for r in read_rows(out)}
    chat = samplerkit.generate([CHAT], config, seeds=[4], chat=True)[0]
    assert rows["c", 0]["token_ids"] == chat.token_ids
    assert rows["p", 0]["token_ids"] == samplerkit.generate(["The capital"], config, seeds=[4])[0].token_ids
    user = samplerkit.generate([[{"role": "user", "content": "She sells"}]], config, seeds=[5], chat=True, n=2)
    assert [rows["u", j]["token_ids"] for j in range(2)] == [c.token_ids for c in user]
    assert chat.token_ids != rows["p", 0]["token_ids"]           # the template changed the prompt


@pytest.mark.parametrize("line, message", [
    ({"id": 1, "prompt": "a", "messages": CHAT}, "messages: give either prompt (text) or messages"),
    ({"id": 1}, 'prompt: is required (or "messages": a chat conversation'),
    ({"id": 1, "messages": [{"role": "robot", "content": "hi"}]},
     "messages message 0: role must be one of system, user, assistant"),
    ({"id": 1, "messages": [{"role": "user"}]}, "messages message 0: content must be a string, got NoneType"),
    ({"id": 1, "messages": []}, "messages: a chat conversation is a non-empty list of messages"),
    ({"id": 1, "messages": "hi"}, "messages: a chat conversation is a non-empty list of messages"),
    ({"id": 1, "messages": [{"role": "user", "content": "\ud800"}]}, "messages message 0: content has a lone surrogate"),
    ({"id": 1, "messages": CHAT, "generation": {"chat": False}}, "generation chat: a line with messages is always rendered"),
])
def test_bad_chat_lines_are_located_errors(tmp_path, line, message):
    jobs, errors = read_jobs(write_lines(tmp_path / "in.jsonl", [line]), resolved())
    assert jobs == [] and len(errors) == 1
    assert message in errors[0]["error"], errors[0]["error"]


def test_a_chat_line_without_a_chat_template_is_an_error_line(tmp_path):
    from samplerkit.backend import Backend
    from samplerkit.batch import local_executor
    from samplerkit.builtins.backends.bigram import BigramBackend

    class NoTemplate(BigramBackend):
        apply_chat_template = Backend.apply_chat_template         # base models have none

    config = resolved()
    out = tmp_path / "out.jsonl"
    src = write_lines(tmp_path / "in.jsonl", [{"id": 1, "messages": CHAT, "seed": 1}, {"id": 2, "prompt": "ab", "seed": 1}])
    summary = run_batch(config, src, out, executor=local_executor(config, backend=NoTemplate()))
    assert summary.errors == 1 and summary.rows_written == 1
    assert "has no chat template" in read_rows(tmp_path / "out.jsonl.errors.jsonl")[0]["error"]


# -- the default model (slow) -------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_batch_sizes_2_and_5_give_the_rows_of_samplerkit_generate(tmp_path, capsys, default_model_path):
    prompts = ["The capital of France is", "Once", "A long prompt, with many more tokens than the others in this file, "
               "so the rows are of very different lengths:", "def f(x):", "Colors: red,", "I like"]
    lines = [{"id": i, "prompt": p, "seed": 70 + i, "generation": {"max_new_tokens": 4 + 3 * (i % 3)}}
             for i, p in enumerate(prompts)]
    src = write_lines(tmp_path / "in.jsonl", lines)
    results = []
    for size in (2, 5):
        out = tmp_path / f"out{size}.jsonl"
        assert main(["batch", "-i", str(src), "-o", str(out), "--batch-size", str(size)]) == 0
        results.append(by_key(read_rows(out)))
    assert results[0] == results[1]
    for line in lines:
        code = main(["generate", line["prompt"], "--seed", str(line["seed"]), "--max-new-tokens",
                     str(line["generation"]["max_new_tokens"]), "--json"])
        out, _ = capsys.readouterr()
        assert code == 0
        [row] = [r for r in results[0] if r["id"] == line["id"]]
        assert json.loads(out)["token_ids"] == row["token_ids"], line


def test_the_running_lines_are_sampled_by_one_call_per_step(tmp_path, monkeypatch):
    from samplerkit.pipeline import BoundPipeline

    calls = []
    real = BoundPipeline.sample_with_validity
    monkeypatch.setattr(BoundPipeline, "sample_with_validity",
                        lambda self, logits, *a, **k: calls.append(int(logits.shape[0])) or real(self, logits, *a, **k))
    lines = [{"id": i, "prompt": PROMPTS[i], "seed": i, "generation": {"max_new_tokens": 5, "ignore_eos": True,
                                                                       **({"n": 2} if i % 2 else {})}} for i in range(4)]
    run_batch(resolved(), write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", batch_size=6)
    assert calls == [6] * 5                   # 6 rows (1 + 2 + 1 + 2), 5 steps, one call each


def test_the_fixed_batches_of_the_ray_workers_give_the_same_rows_for_chat_and_mixed_lines(tmp_path):
    from samplerkit.batch import jobs_from_json, jobs_to_json, run_jobs
    from samplerkit.generate import Generator

    config = resolved()
    lines = [{"id": "c", "messages": CHAT, "seed": 4}, *seeded_lines(3),
             {"id": "u", "messages": [{"role": "user", "content": "She sells"}], "seed": 5, "generation": {"n": 2}}]
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    run_batch(config, src, out, batch_size=3)
    jobs, _ = read_jobs(src, config)
    generator = Generator(config)
    rows = [r for batch in plan_batches(jobs, 3) for r in run_jobs(generator, jobs_from_json(jobs_to_json(batch)))[0]]
    assert by_key(json.loads(json.dumps(rows))) == by_key(read_rows(out))


def test_the_longest_lines_start_first_so_none_runs_alone_at_the_end(tmp_path, monkeypatch):
    from samplerkit.engine import Engine

    steps = []
    real = Engine._sample_and_step
    monkeypatch.setattr(Engine, "_sample_and_step", lambda self: steps.append(self.running_rows) or real(self))
    config = resolved()
    lines = [{"id": f"s{i}", "prompt": PROMPTS[i], "seed": i, "generation": {"max_new_tokens": 3, "ignore_eos": True}}
             for i in range(5)]
    lines.append({"id": "long", "prompt": "The sun", "seed": 9, "generation": {"max_new_tokens": 20, "ignore_eos": True}})
    out = tmp_path / "out.jsonl"
    run_batch(config, write_lines(tmp_path / "in.jsonl", lines), out, batch_size=2)
    # The long line (last in the file) holds one row from the first step; the five short lines
    # pass through the other (15 steps), so 20 steps in all instead of 9 + 20.
    assert len(steps) == 20 and steps[:15] == [2] * 15
    assert [r["id"] for r in read_rows(out)] == ["s0", "s1", "s2", "s3", "s4", "long"]
    expected = run_reference(config, lines[5:], max_new_tokens=20, ignore_eos=True) + run_reference(
        config, lines[:5], max_new_tokens=3, ignore_eos=True)
    assert by_key(read_rows(out)) == by_key(expected)
