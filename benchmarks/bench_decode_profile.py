"""Where a decode step of the default model goes, with the compiled kernels (``weights: blocks``).

Times each compiled call of a batch-``--batch`` decode step over ``--steps`` steps (the four
per layer and the output product), the rest of the step (embedding lookup, Python), and the
bytes of weights each call reads, against this machine's memory copy bandwidth measured in the
same run (a 256 MB ``copy_``: bytes read per second while also writing them)::

    python benchmarks/bench_decode_profile.py --threads 1
    python benchmarks/bench_decode_profile.py --threads 2 --batch 8
    python benchmarks/bench_decode_profile.py --threads 1 --context 1200   # a long prompt first
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch

os.environ.setdefault("SAMPLERKIT_QUIET", "1")


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes per second read by ``dst.copy_(src)`` on ``mb`` MB (the best of ``repeats``)."""
    src = torch.ones(mb << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return src.numel() / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--context", type=int, default=0,
                        help="prompt tokens before the timed steps (0: a 15-token prompt)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench_llamacpp import cpu_name

    from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams, blocks

    backend = LlamaBackend(LlamaParams(weights="blocks", cache=False))
    model = backend.model
    ids = backend.tokenize("Once upon a time, in a small village by the sea, there lived")
    if args.context:
        ids = backend.tokenize(" ".join(["The quick brown fox jumps over the lazy dog."] * (args.context // 9 + 1)))
        ids = ids[:args.context]
    logits = backend.prefill([ids] * args.batch).last
    for _ in range(8):                                            # warm up
        logits = backend.step(logits.argmax(-1))

    spent: dict[str, float] = defaultdict(float)
    calls = {"norm_mm": "RMSNorm + q/k/v product", "attend_decode": "rotary + cache + attention",
             "mm_add": "output product + residual", "mlp": "feed-forward block + residual"}
    originals = {name: getattr(blocks, name) for name in calls}

    def timed(name):
        def call(*a):
            start = time.perf_counter()
            out = originals[name](*a)
            # the output product (the last norm_mm of a step) is told apart by its matrix
            label = "output product (+ final RMSNorm)" if name == "norm_mm" and a[-1] is model.lm_head else calls[name]
            spent[label] += time.perf_counter() - start
            return out
        return call

    for name in calls:
        setattr(blocks, name, timed(name))
    try:
        start = time.perf_counter()
        for _ in range(args.steps):
            logits = backend.step(logits.argmax(-1))
        total = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(blocks, name, fn)

    layer_bytes = {calls["norm_mm"]: sum(layer.wqkv.nbytes() for layer in model.layers),
                   calls["mm_add"]: sum(layer.wo.nbytes() for layer in model.layers),
                   calls["mlp"]: sum(layer.w_gate_up.nbytes() + layer.w_down.nbytes() for layer in model.layers),
                   "output product (+ final RMSNorm)": model.lm_head.nbytes()}
    bandwidth = copy_bandwidth()
    step = total / args.steps
    print(f"{cpu_name()}; torch {torch.__version__}, {args.threads} threads; batch {args.batch}; prompt {len(ids)} tokens; "
          f"{args.steps} steps; memory copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"step {step * 1e3:.2f} ms ({args.batch / step:.1f} tok/s)")
    print(f"{'part':36s} {'ms/step':>8s} {'share':>6s} {'weights MB':>10s} {'GB/s':>6s}")
    for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        per = seconds / args.steps
        mb = layer_bytes.get(label, 0) / 1e6
        rate = f"{mb / 1e3 / per:6.1f}" if mb else "     -"
        print(f"{label:36s} {per * 1e3:8.2f} {per / step:6.1%} {mb:10.1f} {rate}")
    rest = step - sum(spent.values()) / args.steps
    print(f"{'rest (embedding, Python, argmax)':36s} {rest * 1e3:8.2f} {rest / step:6.1%}")
    weights = sum(layer_bytes.values())
    print(f"weights read per step {weights / 1e6:.1f} MB: at the copy bandwidth {weights / bandwidth * 1e3:.2f} ms, "
          f"a cap of {bandwidth / weights:.0f} steps/s")


if __name__ == "__main__":
    main()
