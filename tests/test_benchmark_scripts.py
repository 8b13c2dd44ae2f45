"""The benchmarks of this round's features still run (tiny settings; no timing is asserted):
docs/performance.md quotes their tables, so a script that broke would leave those numbers
unreproducible."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "bench_batch": (["--backend", "bigram", "--lines", "6", "--batch-size", "3", "--repeats", "1"], "engine / fixed"),
    "bench_engine": (["--clients", "1", "2", "--lengths", "2", "--sequential-sample", "1", "--threads", "1"],
                     "speed-up"),
    "bench_serve": (["--concurrency", "1,2", "--max-tokens", "2", "--sequential-max", "1", "--servers", "samplerkit"],
                    "tok/s"),
    "bench_structured": (["--reps", "1", "--rounds", "1", "--skip-model", "--threads", "1"], "49152"),
    "bench_segments": (["--backend", "bigram", "--batch", "2", "--new-tokens", "8", "--reps", "1"], "segments, switching"),
    # The default model through the compiled kernels (skipped where they cannot load).
    "bench_decode_profile": (["--steps", "2"], "weights read per step"),
    "bench_llamacpp": (["--engines", "--forms", "auto", "--new-tokens", "2", "--repeats", "1", "--batches", "1",
                        "--prefill-tokens", "16"], "x llama.cpp"),
}
#: Scripts that need samplerkit's compiled kernels (bench_decode_profile) or llama-cpp-python.
NEEDS = {"bench_decode_profile": "native", "bench_llamacpp": "samplerkit_llamacpp"}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_script_runs(script, tmp_path):
    args, expect = CASES[script]
    if NEEDS.get(script) == "native":
        from samplerkit.builtins.backends.llama import native

        if native.kernels() is None:
            pytest.skip(f"compiled kernels unavailable: {native.unavailable_reason()}")
    elif script in NEEDS:
        pytest.importorskip(NEEDS[script])
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout, out.stdout[-3000:]
