"""Batch jobs: a JSONL file of prompts in, a JSONL file of completions out, resumable.

One input line::

    {"id": "q1", "prompt": "The capital", "seed": 7,
     "params": {"top_p": {"top_p": 0.5}}, "generation": {"max_new_tokens": 32, "n": 2}}

``id`` (a string or an integer, unique) and ``prompt`` are required; ``params`` has the format of
``Generator.generate(rows=...)``, ``generation`` that of the config's ``generation:`` section.
One output line per id and sample: ``{"id", "sample", "text", "token_ids", "finish_reason"}``
(plus ``logprobs`` / ``prompt_logprobs`` when asked for). Lines that fail validation, or whose
generation fails, go to the errors file with their line number; the job goes on.

Four parts: :func:`read_jobs` (reader and validator), :func:`plan_batches` (grouping),
:class:`Output` (writer and resume), :func:`run_batch` (runner). The Ray path
(:mod:`samplerkit.batch_ray`) reuses all four and only replaces where batches run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from samplerkit.config import RunConfig, validate_generation
from samplerkit.errors import ConfigError, ConfigIssue, SamplerkitError, did_you_mean, short_repr
from samplerkit.pipeline import Pipeline

LINE_KEYS = ("id", "prompt", "params", "seed", "generation")
DEFAULT_BATCH_SIZE = 16


@dataclass
class Job:
    """One valid input line, with the options it runs under resolved."""

    line: int                       # 1-based line number in the input file
    id: str | int
    prompt: str
    params: dict[str, dict[str, Any]] | None
    seed: int | None                # the line's seed, else the config sampler's, else None
    options: dict[str, Any]         # the full generation options (config + the line's overrides)

    @property
    def key(self) -> str:
        return id_key(self.id)

    @property
    def rows(self) -> int:
        return self.options["n"]


def id_key(value: str | int) -> str:
    """Ids compare as JSON values: ``1`` and ``"1"`` are different ids."""
    return json.dumps(value)


@dataclass
class Summary:
    lines: int = 0                  # non-blank input lines
    skipped: int = 0                # lines whose rows were already in the output
    rows_written: int = 0
    tokens: int = 0
    errors: int = 0
    errors_path: str = ""


# -- reader and validator ---------------------------------------------------------------

def read_jobs(path: str | Path, config: RunConfig) -> tuple[list[Job], list[dict[str, Any]]]:
    """Parse and validate every line; returns the valid jobs and one error record per bad line.

    Blank lines are skipped. The second and later lines with an id already seen are errors.
    """
    pipeline = Pipeline.from_config(config)
    jobs: list[Job] = []
    errors: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise SamplerkitError(f"cannot read input file {path}: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise LineError(f"not UTF-8 text (byte {exc.start + 1})") from None
                job = parse_line(text, number, pipeline, config)
            except LineError as exc:
                errors.append(error_record(number, exc.id, exc.message))
                continue
            if job.key in first_line:
                errors.append(error_record(number, job.id, f"id: duplicate id {job.id!r} (first on line {first_line[job.key]})"))
                continue
            first_line[job.key] = number
            jobs.append(job)
    return jobs, errors


class LineError(SamplerkitError):
    def __init__(self, message: str, id: Any = None):
        super().__init__(message)
        self.message = message
        self.id = id


def parse_line(text: str, number: int, pipeline: Pipeline, config: RunConfig) -> Job:
    """One input line as a :class:`Job`; every problem of the line in one :class:`LineError`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise LineError(f"each line is a JSON object with at least id and prompt, got {type(data).__name__}")
    issues: list[ConfigIssue] = []
    line_id = data.get("id")
    for key in data:
        if key not in LINE_KEYS:
            issues.append(ConfigIssue(key, _unknown_key_message(key)))
    if "id" not in data:
        issues.append(ConfigIssue("id", "is required (a string or an integer, unique in the file)"))
    elif isinstance(line_id, bool) or not isinstance(line_id, (str, int)):
        issues.append(ConfigIssue("id", f"must be a string or an integer, got {short_repr(line_id)}"))
        line_id = None
    prompt = data.get("prompt")
    if "prompt" not in data:
        issues.append(ConfigIssue("prompt", "is required"))
    elif not isinstance(prompt, str):
        issues.append(ConfigIssue("prompt", f"must be a string, got {short_repr(prompt)}"))
    params = _check_params(data.get("params"), pipeline, issues)
    seed = _check_seed(data.get("seed"), pipeline, issues)
    options = config.generation.model_dump()
    overrides = data.get("generation")
    if overrides is not None:
        if not isinstance(overrides, dict):
            issues.append(ConfigIssue("generation", f"must be an object of generation options, got {short_repr(overrides)}"))
        else:
            try:
                options = validate_generation(config.generation, overrides).model_dump()
            except ConfigError as exc:
                issues.extend(exc.issues)
    if issues:
        raise LineError("; ".join(map(str, issues)), line_id)
    if seed is None:
        # The config's seed, made explicit: `seeds=[None]` would give n > 1 samples one stream.
        seed = getattr(pipeline.sampler.params, "seed", None)
    return Job(number, line_id, prompt, params, seed, options)


def _unknown_key_message(key: str) -> str:
    from samplerkit.config import GenerationConfig

    if key in GenerationConfig.model_fields:
        return f'unknown key; generation options go in "generation", like {{"generation": {{"{key}": ...}}}}'
    return f"unknown key{did_you_mean(key, LINE_KEYS)} Keys: {', '.join(LINE_KEYS)}"


def _check_params(params: Any, pipeline: Pipeline, issues: list[ConfigIssue]) -> dict[str, dict[str, Any]] | None:
    """Validate per-line overrides against the steps' own parameter models (as ``rows=`` would)."""
    if params is None or params == {}:
        return None
    if not isinstance(params, dict):
        issues.append(ConfigIssue("params", f'must be an object of step name -> {{field: value}}, like '
                                            f'{{"top_p": {{"top_p": 0.9}}}}, got {short_repr(params)}'))
        return None
    steps = {s.name: s for s in (*pipeline.processors, pipeline.sampler)}
    for name, values in params.items():
        if name not in steps:
            issues.append(ConfigIssue(f"params {name}", f"not a step of this pipeline (steps: {', '.join(sorted(steps))})"
                                                        f"{did_you_mean(name, steps).rstrip('.')}"))
        elif not isinstance(values, dict):
            issues.append(ConfigIssue(f"params {name}", f'must be an object of field: value, like {{"{name}": {{...}}}}, got {short_repr(values)}'))
        else:
            try:
                steps[name].with_params(values, f"params {name}")
            except ConfigError as exc:
                issues.extend(exc.issues)
    return params


def _check_seed(seed: Any, pipeline: Pipeline, issues: list[ConfigIssue]) -> int | None:
    if seed is None:
        return None
    sampler = pipeline.sampler
    if "seed" not in sampler.cls.Params.model_fields:
        issues.append(ConfigIssue("seed", f"sampler {sampler.name!r} takes no seed"))
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        issues.append(ConfigIssue("seed", f"must be an integer, got {short_repr(seed)}"))
        return None
    try:
        sampler.with_params({"seed": seed}, "seed")
    except ConfigError as exc:
        issues.extend(exc.issues)
        return None
    return seed


def error_record(line: int | None, id: Any, message: str) -> dict[str, Any]:
    return {"line": line, "id": id, "error": message}


# -- grouping ---------------------------------------------------------------------------

def plan_batches(jobs: Iterable[Job], batch_size: int) -> list[list[Job]]:
    """Split jobs into ``generate`` calls: one set of generation options per call, at most
    ``batch_size`` rows (prompts times ``n``) per call, a line never split. Params and seeds
    are per row, so lines that differ only in those share a call."""
    if batch_size < 1:
        raise SamplerkitError(f"--batch-size must be >= 1, got {batch_size}")
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(json.dumps(job.options, sort_keys=True), []).append(job)
    batches: list[list[Job]] = []
    for members in groups.values():
        current: list[Job] = []
        rows = 0
        for job in members:
            if current and rows + job.rows > batch_size:
                batches.append(current)
                current, rows = [], 0
            current.append(job)
            rows += job.rows
        if current:
            batches.append(current)
    return batches


# -- running one batch (shared with the Ray workers) ------------------------------------

def run_jobs(generator, jobs: Sequence[Job]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Output rows and error records of one batch. A failure that only shows at generation
    (a prompt too long for the context, ...) is isolated by running the lines one at a time:
    seeded rows don't depend on their batch, so the others' results are unchanged."""
    from samplerkit.generate import Completion

    seeds = [j.seed for j in jobs]
    params = [j.params for j in jobs]
    try:
        completions: list[Completion] = generator.generate(
            [j.prompt for j in jobs], seeds=seeds if any(s is not None for s in seeds) else None,
            rows=params if any(params) else None, **jobs[0].options)
    except SamplerkitError as exc:
        if len(jobs) == 1:
            return [], [error_record(jobs[0].line, jobs[0].id, str(exc))]
        rows: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for job in jobs:
            r, e = run_jobs(generator, [job])
            rows += r
            errors += e
        return rows, errors
    return [result_row(jobs[c.prompt_index], c) for c in completions], []


def result_row(job: Job, completion) -> dict[str, Any]:
    row: dict[str, Any] = {"id": job.id, "sample": completion.sample_index, "text": completion.text,
                           "token_ids": completion.token_ids, "finish_reason": completion.finish_reason}
    if completion.logprobs is not None:
        row["logprobs"] = [asdict(lp) for lp in completion.logprobs]
    if completion.prompt_logprobs is not None:
        row["prompt_logprobs"] = [None if lp is None else asdict(lp) for lp in completion.prompt_logprobs]
    return row


def jobs_to_json(jobs: Sequence[Job]) -> str:
    return json.dumps([asdict(j) for j in jobs])


def jobs_from_json(text: str) -> list[Job]:
    return [Job(**d) for d in json.loads(text)]


# -- writer and resume ------------------------------------------------------------------

class Output:
    """The results file: appended one whole batch at a time with flush + fsync.

    On opening, the rows already there tell which lines are done. A crash can leave a
    truncated last line (dropped) or only some of a line's ``n`` samples (those rows are
    dropped too, the file rewritten atomically, and the line runs again).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.samples: dict[str, set[int]] = {}
        self._truncated = False
        self._file = None
        if self.path.exists():
            for _ in self._rows():
                pass

    def _rows(self) -> Iterator[tuple[str, str]]:
        """``(id key, line)`` of every complete row; records the samples seen."""
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    self._truncated = True         # a crash mid-write: the partial line is dropped
                    break
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                    key, sample = id_key(row["id"]), int(row["sample"])
                except (ValueError, KeyError, TypeError):
                    raise SamplerkitError(f"output file {self.path} line {number} is not a result row of samplerkit "
                                          f"batch; move the file away or choose another --output") from None
                self.samples.setdefault(key, set()).add(sample)
                yield key, raw.decode("utf-8")

    def done(self, job: Job) -> bool:
        return set(range(job.rows)) <= self.samples.get(job.key, set())

    def prepare(self, jobs: Sequence[Job]) -> None:
        """Drop a truncated last line and the rows of lines that will run again; open for appending."""
        rerun = {j.key for j in jobs if j.key in self.samples and not self.done(j)}
        if self._truncated or rerun:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(line for key, line in self._rows() if key not in rerun)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            for key in rerun:
                del self.samples[key]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ErrorLog:
    """The errors file, rewritten by each run (validation is deterministic, so a rerun
    reports the same bad lines again and nothing twice)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        records = list(records)
        if records:
            self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self._file.flush()
            self.count += len(records)

    def close(self) -> None:
        self._file.close()


# -- runner ------------------------------------------------------------------------------

#: Runs planned batches somewhere; yields each batch's (output rows, error records) when done.
Executor = Callable[[list[list[Job]]], Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]]


def local_executor(config: RunConfig, registry=None, backend=None) -> Executor:
    """Run batches in this process with one :class:`~samplerkit.Generator` (the model loads once)."""
    def run(batches: list[list[Job]]):
        if not batches:
            return
        from samplerkit.generate import Generator

        generator = Generator(config, registry=registry, backend=backend)
        for batch in batches:
            yield run_jobs(generator, batch)
    return run


def run_batch(config: RunConfig, input_path: str | Path, output_path: str | Path, *,
              errors_path: str | Path | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
              executor: Executor | None = None, progress: bool | None = None,
              on_batch: Callable[[int], None] | None = None) -> Summary:
    """Run every line of ``input_path`` not yet in ``output_path``; see the module docstring.

    ``progress``: a tqdm bar (None: only when stderr is a terminal and ``SAMPLERKIT_QUIET`` is
    unset). ``on_batch(i)`` is called after the ``i``-th batch is written (0-based).
    """
    if batch_size < 1:
        raise SamplerkitError(f"--batch-size must be >= 1, got {batch_size}")
    if Path(input_path).resolve() == Path(output_path).resolve():
        raise SamplerkitError("--input and --output are the same file")
    errors_path = Path(errors_path) if errors_path is not None else Path(f"{output_path}.errors.jsonl")
    jobs, bad = read_jobs(input_path, config)
    output = Output(output_path)
    summary = Summary(lines=len(jobs) + len(bad), errors_path=str(errors_path))
    todo = [j for j in jobs if not output.done(j)]
    summary.skipped = len(jobs) - len(todo)
    batches = plan_batches(todo, batch_size)
    output.prepare(jobs)
    errors = ErrorLog(errors_path)
    rows_of_line = {j.line: j.rows for j in todo}
    bar = _progress_bar(sum(rows_of_line.values()), progress)
    started = time.monotonic()
    try:
        errors.write(bad)
        for index, (rows, failed) in enumerate((executor or local_executor(config))(batches)):
            output.write(rows)
            errors.write(failed)
            summary.rows_written += len(rows)
            summary.tokens += sum(len(r["token_ids"]) for r in rows)
            if bar is not None:
                bar.update(len(rows) + sum(rows_of_line.get(e["line"], 1) for e in failed))
                bar.set_postfix_str(f"{summary.tokens / max(time.monotonic() - started, 1e-9):.0f} tok/s", refresh=False)
            if on_batch is not None:
                on_batch(index)
    finally:
        summary.errors = errors.count
        output.close()
        errors.close()
        if bar is not None:
            bar.close()
    return summary


def _progress_bar(total: int, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty() and os.environ.get("SAMPLERKIT_QUIET") != "1"
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="row", desc="batch", dynamic_ncols=True)


__all__ = ["DEFAULT_BATCH_SIZE", "Job", "Output", "Summary", "local_executor", "plan_batches", "read_jobs",
           "run_batch", "run_jobs"]
