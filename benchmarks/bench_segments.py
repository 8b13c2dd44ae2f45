"""What ``segments:`` cost per decode step, next to the same run without them.

    python benchmarks/bench_segments.py [--backend llama|bigram] [--batch 8] [--new-tokens 64] [--reps 3]

Three runs of the same prompts, seeds and sampling steps (temperature 0.6, top_p 0.9):

- ``plain``: no segments;
- ``segments, no switch``: one segment whose ``until`` never occurs (every token is fed to
  the row's segment state: the bookkeeping alone);
- ``segments, switching``: a segment with a budget of half the tokens, so every row forces
  ``</think>`` and moves to a second segment (a fresh bind and a reorder of the backend's rows).

The model's forward (prefill/step) is timed and taken out: ``loop ms/step`` is the rest of the
process's CPU time (sampling, the loop, the segment machinery) per step, the best of ``--reps``
rounds (the variants take turns within a round, so a busy machine slows them alike). CPU time
rather than wall time, so that other processes on a shared machine count less. Ratios are to
``plain`` in the same process; compare ratios, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import time

import samplerkit

STEPS = [{"temperature": 0.6}, {"top_p": 0.9}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="llama", choices=["llama", "bigram"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    base = {"backend": args.backend, "pipeline": STEPS, "sampler": {"name": "categorical", "seed": 1},
            "generation": {"max_new_tokens": args.new_tokens, "ignore_eos": True}}
    variants = {
        "plain": base,
        "segments, no switch": {**base, "segments": [{"until": "\u2603never\u2603", "pipeline": STEPS}]},
        "segments, switching": {**base, "segments": [{"until": "</think>", "max_tokens": max(1, args.new_tokens // 2),
                                                      "pipeline": STEPS}, {"pipeline": STEPS}]},
    }
    backend = samplerkit.Generator(base).backend
    model = {"s": 0.0}

    def timed(fn):
        def wrapper(*a, **kw):
            start = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                model["s"] += time.process_time() - start
        return wrapper

    inner = backend.inner if hasattr(backend, "inner") else backend
    inner.prefill, inner.step = timed(inner.prefill), timed(inner.step)
    prompts = [f"Write a short story about the number {i}." for i in range(args.batch)]
    gens = {name: samplerkit.Generator(config, backend=inner) for name, config in variants.items()}
    for gen in gens.values():
        gen.generate(prompts[:1], max_new_tokens=4)           # warm-up
    results: dict[str, tuple[float, float]] = {}
    for _ in range(args.reps):
        for name, gen in gens.items():
            model["s"] = 0.0
            start = time.process_time()
            out = gen.generate(prompts, seeds=list(range(args.batch)))
            cpu = time.process_time() - start
            steps = max(len(c.token_ids) for c in out)
            loop, fwd = (cpu - model["s"]) / steps, model["s"] / steps
            if name not in results or loop < results[name][0]:
                results[name] = (loop, fwd)
    plain = results["plain"][0]
    print(f"backend {args.backend}, batch {args.batch}, {args.new_tokens} new tokens, best of {args.reps}")
    print(f"{'run':<22} {'loop ms/step':>12} {'ratio':>7} {'model ms/step':>14}")
    for name, (loop, fwd) in results.items():
        print(f"{name:<22} {loop * 1e3:12.2f} {loop / plain:7.2f} {fwd * 1e3:14.2f}")


if __name__ == "__main__":
    main()
