"""Time the exact top-k selection of the sync-free (CUDA) path, alone, and try kernel settings.

    python benchmarks/bench_selection.py                       # CUDA: B in {1, 64}, V = 128256, k = 50
    python benchmarks/bench_selection.py --device cpu --batch 2 --vocab 4096 --reps 1   # a smoke run

Rows: the int64 ``topk`` over ``(value, id)`` keys that ``top_k_candidates_keyed`` runs without
the fused kernels (keys by Triton, temperature fused), a plain float32 ``topk`` of the same
size (fast but not the lower-id tie rule: a reference point only), and the fused two-kernel
selection (``samplerkit.ops._triton.top_k_candidates``) for each setting of its knobs. Every
fused result is checked equal to the keyed one before it is timed. Each time is the median of
``--reps`` runs of ``--inner`` back-to-back calls (synchronised once), per call. Without a
GPU, Triton runs in its interpreter (set here): only a check that the script works.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from samplerkit.builtins.shaping.temperature import finite_division  # noqa: E402
from samplerkit.ops import _triton  # noqa: E402
from samplerkit.ops.candidates import top_k_candidates_keyed  # noqa: E402


def timeit(fn, reps: int, inner: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def keyed(x: torch.Tensor, k: torch.Tensor, k_max: int, divisor: torch.Tensor):
    """:func:`top_k_candidates_keyed` with the fused selection switched off: on CUDA the path it
    took before (Triton keys with the division fused, one int64 topk, gather, divide)."""
    supported, _triton.fused_top_k_supported = _triton.fused_top_k_supported, lambda vocab, k_max: False
    try:
        return top_k_candidates_keyed(x, k, k_max, lambda values, ids: finite_division(values, divisor, values),
                                      divisor)
    finally:
        _triton.fused_top_k_supported = supported


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if _triton.triton is None:
        print("Triton is not installed: nothing to time", file=sys.stderr)
        return 2
    if not _triton.fused_top_k_supported(args.vocab, args.k):
        print(f"the fused selection does not take V={args.vocab}, k={args.k} "
              f"(k <= {_triton.FUSED_TOP_K_MAX}, 32 * next_power_of_2(k) <= V <= {_triton.FUSED_VOCAB_MAX})",
              file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, triton {_triton.triton.__version__}, device "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu (Triton interpreter)'}, "
          f"V={args.vocab}, k={args.k}, median of {args.reps} x {args.inner} calls")
    failures = 0
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        x = (torch.randn(batch, args.vocab, generator=g) * 2).to(args.device)
        divisor = torch.full((batch, 1), 0.7, device=args.device)
        k = torch.full((batch,), args.k, device=args.device)
        want = keyed(x, k, args.k, divisor)
        t_keyed = timeit(lambda: keyed(x, k, args.k, divisor), args.reps, args.inner, args.device)
        t_float = timeit(lambda: x.topk(args.k, dim=-1), args.reps, args.inner, args.device)
        print(f"B={batch:<3} int64 keys + topk {t_keyed * 1e6:9.1f} us   float32 topk alone {t_float * 1e6:9.1f} us")
        for per_program, warps in itertools.product((64, 128, 256), (4, 8, 16)):
            def fused(per_program=per_program, warps=warps):
                return _triton.top_k_candidates(x, k, args.k, divisor, per_program=per_program, select_warps=warps)
            got = fused()
            same = torch.equal(got[1], want[1]) and torch.equal(got[0].view(torch.int32), want[0].view(torch.int32))
            failures += not same
            t = timeit(fused, args.reps, args.inner, args.device)
            print(f"      fused, {per_program:>3} groups/program, {warps:>2} warps {t * 1e6:9.1f} us "
                  f"{t_keyed / t:6.1f}x vs keyed  {'same list' if same else 'DIFFERENT LIST'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
