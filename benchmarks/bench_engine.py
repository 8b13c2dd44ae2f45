"""Aggregate tokens/s of the continuous-batching Engine with C concurrent clients against the
same requests run one after another through ``Generator.generate``.

Each of C clients submits R requests back to back (each waits for its previous one), so rows
join and leave the running batch all the time; requests differ in prompt and length
(``max_new_tokens`` cycles through --lengths, ``ignore_eos`` so every request produces exactly
that many tokens) and half of them use another pipeline (the ``min_p`` preset). Sequential
throughput is the rate of running the first --sequential-sample of those same requests one by
one (it does not depend on how many there are), so the 64-client run does not take 64x longer.

    python benchmarks/bench_engine.py --clients 1 4 16 64
"""

from __future__ import annotations

import argparse
import platform
import threading
import time

import torch

from samplerkit.engine import Engine
from samplerkit.generate import Generator

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fibonacci(n):",
           "List three colors:", "The best way to learn a language is", "In 1969, astronauts",
           "My favourite recipe starts with", "Write a haiku about rain:"]


def requests(clients: int, per_client: int, lengths: list[int]) -> list[list[dict]]:
    out = []
    for c in range(clients):
        mine = []
        for r in range(per_client):
            k = c * per_client + r
            mine.append({"prompt": PROMPTS[k % len(PROMPTS)], "seed": k, "max_new_tokens": lengths[k % len(lengths)],
                         "pipeline": None if k % 2 == 0 else "min_p"})
        out.append(mine)
    return out


def run_engine(gen: Generator, plan: list[list[dict]]) -> tuple[int, float]:
    tokens = [0] * len(plan)
    with Engine(gen, max_rows=max(len(plan), 1)) as engine:
        def client(c: int) -> None:
            for req in plan[c]:
                req = dict(req)
                done = engine.submit(req.pop("prompt"), ignore_eos=True, **req).result()
                tokens[c] += sum(len(x.token_ids) for x in done)
        threads = [threading.Thread(target=client, args=(c,)) for c in range(len(plan))]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    return sum(tokens), wall


def run_sequential(gen: Generator, reqs: list[dict]) -> tuple[int, float]:
    tokens = 0
    start = time.perf_counter()
    for req in reqs:
        out = gen.generate([req["prompt"]], seeds=[req["seed"]], pipelines=[req["pipeline"]],
                           max_new_tokens=req["max_new_tokens"], ignore_eos=True)
        tokens += len(out[0].token_ids)
    return tokens, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends one after another")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 24, 32], help="max_new_tokens, cycled")
    ap.add_argument("--sequential-sample", type=int, default=8, help="requests timed one after another")
    ap.add_argument("--batch-invariant", choices=["true", "false"], default="true",
                    help="the llama backend's batch_invariant (false: one fused attention call per layer)")
    args = ap.parse_args()

    gen = Generator({"backend": {"name": "llama", "batch_invariant": args.batch_invariant == "true"}})
    gen.generate(["warm up"], max_new_tokens=2)
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch_invariant={args.batch_invariant}")
    plan = requests(max(args.clients), args.per_client, args.lengths)
    flat = [r for mine in plan for r in mine]
    seq_tokens, seq_wall = run_sequential(gen, flat[:args.sequential_sample])
    seq_rate = seq_tokens / seq_wall
    print(f"sequential: {seq_tokens} tokens in {seq_wall:.1f} s = {seq_rate:.1f} tok/s "
          f"({args.sequential_sample} requests one after another)")
    print("| concurrent clients | requests | tokens | wall (s) | engine tok/s | sequential tok/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for c in args.clients:
        tokens, wall = run_engine(gen, plan[:c])
        rate = tokens / wall
        print(f"| {c} | {c * args.per_client} | {tokens} | {wall:.1f} | {rate:.1f} | {seq_rate:.1f} | "
              f"{rate / seq_rate:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
