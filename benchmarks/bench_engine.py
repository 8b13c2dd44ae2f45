"""Aggregate tokens/s of the continuous-batching Engine with C concurrent clients against the
same requests run one after another through ``Generator.generate``.

Each of C clients submits one request per --lengths entry back to back (each waits for its
previous one), so rows join and leave the running batch all the time; requests differ in
prompt and length (client ``c``'s ``r``-th request asks for ``lengths[(c + r) % len]`` tokens,
``ignore_eos`` so it produces exactly that many; every client asks for the same total) and half
of them use another pipeline (the ``min_p`` preset). Sequential
throughput is the rate of running the first --sequential-sample of those same requests one by
one (it does not depend on how many there are), so the 64-client run does not take 64x longer;
it is measured right before each engine run, since the load of a shared machine moves.

``--share-calls both`` runs the engine twice per client count, with one sampling call per
request and step (``Engine(share_calls=False)``) and with one call per pipeline (the default),
and reports for each the sampling calls made and the seconds spent in them (the
``BoundPipeline.sample_with_validity`` calls; the rest of a step is the model and the
per-row book-keeping). ``--backend bigram`` takes the model out of the measurement.

    python benchmarks/bench_engine.py --threads 1 --clients 1 4 16 64
    python benchmarks/bench_engine.py --threads 1 --clients 16 64 --share-calls both
"""

from __future__ import annotations

import argparse
import platform
import threading
import time

import torch

from samplerkit.engine import Engine
from samplerkit.generate import Generator
from samplerkit.pipeline import BoundPipeline

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fibonacci(n):",
           "List three colors:", "The best way to learn a language is", "In 1969, astronauts",
           "My favourite recipe starts with", "Write a haiku about rain:"]


def requests(clients: int, lengths: list[int]) -> list[list[dict]]:
    """Client ``c`` sends ``len(lengths)`` requests, its ``r``-th with ``lengths[(c + r) % len]``
    new tokens: every client asks for the same total, so all stay busy until about the end."""
    out = []
    for c in range(clients):
        mine = []
        for r in range(len(lengths)):
            k = c * len(lengths) + r
            mine.append({"prompt": PROMPTS[k % len(PROMPTS)], "seed": k,
                         "max_new_tokens": lengths[(c + r) % len(lengths)],
                         "pipeline": None if k % 2 == 0 else "min_p"})
        out.append(mine)
    return out


class SamplingCalls:
    """Counts and times BoundPipeline.sample_with_validity calls while active."""

    def __init__(self):
        self.calls, self.seconds = 0, 0.0

    def __enter__(self):
        real = self.real = BoundPipeline.sample_with_validity

        def timed(bound, *args, **kwargs):
            start = time.perf_counter()
            try:
                return real(bound, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        BoundPipeline.sample_with_validity = timed
        return self

    def __exit__(self, *exc):
        BoundPipeline.sample_with_validity = self.real


def run_engine(gen: Generator, plan: list[list[dict]], share_calls: bool = True) -> tuple[int, float]:
    tokens = [0] * len(plan)
    with Engine(gen, max_rows=max(len(plan), 1), share_calls=share_calls) as engine:
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
    """The requests one after another, in a worker thread like the engine's loop (on a busy
    machine torch's main thread and other threads schedule differently)."""
    result = {}

    def work() -> None:
        tokens = 0
        start = time.perf_counter()
        for req in reqs:
            out = gen.generate([req["prompt"]], seeds=[req["seed"]], pipelines=[req["pipeline"]],
                               max_new_tokens=req["max_new_tokens"], ignore_eos=True)
            tokens += len(out[0].token_ids)
        result["out"] = tokens, time.perf_counter() - start
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return result["out"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_rows(gen: Generator, rows=(1, 4, 16, 64), reps: int = 20) -> None:
    """Time one packed product (layer 0's fused gate/up matrix) at several row counts: what a
    decode step over that many rows costs, since such products are most of a step."""
    lin = gen.backend.inner.model.layers[0].w_gate_up
    width = gen.backend.inner.model.config.hidden_size
    for m in rows:
        x = torch.randn(m, 1, width)
        for _ in range(3):
            lin(x, False)
        start = time.perf_counter()
        for _ in range(reps):
            lin(x, False)
        print(f"  {type(lin).__name__} [{m} rows]: {(time.perf_counter() - start) / reps * 1000:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 24],
                    help="max_new_tokens of each client's requests (one request per length, rotated)")
    ap.add_argument("--sequential-sample", type=int, default=6, help="requests timed one after another")
    ap.add_argument("--batch-invariant", choices=["true", "false"], default="true",
                    help="the llama backend's batch_invariant (false: one fused attention call per layer)")
    ap.add_argument("--weights", choices=["auto", "blocks", "packed", "dequantize", "fp16"], default="auto",
                    help="the llama backend's weights (dequantize: float32 GEMMs, not batch-invariant)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's; 1 on a machine shared with other jobs)")
    ap.add_argument("--kernel", action="store_true", help="only time one packed product at 1, 4, 16, 64 rows")
    ap.add_argument("--share-calls", choices=["on", "off", "both"], default="on",
                    help="one sampling call per pipeline (on, the default), per request (off), or both, paired")
    ap.add_argument("--backend", choices=["llama", "bigram"], default="llama",
                    help="bigram: a model that costs nearly nothing, so the engine's own work shows")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = Generator({"backend": {"name": "llama", "batch_invariant": args.batch_invariant == "true",
                                 "weights": args.weights}} if args.backend == "llama" else {"backend": "bigram"})
    gen.generate(["warm up"], max_new_tokens=2)
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, backend={args.backend}, "
          f"batch_invariant={args.batch_invariant}, weights={args.weights}")
    if args.kernel:
        kernel_rows(gen)
        return
    plan = requests(max(args.clients), args.lengths)
    print("prompt tokens:", sorted({len(gen.backend.tokenize(p)) for p in PROMPTS}))
    flat = [r for mine in plan for r in mine]
    # On a shared machine the load moves by 2x within minutes: each engine run is paired with a
    # sequential run of --sequential-sample requests right before it, and compared with that.
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.share_calls]
    print("| concurrent clients | requests | tokens | sampling calls | wall (s) | sampling (s) | engine tok/s "
          "| sequential tok/s (just before) | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in args.clients:
        seq_tokens, seq_wall = run_sequential(gen, flat[:args.sequential_sample])
        seq_rate = seq_tokens / seq_wall
        for share in modes:
            with SamplingCalls() as sampling:
                tokens, wall = run_engine(gen, plan[:c], share)
            rate = tokens / wall
            label = f"{c}" if args.share_calls == "on" else f"{c} ({'one call per pipeline' if share else 'one call per request'})"
            print(f"| {label} | {c * len(args.lengths)} | {tokens} | {sampling.calls} | {wall:.1f} | {sampling.seconds:.2f} "
                  f"| {rate:.1f} | {seq_rate:.1f} | {rate / seq_rate:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
