"""Fuzzing `samplerkit batch` with hypothesis over JSONL input lines (issue 14): whatever the
lines, the job finishes (exit 0) without a traceback, and every non-blank line ends up exactly
once either as its rows in the output or as one record in the errors file: no row lost,
none duplicated. In-process through the CLI's main function, on the bigram backend."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from samplerkit.cli import main

CONFIG = {"backend": {"name": "bigram", "max_context": 48}, "pipeline": [{"temperature": 0.8}, {"top_p": 0.9}],
          "sampler": {"name": "categorical", "seed": 3}, "generation": {"max_new_tokens": 3}}

# Text without "\n" (which would split the line), lone surrogates included (st.text leaves them
# out whatever its alphabet, hence lists of characters): JSON escapes them, and raw lines are
# written as UTF-8 with surrogatepass, so some lines are not UTF-8 at all.
characters = st.characters(exclude_characters="\n", exclude_categories=()) | st.sampled_from(["\ud800", "\udfff", "\x00"])
text = st.lists(characters, max_size=30).map("".join)
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                           max_leaves=8)
ids = st.integers(-5, 5) | st.sampled_from(["a", "b", "1", ""]) | text | json_values
step_params = st.dictionaries(st.sampled_from(["temperature", "top_p", "top_k", "categorical", "x"]),
                              st.dictionaries(st.sampled_from(["temperature", "top_p", "seed", "top_k"]),
                                              scalars, max_size=2) | scalars, max_size=2)
generation = st.dictionaries(st.sampled_from(["max_new_tokens", "n", "logprobs", "stop", "stop_token_ids", "echo",
                                              "ignore_eos", "chat", "bogus"]),
                             st.integers(-2, 4) | st.lists(text, max_size=2) | st.lists(st.integers(-1, 300), max_size=2)
                             | scalars, max_size=3)
objects = st.fixed_dictionaries(
    {"id": ids, "prompt": text | scalars},
    optional={"seed": st.integers(-3, 2**64) | scalars, "params": step_params | json_values,
              "generation": generation | json_values, "promt": text})
# Mostly well-formed requests, so that lines get as far as generation.
requests = st.fixed_dictionaries(
    {"id": st.integers(0, 30) | st.sampled_from(["a", "b", "c"]), "prompt": text},
    optional={"seed": st.integers(0, 2**63 - 1), "params": st.fixed_dictionaries({"top_p": st.fixed_dictionaries(
        {"top_p": st.floats(0.05, 1)})}), "generation": st.fixed_dictionaries(
        {}, optional={"n": st.integers(1, 3), "max_new_tokens": st.integers(0, 4), "stop": st.lists(text, max_size=2),
                      "logprobs": st.integers(0, 3), "echo": st.booleans()})})
lines = st.one_of(
    requests.map(json.dumps),
    requests.map(json.dumps),
    requests.map(lambda o: json.dumps(o, ensure_ascii=False)),
    objects.map(json.dumps),
    objects.map(lambda o: json.dumps(o, ensure_ascii=False)),
    json_values.map(json.dumps),
    text,                                                              # not JSON at all, or blank
    objects.map(lambda o: json.dumps(o)[: max(1, len(json.dumps(o)) // 2)]),   # cut short
)


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines, min_size=1, max_size=8))
def test_any_jsonl_lines_give_clean_per_line_errors_and_no_lost_or_duplicated_row(input_lines):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "run.yaml").write_text(json.dumps(CONFIG))
        raw = b"".join(line.encode("utf-8", "surrogatepass") + b"\n" for line in input_lines)
        (tmp / "in.jsonl").write_bytes(raw)
        argv = ["batch", "-c", str(tmp / "run.yaml"), "-i", str(tmp / "in.jsonl"), "-o", str(tmp / "out.jsonl"),
                "--batch-size", "3"]
        code, err = _run(argv)
        assert code == 0, err
        assert "Traceback" not in err

        numbered = [(n, line) for n, line in enumerate(raw.split(b"\n")[:-1], start=1) if line.strip()]
        out_rows = [json.loads(x) for x in (tmp / "out.jsonl").read_bytes().splitlines()]
        errors = [json.loads(x) for x in (tmp / "out.jsonl.errors.jsonl").read_bytes().splitlines()]
        error_lines = [e["line"] for e in errors]
        assert len(error_lines) == len(set(error_lines))               # one record per bad line
        assert all(isinstance(e["error"], str) and e["error"] for e in errors)

        # Each line not in the errors file is a valid request: its id is in the output with
        # samples 0 .. n-1, each exactly once.
        written: dict[str, list[int]] = {}
        for row in out_rows:
            written.setdefault(json.dumps(row["id"]), []).append(row["sample"])
        done = []
        for number, line in numbered:
            if number in error_lines:
                continue
            request = json.loads(line)
            n = (request.get("generation") or {}).get("n", 1)
            assert sorted(written.pop(json.dumps(request["id"]))) == list(range(n)), (number, line)
            done.append(number)
        assert not written, f"rows of no input line: {written}"
        event(f"lines generated: {'some' if done else 'none'}; error lines: {'some' if errors else 'none'}")
        assert sorted(done + error_lines) == [n for n, _ in numbered]

        again, err = _run(argv)                                        # a rerun: everything already done
        assert again == 0 and f"{len(done)} lines already done" in err, err
