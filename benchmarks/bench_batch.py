"""`samplerkit batch` on the continuous-batching Engine against fixed batches (what the local
path ran before, and what the Ray workers still run: ``plan_batches`` + ``run_jobs``).

Two files of --lines seeded lines (8 prompts of 4-13 tokens, rotated):

- ``budgets``: ``max_new_tokens`` 4, 48, 8 and 16 in turn, ``ignore_eos``: fixed batches group
  lines by generation options, so each of their batches is uniform (their best case);
- ``stops``: every line ``max_new_tokens: 48`` with ``stop: ["\\n"]``, so lines end at different
  steps and a fixed batch runs until its longest line is done.

Both ways run on one Generator, alternating, --repeats times; the table gives the median wall
time of each and checks that both wrote the same rows.

    python benchmarks/bench_batch.py --threads 1 --batch-size 8 --lines 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from samplerkit.batch import Job, plan_batches, run_engine, run_jobs
from samplerkit.generate import Generator

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fibonacci(n):",
           "List three colors:", "The best way to learn a language is", "In 1969, astronauts",
           "My favourite recipe starts with", "Write a haiku about rain:"]


def workload(gen: Generator, name: str, lines: int) -> list[Job]:
    base = gen.config.generation.model_dump()
    jobs = []
    for i in range(lines):
        if name == "budgets":
            options = {**base, "max_new_tokens": [4, 48, 8, 16][i % 4], "ignore_eos": True}
        else:
            options = {**base, "max_new_tokens": 48, "stop": ["\n"]}
        jobs.append(Job(i + 1, i, PROMPTS[i % len(PROMPTS)], None, i, options))
    return jobs


def fixed(gen: Generator, jobs: list[Job], batch_size: int) -> list[dict]:
    return [row for batch in plan_batches(jobs, batch_size) for row in run_jobs(gen, batch)[0]]


def engine(gen: Generator, jobs: list[Job], batch_size: int) -> list[dict]:
    return [row for rows, _ in run_engine(gen, jobs, batch_size) for row in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", choices=["llama", "bigram"], default="llama")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = Generator({"backend": args.backend})
    gen.generate(["warm up"], max_new_tokens=2)
    print(f"backend={args.backend}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"--batch-size {args.batch_size}, {args.lines} lines, median of {args.repeats}")
    print("| file | tokens | fixed batches (s) | engine (s) | engine / fixed |")
    print("|---|---|---|---|---|")
    for name in ("budgets", "stops"):
        jobs = workload(gen, name, args.lines)
        times: dict[str, list[float]] = {"fixed": [], "engine": []}
        outputs = {}
        for _ in range(args.repeats):
            for label, run in (("fixed", fixed), ("engine", engine)):
                start = time.perf_counter()
                rows = run(gen, jobs, args.batch_size)
                times[label].append(time.perf_counter() - start)
                outputs[label] = sorted((json.dumps(r["id"]), r["sample"], r["token_ids"]) for r in rows)
        if outputs["fixed"] != outputs["engine"]:
            raise SystemExit(f"{name}: the engine's rows differ from the fixed batches' rows")
        tokens = sum(len(ids) for *_, ids in outputs["engine"])
        f, e = statistics.median(times["fixed"]), statistics.median(times["engine"])
        print(f"| {name} | {tokens} | {f:.2f} | {e:.2f} | {e / f:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
