"""Batch invariance on the real default model (slow): a seeded row gives the same tokens alone
and at any position of any batch, with the default settings (weights: auto), through the
library and through ``samplerkit batch``. See docs/cli.md for what is guaranteed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import samplerkit
from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams

pytestmark = pytest.mark.slow

# Different lengths (3 to ~40 tokens) so every batch is padded.
PROMPTS = ["The capital of France is",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who",
           "def fibonacci(n):",
           "<|im_start|>user\nWrite a haiku about rain and the city at night.<|im_end|>\n<|im_start|>assistant\n",
           "List three colors:"]
SEEDS = [11, 12, 13, 14, 15]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def backend(default_model_path):
    return LlamaBackend(LlamaParams())


def tokens(backend, idx: list[int], n: int) -> dict[tuple[int, int], list[int]]:
    """{(prompt, sample): token ids} for the prompts ``idx`` run as one batch, seeded per prompt."""
    out = samplerkit.generate([PROMPTS[i] for i in idx], {"backend": "llama"}, backend=backend,
                              seeds=[SEEDS[i] for i in idx], n=n, max_new_tokens=NEW_TOKENS)
    return {(idx[c.prompt_index], c.sample_index): c.token_ids for c in out}


@pytest.mark.parametrize("n", [1, 2])
def test_seeded_rows_equal_alone_and_in_batches_of_2_and_5(backend, n):
    alone: dict = {}
    for i in range(len(PROMPTS)):
        alone |= tokens(backend, [i], n)
    # Rows that stop early (EOS) and rows that run on share batches; positions change.
    for idx in ([0, 1], [3, 2], [4, 3, 2, 1, 0], [1, 4, 0, 2, 3]):
        got = tokens(backend, idx, n)
        for key, ids in got.items():
            assert ids == alone[key], (idx, key)
    assert len({tuple(v) for v in alone.values()}) == len(alone)  # the rows really differ


def test_samplerkit_batch_gives_the_same_rows_at_batch_size_1_and_5(backend, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p, "seed": SEEDS[i],
                                       "generation": {"n": 2 if i % 2 else 1}}) + "\n"
                           for i, p in enumerate(PROMPTS)))
    env = {**os.environ, "SAMPLERKIT_QUIET": "1", "PYTHONPATH": str(Path(samplerkit.__file__).parents[1])}
    rows = {}
    for size in (1, 5):
        out = tmp_path / f"out{size}.jsonl"
        proc = subprocess.run([sys.executable, "-m", "samplerkit.cli", "batch", "--set", "backend=llama",
                               "--set", f"generation.max_new_tokens={NEW_TOKENS}", "--input", str(src), "--output", str(out),
                               "--batch-size", str(size)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        rows[size] = sorted((r["id"], r["sample"], r["token_ids"]) for r in map(json.loads, out.read_text().splitlines()))
    assert len(rows[1]) == 7
    assert rows[1] == rows[5]
