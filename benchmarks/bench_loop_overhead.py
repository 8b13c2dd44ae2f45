"""The decode loop's own cost per step on the default model, as a share of the step.

    python benchmarks/bench_loop_overhead.py [--batch 8] [--new-tokens 64]

Wraps the backend's forward (prefill/step) and the pipeline's sampling with timers and runs
``samplerkit.Generator.generate``; everything else in the wall time (stop checks,
detokenization, streaming deltas, row compaction, logprob bookkeeping) is the loop's overhead.
"""

from __future__ import annotations

import argparse
import time

import samplerkit
from samplerkit import pipeline as pipeline_module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--config", default=None, help="YAML config (default: the seed's pipeline on the default model)")
    args = ap.parse_args()

    config = args.config or {"pipeline": [{"temperature": 0.6}, {"top_p": 0.9}],
                             "sampler": {"name": "categorical", "seed": 1},
                             "generation": {"max_new_tokens": args.new_tokens, "ignore_eos": True,
                                            "stop": ["\n\n"]}}
    gen = samplerkit.Generator(config)
    timers = {"model": 0.0, "sampling": 0.0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[name] += time.perf_counter() - start
        return wrapper

    gen.backend.prefill = timed("model", gen.backend.prefill)
    gen.backend.step = timed("model", gen.backend.step)
    original = pipeline_module.BoundPipeline.sample_with_validity
    pipeline_module.BoundPipeline.sample_with_validity = timed("sampling", original)

    prompts = [f"Write a short story about the number {i}." for i in range(args.batch)]
    gen.generate(prompts[:1], max_new_tokens=4)              # warm-up
    timers.update(model=0.0, sampling=0.0)
    start = time.perf_counter()
    results = gen.generate(prompts)
    wall = time.perf_counter() - start
    steps = max(len(r.token_ids) for r in results)
    loop = wall - timers["model"] - timers["sampling"]
    print(f"batch {args.batch}, {steps} steps, {sum(len(r.token_ids) for r in results)} tokens in {wall:.2f} s")
    print(f"  model forward  {timers['model'] / wall:6.1%}  ({timers['model'] / steps * 1e3:.2f} ms/step)")
    print(f"  sampling       {timers['sampling'] / wall:6.1%}  ({timers['sampling'] / steps * 1e3:.2f} ms/step)")
    print(f"  decode loop    {loop / wall:6.1%}  ({loop / steps * 1e3:.2f} ms/step)  <- overhead")


if __name__ == "__main__":
    main()
