"""Batch jobs: a JSONL file of prompts in, a JSONL file of completions out, resumable.

One input line::

    {"id": "q1", "prompt": "The capital", "seed": 7,
     "params": {"top_p": {"top_p": 0.5}}, "generation": {"max_new_tokens": 32, "n": 2}}

``id`` (a string or an integer, unique) and exactly one of ``prompt`` (text) and ``messages`` (a
chat conversation, ``[{"role", "content"}, ...]``, rendered through the model's chat template)
are required; ``params`` has the format of ``Generator.generate(rows=...)``, ``generation`` that
of the config's ``generation:`` section. One output line per id and sample: ``{"id", "sample",
"text", "token_ids", "finish_reason"}`` (plus ``logprobs`` / ``prompt_logprobs`` when asked
for). Lines that fail validation, or whose generation fails, go to the errors file with their
line number; the job goes on.

Parts: :func:`read_jobs` (reader and validator), :class:`Output` (writer and resume),
:func:`run_engine` (the local runner: continuous batching on one
:class:`~samplerkit.engine.Engine`), :func:`run_batch` (the job). The Ray path
(:mod:`samplerkit.batch_ray`) splits the lines into fixed batches (:func:`plan_batches`) and
runs each with :func:`run_jobs` on an actor; reading, resume and writing are shared.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from samplerkit.chat_template import check_messages
from samplerkit.config import RunConfig, check_stages, validate_generation
from samplerkit.detokenize import lone_surrogate, lone_surrogate_in
from samplerkit.errors import ConfigError, ConfigIssue, GenerationError, SamplerkitError, did_you_mean, short_repr
from samplerkit.pipeline import Pipeline

LINE_KEYS = ("id", "prompt", "messages", "params", "seed", "generation")
DEFAULT_BATCH_SIZE = 16


@dataclass
class Job:
    """One valid input line, with the options it runs under resolved."""

    line: int                       # 1-based line number in the input file
    id: str | int
    prompt: str | None              # the prompt text, or None for a chat line (``messages``)
    params: dict[str, dict[str, Any]] | None
    seed: int | None                # the line's seed, else the config sampler's, else None
    options: dict[str, Any]         # the full generation options (config + the line's overrides)
    messages: list[dict[str, Any]] | None = None    # a chat line's conversation (options["chat"] is true)

    @property
    def input(self) -> str | list[dict[str, Any]]:
        """What the line generates from: the prompt text or the conversation."""
        return self.messages if self.messages is not None else self.prompt

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
    duplicates: int = 0             # rows of the output that repeated an (id, sample), removed


# -- reader and validator ---------------------------------------------------------------

def read_jobs(path: str | Path, config: RunConfig) -> tuple[list[Job], list[dict[str, Any]]]:
    """Parse and validate every line; returns the valid jobs and one error record per bad line.

    Blank lines are skipped. The second and later lines with an id already seen are errors.
    """
    pipeline = Pipeline.from_config(config)
    segment_pipelines = [Pipeline(seg.processors, seg.sampler, on_invalid=config.on_invalid) for seg in config.segments]
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
                job = parse_line(text, number, pipeline, config, segment_pipelines)
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


def parse_line(text: str, number: int, pipeline: Pipeline, config: RunConfig,
               segment_pipelines: Sequence[Pipeline] = ()) -> Job:
    """One input line as a :class:`Job`; every problem of the line in one :class:`LineError`.
    ``segment_pipelines``: the config's ``segments:`` pipelines, whose steps a line's ``params``
    and ``seed`` may address too (as ``rows=`` and ``seeds=`` may)."""
    phases = [*segment_pipelines, pipeline]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise LineError(f"each line is a JSON object with at least id and prompt (or messages), got {type(data).__name__}")
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
    messages = None
    if "prompt" in data and "messages" in data:
        issues.append(ConfigIssue("messages", "give either prompt (text) or messages (a chat conversation), not both"))
    elif "messages" in data:
        messages = _check_messages(data["messages"], issues)
    elif "prompt" not in data:
        issues.append(ConfigIssue("prompt", 'is required (or "messages": a chat conversation, '
                                            '[{"role": "user", "content": "..."}])'))
    elif not isinstance(prompt, str):
        issues.append(ConfigIssue("prompt", f"must be a string, got {short_repr(prompt)}"))
    elif (surrogate := lone_surrogate(prompt)) is not None:
        issues.append(ConfigIssue("prompt", f"has a lone surrogate \\u{ord(prompt[surrogate]):04x} at character "
                                            f"{surrogate + 1}, which is not text; a \\ud800-\\udfff escape in JSON "
                                            f"must be half of a pair (like \\ud83d\\ude00)"))
    # A lone surrogate anywhere else (pydantic cannot even word its error about one). The id is
    # an opaque key, only echoed back (JSON-escaped), so it may hold one.
    elsewhere = {k: v for k, v in data.items() if k not in ("prompt", "messages", "id")}
    if (surrogate_issue := lone_surrogate_in(elsewhere)) is not None:
        raise LineError("; ".join(map(str, [*issues, surrogate_issue])), line_id)
    params = _check_params(data.get("params"), phases, issues)
    seed = _check_seed(data.get("seed"), phases, issues)
    options = config.generation.model_dump()
    overrides = data.get("generation")
    if overrides is not None:
        if not isinstance(overrides, dict):
            issues.append(ConfigIssue("generation", f"must be an object of generation options, got {short_repr(overrides)}"))
        else:
            try:
                checked = validate_generation(config.generation, overrides)
                options = checked.model_dump()
                for phase in phases:
                    issues.extend(check_stages(checked.logprob_stages, phase.processors, phase.sampler))
            except ConfigError as exc:
                issues.extend(exc.issues)
    if "messages" in data and isinstance(overrides, dict) and overrides.get("chat") is False:
        issues.append(ConfigIssue("generation chat", "a line with messages is always rendered through the chat "
                                                     "template; leave chat out (or true), or give a prompt instead"))
    if issues:
        raise LineError("; ".join(map(str, issues)), line_id)
    if seed is None:
        # The config's seed, made explicit: `seeds=[None]` would give n > 1 samples one stream.
        seed = getattr(pipeline.sampler.params, "seed", None)
    if messages is not None:
        options["chat"] = True
        prompt = None
    return Job(number, line_id, prompt, params, seed, options, messages)


def _check_messages(messages: Any, issues: list[ConfigIssue]) -> list[dict[str, Any]] | None:
    """A chat line's conversation, validated as ``samplerkit generate --chat`` and the server
    validate it (:func:`samplerkit.chat_template.check_messages`); a lone surrogate in a
    message's text is named like one in a prompt."""
    try:
        checked = check_messages(messages, "messages")
    except GenerationError as exc:
        issues.append(ConfigIssue("", str(exc)))
        return None
    for j, m in enumerate(checked):
        if (surrogate := lone_surrogate(m["content"])) is not None:
            issues.append(ConfigIssue(f"messages message {j}", f"content has a lone surrogate "
                                                                f"\\u{ord(m['content'][surrogate]):04x} at character "
                                                                f"{surrogate + 1}, which is not text"))
            return None
    return checked


def _unknown_key_message(key: str) -> str:
    from samplerkit.config import GenerationConfig

    if key in GenerationConfig.model_fields:
        return f'unknown key; generation options go in "generation", like {{"generation": {{"{key}": ...}}}}'
    return f"unknown key{did_you_mean(key, LINE_KEYS)} Keys: {', '.join(LINE_KEYS)}"


def _check_params(params: Any, pipelines: Sequence[Pipeline], issues: list[ConfigIssue]) -> dict[str, dict[str, Any]] | None:
    """Validate per-line overrides against the steps' own parameter models (as ``rows=`` would):
    a name may be a step of any of ``pipelines`` (the top-level one and the segments'), and its
    values must suit every step of that name."""
    if params is None or params == {}:
        return None
    if not isinstance(params, dict):
        issues.append(ConfigIssue("params", f'must be an object of step name -> {{field: value}}, like '
                                            f'{{"top_p": {{"top_p": 0.9}}}}, got {short_repr(params)}'))
        return None
    steps: dict[str, list] = {}
    for pipeline in pipelines:
        for spec in (*pipeline.processors, pipeline.sampler):
            steps.setdefault(spec.name, []).append(spec)
    where = "this pipeline" if len(pipelines) == 1 else "this pipeline or its segments"
    for name, values in params.items():
        if name not in steps:
            issues.append(ConfigIssue(f"params {name}", f"not a step of {where} (steps: {', '.join(sorted(steps))})"
                                                        f"{did_you_mean(name, steps).rstrip('.')}"))
        elif not isinstance(values, dict):
            issues.append(ConfigIssue(f"params {name}", f'must be an object of field: value, like {{"{name}": {{...}}}}, got {short_repr(values)}'))
        else:
            for spec in steps[name]:
                try:
                    spec.with_params(values, f"params {name}")
                except ConfigError as exc:
                    issues.extend(exc.issues)
                    break
    return params


def _check_seed(seed: Any, pipelines: Sequence[Pipeline], issues: list[ConfigIssue]) -> int | None:
    if seed is None:
        return None
    if not any(p.takes_seed for p in pipelines):
        where = "this pipeline" if len(pipelines) == 1 else "this pipeline nor its segments"
        issues.append(ConfigIssue("seed", f"no step of {where} takes a seed (sampler {pipelines[-1].sampler.name!r}); "
                                          "leave it out or use a random sampler such as categorical"))
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        issues.append(ConfigIssue("seed", f"must be an integer, got {short_repr(seed)}"))
        return None
    if not 0 <= seed < 2**63:
        issues.append(ConfigIssue("seed", f"must be in [0, 2**63), got {short_repr(seed)}"))
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
            [j.input for j in jobs], seeds=seeds if any(s is not None for s in seeds) else None,
            rows=params if any(params) else None, **jobs[0].options)
    except Exception as exc:
        # Any exception, not only samplerkit's own: a line that trips an unexpected error (in a
        # plugin, a tokenizer) must not end the job for every other line, on every rerun. A
        # systemic failure still shows: every line of the job then reports it.
        if len(jobs) == 1:
            return [], [error_record(jobs[0].line, jobs[0].id, failure_message(exc))]
        rows: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for job in jobs:
            r, e = run_jobs(generator, [job])
            rows += r
            errors += e
        return rows, errors
    return [result_row(jobs[c.prompt_index], c) for c in completions], []


def failure_message(exc: BaseException) -> str:
    """The errors file's text for a line whose generation failed."""
    return str(exc) if isinstance(exc, SamplerkitError) else f"generation failed: {type(exc).__name__}: {exc}"


def run_engine(generator, jobs: Sequence[Job], batch_size: int
               ) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Run ``jobs`` through one :class:`~samplerkit.engine.Engine` (continuous batching) in
    this thread; yields the output rows and error records of the lines that finished at each
    engine step (lines finishing at the same step in the order of ``jobs``).

    Lines are submitted while their rows fit in ``batch_size`` (a line with more rows than
    that runs alone, never split), the largest ``max_new_tokens`` first (input order among
    equals), so that a long line does not start last and run nearly alone at the end; a
    finished line's rows are free for the next lines before the next step, and lines with
    different generation options run side by side. A line that fails while others run with it is run again alone at the end (its
    failure may be a neighbour's: a backend that fails a joint prefill fails every running
    row); a line that fails alone is an error record. Seeded lines give the same rows either
    way (seeded rows don't depend on their batch)."""
    from samplerkit.engine import Engine

    if not jobs:
        return
    engine = Engine(generator, max_rows=max(batch_size, max(j.rows for j in jobs)))
    # Longest budget first (sorted is stable: input order among equals); popped from the end.
    pending = list(reversed(sorted(jobs, key=lambda j: -j.options["max_new_tokens"])))
    active: dict[Any, Job] = {}             # request -> job, in submission order
    retry: list[Job] = []
    rows_in_use = 0

    def submit(job: Job) -> tuple[Any, dict[str, Any] | None]:
        try:
            return engine.submit(job.input, seed=job.seed, overrides=job.params, **job.options), None
        except Exception as exc:        # noqa: BLE001 - a line's own problem (too long, no template)
            return None, error_record(job.line, job.id, failure_message(exc))

    try:
        while pending or active:
            errors: list[dict[str, Any]] = []
            while pending and (not active or rows_in_use + pending[-1].rows <= batch_size):
                job = pending.pop()
                request, error = submit(job)
                if error is not None:
                    errors.append(error)
                    continue
                active[request] = job
                rows_in_use += job.rows
            together = len(active) > 1
            if active and not all(r.done for r in active):
                engine.step()
            rows: list[dict[str, Any]] = []
            for request in sorted((r for r in active if r.done), key=lambda r: active[r].line):
                job = active.pop(request)
                rows_in_use -= job.rows
                try:
                    completions = request.result()
                except Exception as exc:    # noqa: BLE001 - one line's failure
                    if together:
                        retry.append(job)
                    else:
                        errors.append(error_record(job.line, job.id, failure_message(exc)))
                    continue
                rows.extend(result_row(job, c) for c in completions)
            if rows or errors:
                yield rows, errors
        for job in retry:                   # alone now: the error is the line's own
            request, error = submit(job)
            if error is None:
                engine.run_until_idle()
                try:
                    yield [result_row(job, c) for c in request.result()], []
                    continue
                except Exception as exc:    # noqa: BLE001
                    error = error_record(job.line, job.id, failure_message(exc))
            yield [], [error]
    finally:
        engine.close()


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


# -- file safety ----------------------------------------------------------------------------

class BatchIOError(SamplerkitError):
    """Writing a job's files failed (disk full, I/O error). The rows written before are intact
    and a rerun resumes; the CLI exits with status 1 (2 is for usage errors)."""

    exit_code = 1


def json_line(record: Mapping[str, Any]) -> bytes:
    """One JSONL line as UTF-8 bytes. Text is written as is (``ensure_ascii=False``), except in a
    record holding a lone surrogate (valid in JSON as ``"\\ud800"``, not encodable as UTF-8),
    which is written escaped so it reads back as the same value."""
    text = json.dumps(record, ensure_ascii=False)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode("ascii")


def _write_all(fd: int, data: bytes) -> None:
    # os.write may write less than asked (a signal, a nearly full disk); the rest follows or raises.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _identity(path: Path) -> tuple:
    """What names a file: (device, inode) when it exists, so symlinks and hard links compare
    equal; else the fully resolved path (a dangling symlink resolves to where it would write)."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def check_paths(input_path: Path, output_path: Path, errors_path: Path) -> None:
    """Refuse, before anything is opened for writing, an output that is a directory and any two
    of input/output/errors that are the same file (by name, symlink or hard link): writing one
    would empty the other."""
    for flag, path, example in (("--output", output_path, "results.jsonl"), ("--errors", errors_path, "errors.jsonl")):
        if path.is_dir():
            raise SamplerkitError(f"{flag} {path} is a directory; give a file name, like {path / example}")
        # A device or a pipe (/dev/full, /dev/stderr) cannot be read back to resume, and renaming
        # a new file over its name would replace the device node.
        if path.exists() and not path.is_file():
            raise SamplerkitError(f"{flag} {path} is not a regular file (a device, a pipe or a socket); give the "
                                  f"name of a file")
    named = [("--input", input_path), ("--output", output_path), ("--errors", errors_path),
             ("the lock file", lock_path(output_path))]
    for (flag_a, a), (flag_b, b) in itertools.combinations(named, 2):
        if _identity(a) == _identity(b):
            how = "" if os.path.abspath(a) == os.path.abspath(b) else " (through a symbolic or hard link)"
            raise SamplerkitError(f"{flag_a} {a} and {flag_b} {b} are the same file{how}; writing one would "
                                  f"destroy the other: give each its own file")


def lock_path(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + ".lock")


#: errnos of a failing or full disk rather than of a wrong path or permission.
_IO_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}


def _cannot(what: str, path: Path, exc: OSError) -> SamplerkitError:
    """A failure to open or create one of the job's files: a wrong path or permission is the
    user's to fix (exit 2); a full or failing disk is an I/O error (exit 1)."""
    if exc.errno in _IO_ERRNOS:
        return BatchIOError(f"cannot {what} {path}: {exc.strerror or exc}; the rows written before are intact: "
                            f"fix this (free space) and rerun the same command to resume")
    hint = {errno.EACCES: "choose a location you can write to", errno.EPERM: "choose a location you can write to",
            errno.EROFS: "the file system is read-only: choose another location",
            errno.ENOENT: "its directory does not exist", errno.ENOTDIR: "a part of the path is not a directory",
            errno.ENOSPC: "the disk is full", errno.EISDIR: "it is a directory"}.get(exc.errno, "")
    return SamplerkitError(f"cannot {what} {path}: {exc.strerror or exc}" + (f" ({hint})" if hint else ""))


class OutputLock:
    """An exclusive ``flock`` on ``OUTPUT.lock`` for the whole job, so two jobs never append to one
    output. The holder's pid is written in the file for the second job's message; the file is
    removed on release."""

    def __init__(self, output_path: Path):
        self.output_path = output_path
        self.path = lock_path(output_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        while True:
            try:
                # O_NOFOLLOW: a planted symlink at the lock's name is refused, not written through.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise SamplerkitError(f"the lock file {self.path} is a symbolic link; samplerkit does not write "
                                          f"through links next to the output: remove it") from None
                raise _cannot("create the lock file", self.path, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise SamplerkitError(f"another samplerkit batch (pid {holder}) is writing {self.output_path} "
                                      f"(it holds {self.path}); wait for it to finish, or choose another --output") from None
            # The previous holder unlinks the file on release; if that happened between our open and
            # our flock, our lock is on an orphan no later job will see: open the new file instead.
            st = os.fstat(fd)
            try:
                current = os.stat(self.path, follow_symlinks=False)
                same = (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise SamplerkitError(f"the lock file {self.path} is not a plain file of its own (a hard link or a "
                                  f"device); samplerkit does not write through it: remove it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)        # while still locked, so no other job can be holding it
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _replace_with(target: Path, chunks: Iterable[bytes], mode: int | None) -> None:
    """Atomically replace ``target`` by a new file with ``chunks``: written to a temporary file
    created exclusively (``mkstemp``: ``O_EXCL``, a random name, never a planted symlink) in the
    same directory, fsynced, then renamed over ``target`` (the rename replaces the name, it
    never writes through a link there)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
            os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- writer and resume ------------------------------------------------------------------

class Output:
    """The results file: appended one whole batch at a time with write + fsync.

    On opening, the rows already there tell which lines are done. A crash can leave a
    truncated last line (dropped) or only some of a line's ``n`` samples (those rows are
    dropped too, the file rewritten atomically, and the line runs again). A row whose
    ``(id, sample)`` is already in the file (two jobs that ran at once before the lock
    existed) is a duplicate: the first is kept, the file rewritten.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.samples: dict[str, set[int]] = {}
        self.duplicates = 0
        self._truncated = False
        self._fd: int | None = None
        if self.path.exists():
            try:
                for _ in self._rows():
                    pass
            except OSError as exc:
                raise _cannot("read the output file", self.path, exc) from None

    def _rows(self) -> Iterator[tuple[str, bytes]]:
        """``(id key, line)`` of every complete row, first copy of each ``(id, sample)`` only;
        records the samples seen and counts the duplicates."""
        self.samples = {}
        self.duplicates = 0
        self._truncated = False
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
                seen = self.samples.setdefault(key, set())
                if sample in seen:
                    self.duplicates += 1
                    continue
                seen.add(sample)
                yield key, raw

    def done(self, job: Job) -> bool:
        return set(range(job.rows)) <= self.samples.get(job.key, set())

    def prepare(self, jobs: Sequence[Job]) -> None:
        """Drop a truncated last line, duplicated rows and the rows of lines that will run again;
        open for appending."""
        rerun = {j.key for j in jobs if j.key in self.samples and not self.done(j)}
        if self._truncated or rerun or self.duplicates:
            # The real file, so an output that is a symlink stays one (the link is the user's).
            target = Path(os.path.realpath(self.path))
            try:
                _replace_with(target, (line for key, line in self._rows() if key not in rerun),
                              stat.S_IMODE(os.stat(target).st_mode))
            except OSError as exc:
                raise BatchIOError(f"cannot rewrite the output file {self.path}: {exc.strerror or exc}; it is "
                                   f"unchanged: fix this and rerun the same command") from None
            for key in rerun:
                del self.samples[key]
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise _cannot("open the output file", self.path, exc) from None

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        try:
            _write_all(self._fd, b"".join(json_line(r) for r in rows))
            os.fsync(self._fd)
        except OSError as exc:
            raise BatchIOError(f"cannot write to the output file {self.path}: {exc.strerror or exc}; the rows "
                               f"written before are intact: fix this (free space) and rerun the same command "
                               f"to resume") from None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class ErrorLog:
    """The errors file, rewritten by each run (validation is deterministic, so a rerun
    reports the same bad lines again and nothing twice). It starts as a new empty file renamed
    over the path, so whatever was there (a symlink, a hard link to another file) is replaced,
    never written through."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0
        try:
            _replace_with(self.path, (), None)
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise _cannot("create the errors file", self.path, exc) from None

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        records = list(records)
        if records:
            try:
                _write_all(self._fd, b"".join(json_line(r) for r in records))
            except OSError as exc:
                raise BatchIOError(f"cannot write to the errors file {self.path}: {exc.strerror or exc}; the rows "
                                   f"written before are intact: fix this (free space) and rerun the same command "
                                   f"to resume") from None
            self.count += len(records)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


# -- runner ------------------------------------------------------------------------------

#: Runs the lines (in input order) with at most ``batch_size`` rows at once, somewhere; yields
#: (output rows, error records) as lines finish.
Executor = Callable[[list[Job], int], Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]]


def local_executor(config: RunConfig, registry=None, backend=None) -> Executor:
    """Run the lines in this process with one :class:`~samplerkit.Generator` (the model loads
    once) driving one :class:`~samplerkit.engine.Engine`: see :func:`run_engine`."""
    def run(jobs: list[Job], batch_size: int):
        if not jobs:
            return
        from samplerkit.generate import Generator

        yield from run_engine(Generator(config, registry=registry, backend=backend), jobs, batch_size)
    return run


def run_batch(config: RunConfig, input_path: str | Path, output_path: str | Path, *,
              errors_path: str | Path | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
              executor: Executor | None = None, progress: bool | None = None,
              on_batch: Callable[[int], None] | None = None) -> Summary:
    """Run every line of ``input_path`` not yet in ``output_path``; see the module docstring.

    ``progress``: a tqdm bar (None: only when stderr is a terminal and ``SAMPLERKIT_QUIET`` is
    unset). ``on_batch(i)`` is called after the ``i``-th write (0-based; one write per engine
    step at which lines finished, or per batch on Ray).

    Before anything is written: the three paths are checked (:func:`check_paths`) and the
    output is locked (:class:`OutputLock`) for the whole job.
    """
    if batch_size < 1:
        raise SamplerkitError(f"--batch-size must be >= 1, got {batch_size}")
    input_path, output_path = Path(input_path), Path(output_path)
    errors_path = Path(errors_path) if errors_path is not None else Path(f"{output_path}.errors.jsonl")
    check_paths(input_path, output_path, errors_path)
    for path in {output_path.parent, errors_path.parent}:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cannot("create the directory", path, exc) from None
    lock = OutputLock(output_path)
    lock.acquire()
    try:
        return _run_locked(config, input_path, output_path, errors_path, batch_size, executor, progress, on_batch)
    finally:
        lock.release()


def _run_locked(config, input_path, output_path, errors_path, batch_size, executor, progress, on_batch) -> Summary:
    jobs, bad = read_jobs(input_path, config)
    output = Output(output_path)
    summary = Summary(lines=len(jobs) + len(bad), errors_path=str(errors_path), duplicates=output.duplicates)
    todo = [j for j in jobs if not output.done(j)]
    summary.skipped = len(jobs) - len(todo)
    output.prepare(jobs)
    try:
        errors = ErrorLog(errors_path)
    except BaseException:
        output.close()
        raise
    rows_of_line = {j.line: j.rows for j in todo}
    bar = _progress_bar(sum(rows_of_line.values()), progress)
    started = time.monotonic()
    try:
        errors.write(bad)
        for index, (rows, failed) in enumerate((executor or local_executor(config))(todo, batch_size)):
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


__all__ = ["DEFAULT_BATCH_SIZE", "BatchIOError", "Job", "Output", "OutputLock", "Summary", "check_paths", "local_executor", "plan_batches", "read_jobs",
           "run_batch", "run_engine", "run_jobs"]
