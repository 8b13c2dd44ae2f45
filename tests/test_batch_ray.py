"""`samplerkit batch --ray`: the same rows as the local run, from Ray Data actors on a local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'samplerkit[ray]' (ray[data]>=2.9) to run the Ray path's tests")
pytest.importorskip("ray.data", reason="Ray Data is missing: pip install 'ray[data]'")

from samplerkit.batch import run_batch  # noqa: E402
from samplerkit.batch_ray import ray_executor  # noqa: E402
from samplerkit.cli import main  # noqa: E402
from samplerkit.config import resolve  # noqa: E402
from samplerkit.registry import default_registry  # noqa: E402

# Ray Data's own DataContext warns about its deprecated settings when first read.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

CONFIG = {
    "backend": {"name": "bigram", "max_context": 24},
    "pipeline": [{"temperature": 0.9}, {"top_p": 0.95}],
    "sampler": {"name": "categorical", "seed": 11},
    "generation": {"max_new_tokens": 8},
}
PROMPTS = ["The capital", "She sells", "A bird", "Peter", "Time flies", "The sun"]
LINES = (
    [{"id": f"p{i}", "prompt": PROMPTS[i % 6], "seed": 100 + i} for i in range(7)]
    + [{"id": i, "prompt": PROMPTS[i % 6], "seed": i, "params": {"top_p": {"top_p": 0.5}},
        "generation": {"n": 2, "logprobs": 1}} for i in range(4)]
    + [{"id": "cfg-seed", "prompt": "The"},                                            # the config's seed
       {"id": "too-long", "prompt": "a prompt longer than the context allows", "seed": 1},  # fails at generation
       {"id": "bad", "prompt": "x", "params": {"top_p": {"top_p": 2}}}]                 # fails validation
)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def write_input(path: Path) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    return path


def rows_of(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()),
                  key=lambda r: (json.dumps(r["id"]), r.get("sample", -1), r.get("line", 0)))


def test_ray_run_writes_the_same_rows_as_the_local_run(tmp_path, local_ray):
    config = resolve(CONFIG, default_registry())
    src = write_input(tmp_path / "in.jsonl")
    local = run_batch(config, src, tmp_path / "local.jsonl", batch_size=3)
    remote = run_batch(config, src, tmp_path / "ray.jsonl", batch_size=5, executor=ray_executor(config, workers=2))
    assert (remote.rows_written, remote.errors) == (local.rows_written, local.errors) == (16, 2)
    assert rows_of(tmp_path / "ray.jsonl") == rows_of(tmp_path / "local.jsonl")
    assert rows_of(tmp_path / "ray.jsonl.errors.jsonl") == rows_of(tmp_path / "local.jsonl.errors.jsonl")


def test_ray_cli_resumes_a_partial_output(tmp_path, local_ray, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps(CONFIG))
    src = write_input(tmp_path / "in.jsonl")
    args = ["batch", "-c", str(cfg), "-i", str(src), "--batch-size", "4"]
    assert main([*args, "-o", str(tmp_path / "local.jsonl")]) == 0
    full = (tmp_path / "local.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "ray.jsonl"
    out.write_text("".join(full[:5]) + full[5][:10])                 # part done, then a crash mid-line
    assert main([*args, "-o", str(out), "--ray", "--ray-workers", "2"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "rows written" in err and "Traceback" not in err
    assert rows_of(out) == rows_of(tmp_path / "local.jsonl")
