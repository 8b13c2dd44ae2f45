"""Hostile file set-ups for `samplerkit batch` (issue 14, items 1-5): nothing a user or a
planted name does makes the job lose rows, write through a link, or print a traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from samplerkit.batch import OutputLock
from samplerkit.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"backend": "bigram", "pipeline": [{"temperature": 0.9}], "sampler": {"name": "categorical", "seed": 11},
          "generation": {"max_new_tokens": 6}}
PROMPTS = ["The capital", "She sells", "A bird", "Peter", "Time flies", "The sun"]


def lines(count: int, **extra) -> list[dict]:
    return [{"id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": 100 + i, **extra} for i in range(count)]


def write_lines(path: Path, items) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def keys(rows) -> list[tuple[str, int]]:
    return sorted((json.dumps(r["id"]), r["sample"]) for r in rows)


@pytest.fixture
def job(tmp_path):
    """A config, a 6-line input and the argv of `samplerkit batch` on them."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(CONFIG))
    src = write_lines(tmp_path / "in.jsonl", lines(6))
    out = tmp_path / "out.jsonl"
    return cfg, src, out, ["batch", "-c", str(cfg), "-i", str(src), "-o", str(out)]


def run(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def samplerkit_script() -> str:
    script = shutil.which("samplerkit", path=str(Path(sys.executable).parent))
    assert script is not None, "the samplerkit console script is not installed (pip install -e .)"
    return script


def real_command(*argv, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAMPLERKIT_QUIET": "1"}
    return subprocess.run([samplerkit_script(), *map(str, argv)], capture_output=True, env=env, timeout=120, **kwargs)


# -- 1. any two of input/output/errors being one file ------------------------------------------

def test_errors_on_the_output_of_a_finished_job_is_refused_by_the_real_command(job):
    """The issue's case: `--errors out.jsonl` on a finished job emptied it (52 rows -> 0, exit 0)."""
    cfg, src, out, argv = job
    first = real_command(*argv)
    assert first.returncode == 0, first.stderr
    before = out.read_bytes()
    assert len(rows_of(out)) == 6
    again = real_command("batch", "-c", cfg, "-i", src, "-o", out, "--errors", out)
    assert again.returncode == 2, again.stderr
    err = again.stderr.decode()
    assert "Traceback" not in err
    assert f"--output {out} and --errors {out} are the same file" in err
    assert out.read_bytes() == before


def _hard_link(target: Path, name: Path) -> Path:
    os.link(target, name)
    return name


def _symlink(target: Path, name: Path) -> Path:
    name.symlink_to(target)
    return name


@pytest.mark.parametrize("case", [
    "errors=input", "errors=output", "output=input", "errors symlink->output", "errors hardlink->input",
    "output symlink->input", "errors dangling symlink->output not yet created", "errors=lock file",
    "input=default errors file",
])
def test_two_roles_on_one_file_are_refused_before_anything_is_written(job, capsys, case):
    cfg, src, out, argv = job
    tmp = src.parent
    if case != "errors dangling symlink->output not yet created":
        assert run(capsys, argv)[0] == 0                               # a finished job
    files = {p: p.read_bytes() for p in (src, out) if p.exists()}
    extra = {                                                          # each builds its set-up when chosen
        "errors=input": lambda: ["--errors", src],
        "errors=output": lambda: ["--errors", out],
        "output=input": lambda: ["-o", src],
        "errors symlink->output": lambda: ["--errors", _symlink(out, tmp / "e.jsonl")],
        "errors hardlink->input": lambda: ["--errors", _hard_link(src, tmp / "e.jsonl")],
        "output symlink->input": lambda: ["-o", _symlink(src, tmp / "o2.jsonl")],
        "errors dangling symlink->output not yet created": lambda: [
            "-o", tmp / "new.jsonl", "--errors", _symlink(tmp / "new.jsonl", tmp / "e.jsonl")],
        "errors=lock file": lambda: ["--errors", tmp / "out.jsonl.lock"],
        "input=default errors file": lambda: ["-i", tmp / "out.jsonl.errors.jsonl"],
    }[case]()
    if case == "input=default errors file":
        shutil.copy(src, tmp / "out.jsonl.errors.jsonl")
        files[tmp / "out.jsonl.errors.jsonl"] = src.read_bytes()
    code, _, err = run(capsys, [*argv, *extra])
    assert code == 2, err
    assert "are the same file" in err and "Traceback" not in err
    for path, content in files.items():
        assert path.read_bytes() == content, f"{path} changed"
    assert not (tmp / "new.jsonl").exists()


# -- 2. two jobs on one output; duplicated rows ------------------------------------------------

def test_a_second_job_on_a_locked_output_exits_2_naming_the_holder(job):
    cfg, src, out, argv = job
    lock = OutputLock(out)
    lock.acquire()                                                    # this process is "the first job"
    try:
        second = real_command(*argv)
    finally:
        lock.release()
    err = second.stderr.decode()
    assert second.returncode == 2, err
    assert f"another samplerkit batch (pid {os.getpid()}) is writing {out}" in err and "Traceback" not in err
    assert not out.exists()                                           # nothing written by the second job
    assert not (out.parent / "out.jsonl.lock").exists()               # released: the file is removed


def test_two_real_jobs_started_together_never_duplicate_a_row(job):
    """The issue's scenario: two jobs on one output at once both exited 0 with every row twice.
    Now one holds the lock and the other exits 2 naming it (or, started late, finds all done)."""
    cfg, src, out, argv = job
    write_lines(src, lines(150))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAMPLERKIT_QUIET": "1"}
    procs = [subprocess.Popen([samplerkit_script(), *argv], stderr=subprocess.PIPE, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    for p in procs:
        p.stderr.close()
    for code, err in results:
        assert "Traceback" not in err, err
        assert code == 0 or (code == 2 and "another samplerkit batch (pid " in err), err
    assert 0 in [code for code, _ in results]
    rows = rows_of(out)
    assert keys(rows) == sorted((json.dumps(f"p{i}"), 0) for i in range(150))     # each row once


def test_the_lock_is_released_after_a_job_so_the_next_one_runs(job, capsys):
    *_, out, argv = job
    assert run(capsys, argv)[0] == 0
    assert not (out.parent / "out.jsonl.lock").exists()
    code, _, err = run(capsys, argv)
    assert code == 0 and "6 lines already done" in err


def test_resume_removes_duplicated_rows_keeping_the_first(job, capsys):
    """Two unlocked jobs at once wrote every row twice, and a rerun kept the duplicates."""
    *_, out, argv = job
    assert run(capsys, argv)[0] == 0
    once = out.read_text()
    out.write_text(once + once)                                       # as the two jobs left it
    code, _, err = run(capsys, argv)
    assert code == 0, err
    assert "removed 6 duplicated rows" in err and "6 lines already done" in err
    assert out.read_text() == once


# -- 3. a failure confined to one line -----------------------------------------------------------

def test_a_lone_surrogate_prompt_is_an_error_line_and_the_job_finishes(job, capsys):
    cfg, src, out, argv = job
    with open(src, "a") as f:
        f.write('{"id":"b38","prompt":"\\ud800 x"}\n')                 # valid JSON, not text
    code, _, err = run(capsys, argv)
    assert code == 0 and "Traceback" not in err, err
    assert len(rows_of(out)) == 6
    [error] = rows_of(out.parent / "out.jsonl.errors.jsonl")
    assert error["line"] == 7 and error["id"] == "b38"
    assert "prompt: has a lone surrogate \\ud800 at character 1" in error["error"]


def test_an_unexpected_exception_in_one_line_goes_to_the_errors_file(job, capsys, monkeypatch):
    """The class of item 3: any failure confined to one line, not only samplerkit's own errors."""
    from samplerkit.generate import _Run

    real = _Run.start_rows

    def fail_on_sun(self):          # where both the engine and Generator.generate start a run's rows
        if "The sun" in self.inputs:
            raise ZeroDivisionError("a plugin bug")
        return real(self)
    monkeypatch.setattr(_Run, "start_rows", fail_on_sun)
    *_, out, argv = job
    code, _, err = run(capsys, argv)
    assert code == 0 and "1 errors" in err, err
    assert {r["id"] for r in rows_of(out)} == {"p0", "p1", "p2", "p3", "p4"}
    [error] = rows_of(out.parent / "out.jsonl.errors.jsonl")
    assert error == {"line": 6, "id": "p5", "error": "generation failed: ZeroDivisionError: a plugin bug"}


def test_an_id_with_a_lone_surrogate_is_written_escaped_and_resumes(job, capsys):
    cfg, src, out, argv = job
    write_lines(src, ['{"id": "\\udc80", "prompt": "The"}', '{"id": "\\udc80", "prompt": "again"}'])
    code, _, err = run(capsys, argv)
    assert code == 0, err
    [row] = rows_of(out)
    assert row["id"] == "\udc80"
    [error] = rows_of(out.parent / "out.jsonl.errors.jsonl")
    assert error["line"] == 2 and "duplicate id" in error["error"]
    code, _, err = run(capsys, argv)
    assert code == 0 and "1 lines already done" in err


# -- 4. planted names are never written through --------------------------------------------------

def test_a_planted_tmp_symlink_is_not_followed_when_the_output_is_rewritten(job, capsys):
    cfg, src, out, argv = job
    assert run(capsys, argv)[0] == 0
    full = out.read_text()
    out.write_text(full[:-20])                                        # a truncated last row: resume rewrites
    victim = src.parent / "victim.txt"
    victim.write_text("precious\n")
    (src.parent / "out.jsonl.tmp").symlink_to(victim)                 # the name the old code used
    code, _, err = run(capsys, argv)
    assert code == 0, err
    assert victim.read_text() == "precious\n"
    assert keys(rows_of(out)) == keys(json.loads(x) for x in full.splitlines())
    assert not [p.name for p in src.parent.iterdir() if p.name.startswith(".out.jsonl.")]   # no temporary left


def test_a_planted_symlink_at_the_errors_path_is_replaced_not_followed(job, capsys):
    cfg, src, out, argv = job
    victim = src.parent / "victim.txt"
    victim.write_text("precious\n")
    errors = src.parent / "errs.jsonl"
    errors.symlink_to(victim)
    write_lines(src, [*lines(2), {"id": "bad"}])
    code, _, err = run(capsys, [*argv, "--errors", errors])
    assert code == 0, err
    assert victim.read_text() == "precious\n"
    assert not errors.is_symlink() and rows_of(errors)[0]["id"] == "bad"


def test_a_planted_hard_link_at_the_errors_path_is_replaced_not_truncated(job, capsys):
    cfg, src, out, argv = job
    victim = src.parent / "victim.txt"
    victim.write_text("precious\n")
    os.link(victim, src.parent / "errs.jsonl")
    code, _, err = run(capsys, [*argv, "--errors", src.parent / "errs.jsonl"])
    assert code == 0, err
    assert victim.read_text() == "precious\n"


def test_a_planted_symlink_at_the_lock_path_is_refused(job, capsys):
    cfg, src, out, argv = job
    victim = src.parent / "victim.txt"
    victim.write_text("precious\n")
    (src.parent / "out.jsonl.lock").symlink_to(victim)
    code, _, err = run(capsys, argv)
    assert code == 2 and "is a symbolic link" in err and "Traceback" not in err
    assert victim.read_text() == "precious\n" and not out.exists()


def test_the_real_command_finishes_past_a_bad_line_and_planted_links(job):
    """Items 3 and 4 together through the real command: the issue's lone-surrogate line, a
    planted symlink at the errors path and at the old temporary name while a rewrite is due."""
    cfg, src, out, argv = job
    assert real_command(*argv).returncode == 0
    full = out.read_text()
    out.write_text(full[:-20])                                        # a truncated last row: resume rewrites
    with open(src, "a") as f:
        f.write('{"id":"b38","prompt":"\\ud800 x"}\n')
    victims = [src.parent / "victim1.txt", src.parent / "victim2.txt"]
    for victim in victims:
        victim.write_text("precious\n")
    (src.parent / "out.jsonl.tmp").symlink_to(victims[0])
    (src.parent / "errs.jsonl").symlink_to(victims[1])
    proc = real_command(*argv, "--errors", src.parent / "errs.jsonl")
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "7 lines, 1 rows written, 5 lines already done, 1 errors" in err
    assert [v.read_text() for v in victims] == ["precious\n", "precious\n"]
    assert keys(rows_of(out)) == keys(json.loads(x) for x in full.splitlines())
    [error] = rows_of(src.parent / "errs.jsonl")
    assert error["line"] == 7 and error["id"] == "b38" and "lone surrogate" in error["error"]


# -- 5. a directory, a read-only place, a full disk ----------------------------------------------

def test_the_real_command_in_a_place_it_cannot_write_exits_2(job):
    """/sys accepts no new files, even from root: a real location the job cannot write to."""
    cfg, src, out, argv = job
    if not Path("/sys").is_dir():
        pytest.skip("no /sys on this system")
    proc = real_command("batch", "-c", cfg, "-i", src, "-o", "/sys/samplerkit-results.jsonl")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "cannot create the lock file /sys/samplerkit-results.jsonl.lock: Permission denied" in err


@pytest.mark.parametrize("flag", ["--output", "--errors"])
def test_a_device_as_output_or_errors_is_refused(job, capsys, flag):
    """/dev/full as the output would be read forever on resume; /dev/stderr as the errors file
    would have a new file renamed over the device's name."""
    cfg, src, out, argv = job
    code, _, err = run(capsys, [*argv, flag, "/dev/full"])
    assert code == 2 and f"{flag} /dev/full is not a regular file" in err
    assert Path("/dev/full").is_char_device()

@pytest.mark.parametrize("flag", ["--output", "--errors"])
def test_output_or_errors_a_directory_is_a_clean_error(job, capsys, flag):
    cfg, src, out, argv = job
    directory = src.parent / "somewhere"
    directory.mkdir()
    code, _, err = run(capsys, [*argv, flag, directory])
    assert code == 2 and f"{flag} {directory} is a directory; give a file name" in err and "Traceback" not in err
    assert list(directory.iterdir()) == [] and not out.exists()


def test_output_in_a_read_only_location_is_a_clean_error(job, capsys, monkeypatch):
    """Simulated (tests run as root, for whom chmod does not forbid writing): the file system
    refuses to create anything in the output's directory, as a read-only mount does."""
    cfg, src, out, argv = job
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if Path(path).parent == out.parent and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    code, _, err = run(capsys, argv)
    assert code == 2 and "Traceback" not in err
    assert f"cannot create the lock file {out}.lock: Read-only file system" in err


class DiskFull:
    """``os.write`` that fails with ENOSPC after ``budget`` bytes to files other than stdio (the
    last write partial), as a disk filling up during a job."""

    def __init__(self, budget: int):
        self.budget = budget
        self.real = os.write

    def __call__(self, fd: int, data) -> int:
        if fd <= 2:
            return self.real(fd, data)
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = self.real(fd, bytes(data[: self.budget]))
        self.budget -= written
        return written


def test_a_full_disk_exits_1_with_rows_intact_and_the_job_resumes(job, capsys, monkeypatch):
    cfg, src, out, argv = job
    reference = src.parent / "reference.jsonl"
    assert run(capsys, [*argv[:-1], reference])[0] == 0               # the rows an uninterrupted job writes
    row_bytes = len(reference.read_bytes().splitlines(keepends=True)[0])
    monkeypatch.setattr(os, "write", DiskFull(budget=2 * row_bytes + row_bytes // 2))
    code, _, err = run(capsys, [*argv, "--batch-size", "2"])
    assert code == 1, err
    assert "Traceback" not in err
    assert f"cannot write to the output file {out}: No space left on device" in err
    assert "rerun the same command to resume" in err
    assert not (out.parent / "out.jsonl.lock").exists()
    assert out.read_bytes().count(b"\n") >= 1                         # what was written stays
    monkeypatch.undo()
    code, _, err = run(capsys, [*argv, "--batch-size", "2"])
    assert code == 0, err
    assert sorted(rows_of(out), key=json.dumps) == sorted(rows_of(reference), key=json.dumps)


def test_enospc_at_fsync_is_an_io_error_too(job, capsys, monkeypatch):
    """Some file systems report a full disk only when the data is flushed (at fsync/close)."""
    cfg, src, out, argv = job

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)
    code, _, err = run(capsys, argv)
    assert code == 1 and "No space left on device" in err and "Traceback" not in err


def test_a_full_disk_while_rewriting_the_output_leaves_it_unchanged(job, capsys, monkeypatch):
    """The resume rewrite (here: dropping a truncated row) fails half-way: the output is as it
    was, no temporary file is left, and the next run does the rewrite."""
    cfg, src, out, argv = job
    assert run(capsys, argv)[0] == 0
    full = out.read_text()
    out.write_text(full[:-20])
    monkeypatch.setattr(os, "write", DiskFull(budget=len(full) // 2))
    code, _, err = run(capsys, argv)
    assert code == 1 and f"cannot rewrite the output file {out}: No space left on device" in err, err
    assert out.read_text() == full[:-20]
    assert sorted(p.name for p in out.parent.iterdir()) == ["in.jsonl", "out.jsonl", "out.jsonl.errors.jsonl", "run.yaml"]
    monkeypatch.undo()
    code, _, err = run(capsys, argv)
    assert code == 0 and "1 rows written, 5 lines already done" in err
    assert keys(rows_of(out)) == keys(json.loads(x) for x in full.splitlines())
