"""New tokens per second at batch 1: the ``llamacpp`` backend through ``samplerkit.generate`` vs
llama-cpp-python's own sampling (``Llama.create_completion``), same GGUF, same machine.

Both sides use the embedded SmolLM2-135M-Instruct Q4_1 GGUF, the same thread count and
comparable settings: llama.cpp's default chain (top_k 40 -> top_p 0.95 -> min_p 0.05 ->
temperature 0.8, the ``llama_cpp`` preset) and greedy. samplerkit generates exactly
``--new-tokens`` (``ignore_eos``); llama-cpp-python stops at EOS, so its rate is its completion
tokens over its time. Also timed: the backend alone (prefill + ``step`` with argmax, no pipeline
and no decode loop), which splits samplerkit's overhead from llama.cpp's compute. Runs alternate
and the best of ``--repeats`` is reported (a shared machine disturbs some runs), with the median.

    python benchmarks/bench_llamacpp.py --new-tokens 128 --repeats 3

``--engines`` instead compares the two *engines* on the same GGUF, through the same backend
interface (prefill, then ``step`` with argmax, no sampling pipeline): samplerkit's pure-PyTorch
``llama`` backend (the default ``weights: auto``, which is ``blocks`` where samplerkit's compiled
kernels load; also ``weights: packed`` (torch's int4 kernel), ``weights: dequantize`` for reference,
and ``weights: fp16``; ``--forms`` picks) against the ``llamacpp`` backend (llama.cpp, one
``llama_decode`` for all rows), at batch 1 and 8, and the prefill of one 512-token prompt; runs
alternate, best (median) of ``--repeats``:

    python benchmarks/bench_llamacpp.py --engines --new-tokens 64 --repeats 5
    python benchmarks/bench_llamacpp.py --engines --forms auto packed --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("SAMPLERKIT_QUIET", "1")

PROMPT = "Once upon a time, in a small village by the sea, there lived"
#: ``--forms``: row label and LlamaParams of each weights form of the llama backend.
FORMS = {"auto": ("llama (auto, default)", {"cache": False}),
         "packed": ("llama (packed, torch int4)", {"weights": "packed", "cache": False}),
         "dequantize": ("llama (dequantize, fp32)", {"weights": "dequantize"}),
         "fp16": ("llama (fp16, fbgemm)", {"weights": "fp16"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--engines", action="store_true", help="compare the llama and llamacpp backends")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS),
                        help="the llama backend's weights forms to time (--engines)")
    args = parser.parse_args()
    if args.engines:
        engines(args)
        return

    import llama_cpp
    from samplerkit_llamacpp import LlamaCppBackend, LlamaCppParams

    import samplerkit
    from samplerkit.builtins.backends.llama.default_model import find_default_model

    path = str(find_default_model())
    backend = LlamaCppBackend(LlamaCppParams(n_ctx=2048, n_seq=1, n_threads=args.threads))
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False)
    n = args.new_tokens
    settings = {
        "llama.cpp default chain": ({"preset": "llama_cpp", "sampler": {"name": "categorical", "seed": 1}},
                                    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0)),
        "greedy": ({"pipeline": [], "sampler": "greedy"},
                   dict(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)),
    }
    prompt_ids = backend.tokenize(PROMPT)

    def backend_only() -> float:
        start = time.perf_counter()
        logits = backend.prefill([prompt_ids]).last
        for _ in range(n - 1):
            logits = backend.step(logits.argmax(-1))
        return n / (time.perf_counter() - start)

    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, threads {args.threads}, "
          f"{n} new tokens, prompt {len(prompt_ids)} tokens, best of {args.repeats} (median)")
    for label, (config, kwargs) in settings.items():
        config = {**config, "backend": {"name": "llamacpp"}, "generation": {"max_new_tokens": n, "ignore_eos": True}}
        gen = samplerkit.Generator(config, backend=backend)
        ours, theirs, produced = [], [], []
        for r in range(args.repeats):
            start = time.perf_counter()
            out = gen.generate([PROMPT])
            ours.append(len(out[0].token_ids) / (time.perf_counter() - start))
            start = time.perf_counter()
            res = llm.create_completion(PROMPT, max_tokens=n, seed=r + 1, **kwargs)
            tokens = res["usage"]["completion_tokens"]
            theirs.append(tokens / (time.perf_counter() - start))
            produced.append(tokens)
        print(f"{label:>24}: samplerkit + llamacpp backend {max(ours):6.1f} tok/s ({statistics.median(ours):.1f})"
              f"  |  llama-cpp-python {max(theirs):6.1f} tok/s ({statistics.median(theirs):.1f}; "
              f"{min(produced)}-{max(produced)} tokens)  |  ratio {max(ours) / max(theirs):.2f}")
    only = [backend_only() for _ in range(args.repeats)]
    print(f"{'backend alone (argmax)':>24}: {max(only):6.1f} tok/s ({statistics.median(only):.1f})")


def cpu_name() -> str:
    """The CPU's model name and the vector ISA torch dispatches to (name it in every table)."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, torch ISA {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cpus"


def engines(args) -> None:
    from samplerkit_llamacpp import LlamaCppBackend, LlamaCppParams

    from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams

    torch.set_num_threads(args.threads)
    ours = {FORMS[f][0]: LlamaBackend(LlamaParams(**FORMS[f][1])) for f in args.forms}
    from samplerkit.builtins.backends.llama import native

    print("llama (auto) runs", "samplerkit's compiled kernels (weights: blocks)" if native.kernels() is not None
          else f"torch's kernels (compiled kernels unavailable: {native.unavailable_reason()})")
    cpp = LlamaCppBackend(LlamaCppParams(n_ctx=4096, n_seq=max(args.batches), n_threads=args.threads))
    every = {**ours, "llama.cpp (llamacpp backend)": cpp}
    ids = cpp.tokenize(PROMPT)
    n = args.new_tokens

    def decode(backend, batch: int) -> float:
        start = time.perf_counter()
        logits = backend.prefill([ids] * batch).last
        for _ in range(n - 1):
            logits = backend.step(logits.argmax(-1))
        return batch * n / (time.perf_counter() - start)

    long_ids = cpp.tokenize(" ".join(["The quick brown fox jumps over the lazy dog."] * 80))[:args.prefill_tokens]

    def prefill(backend) -> float:
        start = time.perf_counter()
        backend.prefill([long_ids])
        return time.perf_counter() - start

    print(f"{cpu_name()}; torch {torch.__version__}, {args.threads} threads; SmolLM2-135M-Instruct Q4_1 GGUF; "
          f"greedy, {n} new tokens/row, prompt {len(ids)} tokens; best (median) of {args.repeats}")
    for batch in args.batches:
        runs = {name: [] for name in every}
        for b in every.values():
            decode(b, batch)                     # warm-up
        for _ in range(args.repeats):
            for name, b in every.items():
                runs[name].append(decode(b, batch))
        ref = max(runs["llama.cpp (llamacpp backend)"])
        print(f"batch {batch}:")
        for name, r in runs.items():
            print(f"  {name:30s} {max(r):7.1f} ({statistics.median(r):6.1f}) tok/s  {max(r) / ref:5.2f}x llama.cpp")
    runs = {name: [] for name in every}
    for b in every.values():
        prefill(b)
    for _ in range(args.repeats):
        for name, b in every.items():
            runs[name].append(prefill(b))
    print(f"prefill of one {len(long_ids)}-token prompt:")
    ref = min(runs["llama.cpp (llamacpp backend)"])
    for name, r in runs.items():
        print(f"  {name:30s} {min(r) * 1e3:7.0f} ({statistics.median(r) * 1e3:6.0f}) ms  {ref / min(r):5.2f}x llama.cpp's speed")


if __name__ == "__main__":
    main()
