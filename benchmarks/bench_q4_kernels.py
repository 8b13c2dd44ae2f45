"""Which matrix product for the default model's Q4_1 weights is fastest on this CPU? (issue 19, 18)

One product ``y = x @ W.T`` per candidate, on the default model's real matrices (layer 0's fused
q/k/v 960x576, attention output 576x576, fused gate/up 3072x576, down 576x1536, and the output
matrix 49152x576, which the file stores as Q8_0), at 1, 4, 16 and 64 rows, for each torch thread
count asked. Candidates:

``blocks``
    samplerkit's compiled AVX2 kernels (``weights: blocks``, the default ``auto`` where they
    load; :class:`samplerkit.builtins.backends.llama.blocks.BlockLinear`): the file's codes and
    scales, float32 activations, one scaling per group of 32 inputs.
``int4``
    ``aten._weight_int4pack_mm_for_cpu``, what ``weights: packed`` runs
    (:class:`samplerkit.builtins.backends.llama.quant.Int4Linear`, bfloat16 activations and
    scales; the Q8_0 output matrix as two 4-bit planes).
``compiled nibbles``
    ``torch.compile`` (inductor's C++ backend, static shapes per matrix and row count) of the
    file's own math written in torch ops: the bytes as the file lays them out (two 4-bit codes per
    byte), ``w = d * q + m`` per 32 inputs in float32, then ``(x * w).sum(-1)``; inductor fuses
    the unpacking into the reduction. Not for Q8_0 (8-bit codes): "n/a".
``compiled uint8``
    the same with the codes unpacked to one byte each at load (twice the bytes, no shifts; the
    Q8_0 matrix with its int8 codes).
``int8 per row``
    ``aten._weight_int8pack_mm``: one scale per output row, so the matrix is *requantized*
    (``scale[n] = max |w[n]| / 127``), a second rounding of every weight.
``int8 groupwise``
    the same kernel once per group of 32 inputs (exact codes, scale ``d`` per row of each group)
    plus the ``m * sum(x)`` term: the file's math with torch's kernel, one call per group.
``fbgemm dynamic``
    ``quantized.linear_dynamic`` (fbgemm int8 GEMM; activations quantized to int8 with one
    scale per call, weights requantized per row like ``int8 per row``): what llama.cpp does in
    spirit (8-bit activations, integer dot products), but the weights lose their groups and a row's
    result depends on the other rows of the call (the activation scale is the whole call's).
``fbgemm fp16``
    ``quantized.linear_dynamic_fp16`` as ``weights: fp16`` runs it
    (:class:`samplerkit.builtins.backends.llama.quant.Fp16Linear`): the file's matrix dequantized
    exactly and rounded once to float16, float32 activations and sums, rows in calls of 4.
``float32``
    the dequantized float32 matrix (``weights: dequantize``), hot in cache here: a step of the
    real model reads 5x the bytes of the packed one, so this column flatters it.

For each cell: microseconds per product (median over repetitions that fill about
``--budget`` seconds, at least 3), and once per candidate and matrix the relative error
``|y - y_exact| / |y_exact|`` (over all rows of a 64-row product of standard normal inputs,
``y_exact`` in float64 from the file's own dequantization) and whether each row of a 4-, 16- and
64-row product has the same bits as the row alone ("invariant"). A compiled candidate's first
call (the compile) is reported separately.

    python benchmarks/bench_q4_kernels.py --threads 1 2
    python benchmarks/bench_q4_kernels.py --threads 1 --matrices gate_up --rows 1 16
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

MATRICES = {"qkv": ("wq", "wk", "wv"), "o": ("wo",), "gate_up": ("w_gate", "w_up"), "down": ("w_down",),
            "output": ("embed",)}
CANDIDATES = ("blocks", "int4", "compiled nibbles", "compiled uint8", "int8 per row", "int8 groupwise", "fbgemm dynamic",
              "fbgemm fp16", "float32")
GROUP = 32


def load_matrices(names: list[str]) -> dict[str, list]:
    """{matrix: [QuantizedTensor, ...]} for layer 0 (and the tied output matrix) of the default model."""
    from samplerkit.builtins.backends.llama import gguf_loader
    from samplerkit.builtins.backends.llama.default_model import find_default_model

    path = find_default_model()
    weights = gguf_loader.read_weights(gguf_loader.open_reader(path), path, torch.float32, keep_packed=True)
    return {m: [weights[p if p == "embed" else f"layers.0.{p}"] for p in MATRICES[m]] for m in names}


class Affine:
    """The file's math of one matrix: codes ``[N, K]`` (uint8 0..15, or int8 for Q8_0), and float32
    ``d``, ``m`` ``[N, K/32]`` with ``w = d * q + m``, plus its float64 dense form."""

    def __init__(self, parts: list):
        from samplerkit.builtins.backends.llama.quant import _affine_rows

        codes, ds, ms = [], [], []
        for p in parts:
            c, d, m = _affine_rows(p.data, p.type_name)
            n, k = p.shape
            codes.append(torch.from_numpy(c.copy()).view(n, k))
            ds.append(torch.from_numpy(d.copy()).view(n, k // GROUP))
            ms.append(torch.from_numpy(m.copy()).view(n, k // GROUP))
        self.q8 = parts[0].type_name == "Q8_0"
        self.codes = torch.cat(codes)
        if not self.q8:
            self.codes = self.codes.to(torch.uint8)
        self.d, self.m = torch.cat(ds), torch.cat(ms)
        self.n, self.k = self.codes.shape
        g = self.k // GROUP
        self.exact = (self.codes.double().view(self.n, g, GROUP) * self.d.double()[..., None]
                      + self.m.double()[..., None]).view(self.n, self.k)


def candidates(parts: list, a: Affine) -> dict[str, object]:
    """{name: f(x float32 [M, K]) -> [M, N]} for every candidate that applies here (else a reason)."""
    from samplerkit.builtins.backends.llama import native
    from samplerkit.builtins.backends.llama.blocks import BlockLinear
    from samplerkit.builtins.backends.llama.quant import Fp16Linear, Int4Linear, fp16_kernel_available

    n, k, g = a.n, a.k, a.k // GROUP
    out: dict[str, object] = {}
    if native.kernels() is not None:
        blocks = BlockLinear.from_parts(parts)
        out["blocks"] = lambda x: blocks(x, dense=False)
    else:
        out["blocks"] = f"n/a ({native.unavailable_reason()})"
    lin = Int4Linear.from_parts(parts)
    out["int4"] = lambda x: lin(x, dense=False)

    def nibbles(x, packed, d, m):
        q = torch.stack([packed & 15, packed >> 4], 2).view(n, g, GROUP)
        w = (q.float() * d[..., None] + m[..., None]).view(n, k)
        return (x[:, None, :] * w[None]).sum(-1)

    def unpacked(x, codes, d, m):
        w = (codes.view(n, g, GROUP).float() * d[..., None] + m[..., None]).view(n, k)
        return (x[:, None, :] * w[None]).sum(-1)

    if a.q8:
        out["compiled nibbles"] = "n/a (8-bit codes)"
    else:
        c = a.codes.view(n, g, 2, 16)                      # ggml's Q4_1 byte: inputs j (low), j + 16 (high)
        packed = (c[:, :, 0] | (c[:, :, 1] << 4)).contiguous()
        fn = torch.compile(nibbles, dynamic=False)
        out["compiled nibbles"] = lambda x: fn(x, packed, a.d, a.m)
    fu = torch.compile(unpacked, dynamic=False)
    out["compiled uint8"] = lambda x: fu(x, a.codes, a.d, a.m)

    w = a.exact.float()
    amax = w.abs().amax(1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    w8 = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    s8 = scale.bfloat16()
    out["int8 per row"] = lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w8, s8).float()

    groups = [(a.codes[:, j * GROUP:(j + 1) * GROUP].to(torch.int8).contiguous(), a.d[:, j].bfloat16().contiguous())
              for j in range(g)]                       # Q4_1 codes 0..15 and Q8_0 codes are exact in int8
    m_t = a.m.t().contiguous()                             # [G, N]

    def groupwise(x):
        xb = x.bfloat16()
        y = (x.view(-1, g, GROUP).sum(-1)) @ m_t           # sum_g m[n, g] * sum_j x[g, j]
        for j, (cj, dj) in enumerate(groups):
            y += torch.ops.aten._weight_int8pack_mm(xb[:, j * GROUP:(j + 1) * GROUP].contiguous(), cj, dj).float()
        return y

    out["int8 groupwise"] = groupwise

    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                # torch deprecates quantized tensors (issue 184982)
            wq = torch.quantize_per_channel(w, scale, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
            prepacked = torch.ops.quantized.linear_prepack(wq, None)
        out["fbgemm dynamic"] = lambda x: torch.ops.quantized.linear_dynamic(x, prepacked, False)
    else:
        out["fbgemm dynamic"] = "n/a (no fbgemm engine in this torch)"

    if fp16_kernel_available():
        f16 = Fp16Linear.from_parts(parts)
        out["fbgemm fp16"] = lambda x: f16(x, dense=False)
    else:
        out["fbgemm fp16"] = "n/a (no usable fbgemm float16 GEMM in this torch)"
    wt = w.t().contiguous()
    out["float32"] = lambda x: x @ wt
    return out


def median_us(f, x, budget: float) -> float:
    start = time.perf_counter()
    f(x)
    first = time.perf_counter() - start
    reps = max(3, min(30, int(budget / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--matrices", nargs="+", choices=list(MATRICES), default=list(MATRICES))
    ap.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of repetitions per cell (about)")
    args = ap.parse_args()
    # One graph per matrix and row count, all from the same two functions: lift dynamo's default
    # limit of 8 recompilations per function so none falls back to eager.
    torch._dynamo.config.recompile_limit = 1024

    print(f"torch {torch.__version__}, ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {args.threads}, rows {args.rows}")
    mats = load_matrices(args.matrices)
    gen = torch.Generator().manual_seed(0)
    for name, parts in mats.items():
        a = Affine(parts)
        fns = {c: f for c, f in candidates(parts, a).items() if c in args.candidates}
        x64 = torch.randn(64, a.k, generator=gen)
        ref = x64.double() @ a.exact.t()
        print(f"\n{name}: {a.n} x {a.k} ({parts[0].type_name})")
        compile_s: dict[str, float] = {}
        for cand, f in fns.items():
            if isinstance(f, str):
                print(f"  {cand:17s} {f}")
                continue
            t = time.perf_counter()
            err = ((f(x64).double() - ref).norm() / ref.norm()).item()
            compile_s[cand] = time.perf_counter() - t
            alone = [f(x64[i:i + 1]) for i in range(4)]
            invariant = all(torch.equal(f(x64[:r])[i:i + 1], alone[i]) for r in (4, 16, 64) for i in range(4))
            extra = f", first call (compile) {compile_s[cand]:.1f} s" if cand.startswith("compiled") else ""
            print(f"  {cand:17s} relative error {err:.2e}, {'invariant' if invariant else 'NOT batch-invariant'}{extra}")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for rows in args.rows:
                x = torch.randn(rows, a.k, generator=gen)
                cells = []
                for cand, f in fns.items():
                    if isinstance(f, str):
                        continue
                    cells.append(f"{cand} {median_us(f, x, args.budget):8.0f}")
                print(f"  {threads} thr {rows:3d} rows (us): " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
