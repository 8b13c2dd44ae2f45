"""Aggregate tokens/s of `samplerkit serve` with 1, 4, 16 and 64 concurrent streams, against the
same requests sent one after another, and against llama-cpp-python's OpenAI server
(``python -m llama_cpp.server``) on the same GGUF, same machine, one run.

Each server runs in its own process (the clients' threads do not share its interpreter); the
clients are the official ``openai`` package, one thread per stream, each sending one streamed
``/v1/completions`` request (``max_tokens`` new tokens, seed ``i``, the server's default
pipeline). Aggregate tokens/s = every completion token of the round / the round's wall time
(first request sent to last one finished). The sequential baseline sends the same requests one
after another (``--sequential-max`` of them at most: the rate per token is what is compared).

llama-cpp-python's server needs its ``[server]`` extra (sse-starlette, starlette-context,
pydantic-settings); it runs one request at a time (no batching), so its rows show what
concurrency costs there. It is started with ``--interrupt_requests False``: by default a new
request cuts the running one short, which would count as fewer tokens, not as a slower server.
Its streams report no usage, so its tokens are its non-empty chunks (one per token).

    python benchmarks/bench_serve.py --concurrency 1,4,16,64 --max-tokens 32
    python benchmarks/bench_serve.py --servers samplerkit     # samplerkit only
    python benchmarks/bench_serve.py --servers samplerkit --weights fp16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import openai

PROMPTS = ["Once upon a time, in a small village by the sea, there lived", "The three laws of robotics are",
           "Here is a recipe for pancakes:", "The history of the printing press begins",
           "Dear diary, today I", "In physics, entropy is", "The best way to learn a language is",
           "A haiku about autumn:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server at {url} did not come up in {seconds:g} s")


def one(client: openai.OpenAI, model: str, i: int, max_tokens: int, usage: bool) -> int:
    """Stream one completion; its completion tokens (the server's usage, else its chunks)."""
    extra = {"stream_options": {"include_usage": True}} if usage else {}
    chunks = 0
    counted = None
    for chunk in client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                           seed=i, stream=True, **extra):
        if chunk.usage is not None:
            counted = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            chunks += 1
    return counted if counted is not None else chunks


def concurrent(url: str, model: str, streams: int, max_tokens: int, usage: bool) -> tuple[int, float]:
    clients = [openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
               for _ in range(streams)]
    tokens = [0] * streams
    errors: list[BaseException] = []
    start = threading.Barrier(streams + 1)

    def run(k: int) -> None:
        start.wait()
        try:
            tokens[k] = one(clients[k], model, k, max_tokens, usage)
        except BaseException as exc:          # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {errors[0]!r}")
    return sum(tokens), wall


def sequential(url: str, model: str, count: int, max_tokens: int, usage: bool) -> tuple[int, float]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    tokens = sum(one(client, model, k, max_tokens, usage) for k in range(count))
    return tokens, time.perf_counter() - t0


def bench(name: str, command: list[str], url: str, args, usage: bool) -> list[dict]:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    try:
        wait_ready(url, proc)
        with urllib.request.urlopen(url + "/v1/models") as r:
            model = json.load(r)["data"][0]["id"]
        sequential(url, model, 2, 4, usage)                       # warm-up
        for streams in args.concurrency:
            seq_tokens, seq_wall = sequential(url, model, min(streams, args.sequential_max), args.max_tokens, usage)
            tokens, wall = concurrent(url, model, streams, args.max_tokens, usage)
            row = {"server": name, "streams": streams, "tokens": tokens, "seconds": round(wall, 2),
                   "tok_s": round(tokens / wall, 1), "sequential_tok_s": round(seq_tokens / seq_wall, 1),
                   "speedup": round((tokens / wall) / (seq_tokens / seq_wall), 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated stream counts")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sequential-max", type=int, default=8, help="most requests in a sequential baseline")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's --n_threads")
    parser.add_argument("--servers", default="samplerkit,llamacpp", help="which servers to run: samplerkit, llamacpp")
    parser.add_argument("--weights", choices=["auto", "blocks", "packed", "dequantize", "fp16"], default="auto",
                        help="samplerkit's backend.weights (fp16: fbgemm's float16 GEMM, faster for batches)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="more samplerkit serve --set options (e.g. backend.threads=1)")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    from samplerkit.builtins.backends.llama.default_model import find_default_model

    gguf = str(find_default_model())
    import platform

    print(json.dumps({"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gguf": gguf,
                      "max_tokens": args.max_tokens, "weights": args.weights, "set": args.overrides}), flush=True)
    servers = set(args.servers.split(","))
    rows = []
    port = free_port()
    if "samplerkit" in servers:
        rows += bench("samplerkit", [sys.executable, "-m", "samplerkit.cli", "serve", "--port", str(port),
                                     "--max-rows", str(max(args.concurrency)), "--set", f"backend.weights={args.weights}",
                                     *[a for kv in args.overrides for a in ("--set", kv)]],
                      f"http://127.0.0.1:{port}", args, usage=True)
    if "llamacpp" in servers:
        port = free_port()
        rows += bench("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port",
                                           str(port), "--n_threads", str(args.threads), "--n_ctx", "2048",
                                           "--verbose", "False", "--interrupt_requests", "False"],
                      f"http://127.0.0.1:{port}", args, usage=False)
    print("\n| server | streams | aggregate tok/s | sequential tok/s | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['streams']} | {r['tok_s']} | {r['sequential_tok_s']} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
