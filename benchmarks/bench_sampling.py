"""Time one sampling step: samplerkit's pipeline vs transformers' processors vs the seed's top-p.

    python benchmarks/bench_sampling.py                 # the whole grid (a few minutes on 2 cores)
    python benchmarks/bench_sampling.py --batch 64 --vocab 128256 --device cuda

All three draw one token per row from the same logits, in one process, so ratios are
comparable even on a noisy machine. Every truncation is timed with temperature 0.7 first
(transformers' and vLLM's order) and last (llama.cpp's), and transformers gets the same order.
"bound" times ``pipe.bind(B, seeds).sample(x)`` (the decode loop's call), "one-shot" the
README's ``pipe.sample(x, seeds)`` (it reuses the previous call's bound pipeline); "1shot/bd" is their
ratio, "unseeded/bd" that of ``pipe.sample(x)`` (rows without a seed: new seeds every call). Logit kinds: "peaked" (Zipf-like, like a language model's
next-token distribution: a top-p 0.9 nucleus of tens to hundreds of tokens) and "flat"
(standard normal: a nucleus of most of the vocabulary, the worst case).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import samplerkit

# name: the truncation steps; temperature goes first or last (--order), or is left out ("none").
PIPELINES = {
    "top_k+top_p": [{"top_k": 50}, {"top_p": 0.9}],
    "top_p": [{"top_p": 0.9}],
    "min_p": [{"min_p": 0.05}],
    "typical_p": [{"typical_p": 0.9}],
}
TEMPERATURE = {"temperature": 0.7}
ORDERS = ("first", "last", "none")


def with_temperature(steps: list[dict], order: str) -> list[dict]:
    return {"first": [TEMPERATURE, *steps], "last": [*steps, TEMPERATURE], "none": list(steps)}[order]


def chain_name(steps: list[dict]) -> str:
    return "+".join(next(iter(step)) for step in steps)


def make_logits(kind: str, batch: int, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":
        x = torch.randn(batch, vocab, generator=g)
    else:
        # Zipf(1) probabilities over a random permutation, with a little jitter: after
        # temperature 0.7 the top-p 0.9 nucleus holds about a hundred tokens.
        ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
        base = -ranks.log()
        x = torch.stack([base[torch.randperm(vocab, generator=g)] for _ in range(batch)])
        x = x + 0.1 * torch.randn(batch, vocab, generator=g)
    return x.to(device)


def transformers_step(logits: torch.Tensor, processors) -> torch.Tensor:
    scores = processors(None, logits)
    return torch.multinomial(scores.softmax(-1), 1).squeeze(-1)


def seed_step(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """meta-llama/llama generation.py: softmax(logits / T) then sample_top_p (sort-based)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > top_p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token).squeeze(-1)


#: What timeit reads: wall time, or (``--clock cpu``) this process's CPU time over all its threads,
#: which other processes on a shared machine disturb far less than wall time (CPU only).
CLOCK = time.perf_counter


def timeit(fn, reps: int, device: str) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = CLOCK()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(CLOCK() - start)
    return statistics.median(times)


def build_transformers(steps: list[dict]):
    """transformers' warpers for the same steps, in the same order."""
    try:
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
            TypicalLogitsWarper,
        )
    except ImportError:
        return None
    warpers = {"temperature": TemperatureLogitsWarper, "top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper,
               "min_p": MinPLogitsWarper, "typical_p": TypicalLogitsWarper}
    return LogitsProcessorList([warpers[name](value) for step in steps for name, value in step.items()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--vocab", type=int, nargs="*", default=[32000, 128256])
    ap.add_argument("--kind", nargs="*", default=["peaked", "flat"], choices=["peaked", "flat"])
    ap.add_argument("--pipeline", nargs="*", default=list(PIPELINES), choices=list(PIPELINES))
    ap.add_argument("--order", nargs="*", default=["first", "last"], choices=ORDERS,
                    help="where temperature 0.7 goes in each pipeline ('none': left out)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-graph", action="store_true", help="on CUDA, skip timing the CUDA-graph replay")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or this process's CPU time (all threads): steadier on a shared CPU")
    args = ap.parse_args()
    if args.clock == "cpu":
        if args.device != "cpu":
            ap.error("--clock cpu times CPU work only; use --clock wall with --device cuda")
        global CLOCK
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, clock {args.clock}")
    graphs = args.device == "cuda" and not args.no_graph
    print(f"{'pipeline':<28} {'kind':<6} {'B':>3} {'V':>7} {'nucleus':>8} {'bound':>11} {'one-shot':>11} "
          f"{'transformers':>12} {'seed':>9} {'vs tf':>7} {'vs seed':>8} {'1shot/bd':>8} {'unseeded/bd':>11}" + (f" {'other eager':>11} {'graph':>9} {'graph x20':>9} {'vs tf':>7}" if graphs else ""))
    if graphs:
        from samplerkit.ops import sync
        print(f"eager CUDA steps take the {'sync-free' if sync.EAGER_CUDA else 'checked'} paths; 'other eager' "
              "times the other choice (samplerkit.ops.sync.EAGER_CUDA); 'graph' is one captured step replayed "
              "and waited for, 'graph x20' one of 20 replays queued back to back; 'vs tf' is against 'graph'")
    for steps in [with_temperature(PIPELINES[name], order) for name in args.pipeline for order in args.order]:
        name = chain_name(steps)
        tf = build_transformers(steps)
        for kind in args.kind:
            for vocab in args.vocab:
                for batch in args.batch:
                    x = make_logits(kind, batch, vocab, args.device)
                    pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps,
                                                     "sampler": {"name": "categorical"}}, device=args.device)
                    seeds = list(range(batch))
                    bound = pipe.bind(batch, seeds=seeds)
                    nucleus = float(torch.isfinite(bound.process(x)).sum(-1).float().mean())
                    t_sk = timeit(lambda: bound.sample(x), args.reps, args.device)
                    t_once = timeit(lambda: pipe.sample(x, seeds=seeds), args.reps, args.device)
                    t_unseeded = timeit(lambda: pipe.sample(x), args.reps, args.device)
                    t_tf = timeit(lambda: transformers_step(x, tf), args.reps, args.device) if tf else float("nan")
                    if steps == [TEMPERATURE, {"top_p": 0.9}]:      # the seed's order: softmax(x / T), then top_p
                        t_seed = timeit(lambda: seed_step(x, 0.7, 0.9), args.reps, args.device)
                    else:
                        t_seed = float("nan")
                    line = (f"{name:<28} {kind:<6} {batch:>3} {vocab:>7} {nucleus:>8.0f} {t_sk * 1e3:>9.2f}ms "
                            f"{t_once * 1e3:>9.2f}ms {t_tf * 1e3:>10.2f}ms {t_seed * 1e3:>7.2f}ms {t_tf / t_sk:>6.1f}x "
                            f"{t_seed / t_sk:>7.1f}x {t_once / t_sk:>7.2f}x {t_unseeded / t_sk:>10.2f}x")
                    if graphs:
                        # The eager step with the other choice of paths (sync.EAGER_CUDA), then
                        # one step captured as a CUDA graph (BoundPipeline.capture), replayed.
                        from samplerkit.context import StepContext
                        from samplerkit.ops import sync
                        sync.EAGER_CUDA = not sync.EAGER_CUDA
                        try:        # the choice is made when a pipeline is bound: bind anew
                            other = pipe.bind(batch, seeds=seeds)
                            t_other = timeit(lambda: other.sample(x), args.reps, args.device)
                        finally:
                            sync.EAGER_CUDA = not sync.EAGER_CUDA
                        captured = bound.capture(x, StepContext(batch, vocab, device=args.device))
                        # The logits already in the graph's input (a decode loop's model writes
                        # them there): no 64 MB copy at B=64 in the step's time.
                        t_graph = timeit(lambda: captured(captured.logits), args.reps, args.device)
                        t_ahead = timeit(lambda: [captured(captured.logits) for _ in range(20)],
                                         args.reps, args.device) / 20
                        line += (f" {t_other * 1e3:>9.3f}ms {t_graph * 1e3:>7.3f}ms {t_ahead * 1e3:>7.3f}ms"
                                 f" {t_tf / t_graph:>6.1f}x")
                    print(line, flush=True)


if __name__ == "__main__":
    main()
