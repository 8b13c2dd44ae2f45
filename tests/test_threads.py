"""A BoundPipeline shared between threads (issue 14 item 10, the pipeline part).

The bound pipeline and its steps reuse [B, V] workspaces from call to call; calls on one
bound pipeline from several threads are serialised by its lock (docs/library.md), so every
thread gets exactly the tokens a sequential run gives."""

from __future__ import annotations

import threading

import pytest
import torch

import samplerkit

THREADS = 8
CALLS = 12


@pytest.mark.parametrize("pipeline", [
    [{"temperature": 0.7}, {"top_p": 0.9}],
    [{"temperature": 0.9}, {"top_k": 40}, {"top_p": 0.8}],
    [{"min_p": 0.02}, {"typical_p": {"typical_p": 0.9}}],
], ids=["temperature+top_p", "temperature+top_k+top_p", "min_p+typical_p"])
def test_shared_bound_pipeline_from_8_threads_gives_the_sequential_ids(pipeline):
    pipe = samplerkit.load_pipeline({"pipeline": pipeline, "sampler": "categorical"})
    bound = pipe.bind(4, seeds=[1, 2, 3, 4])
    g = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(4, 32768, generator=g) * (1 + t) for _ in range(CALLS)] for t in range(THREADS)]
    expected = [[bound.sample(x) for x in per_thread] for per_thread in inputs]
    got: list[list[torch.Tensor] | None] = [None] * THREADS
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        try:
            start.wait()
            got[t] = [bound.sample(x) for x in inputs[t]]
        except BaseException as exc:   # reported below, with the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    wrong = [(t, c) for t in range(THREADS) for c in range(CALLS) if not torch.equal(got[t][c], expected[t][c])]
    assert not wrong, f"{len(wrong)} of {THREADS * CALLS} calls gave other ids than sequentially: {wrong[:5]}"


def test_the_lock_is_held_per_bound_pipeline_not_globally():
    pipe = samplerkit.load_pipeline({"pipeline": [{"top_p": 0.9}], "sampler": "categorical"})
    a, b = pipe.bind(2), pipe.bind(2)
    with a._lock:                     # one busy bound pipeline does not block another
        assert b._lock.acquire(blocking=False)
        b._lock.release()
