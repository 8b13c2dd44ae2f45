"""Would weight-only int8 layer matrices beat the packed int4 default? (issue 19)

torch's weight-only int8 CPU kernel (``aten._weight_int8pack_mm``) takes one scale per output
row, so a GGUF Q4_1 matrix ``w`` (per-32-input affine groups) must be *requantized*:
``scale[n] = max_k |w[n, k]| / 127``, ``codes = round(w / scale)`` in ``-127..127`` (an error up to
``scale[n] / 2`` per weight, on top of the file's own 4-bit rounding). This script builds that
variant in-process from the default model (every layer matrix, or the ones ``--only`` names;
the output projection stays int4 in every variant) and compares it with the default packed
model, against the exact float32 model (``weights: dequantize``):

* top-1 agreement and the largest logit gap on the teacher-forced test of
  tests/backends/test_llama_smollm2.py (4 prompts, 32 steps of the exact model's greedy tokens);
* batch-1 decode tokens per second, the variants alternating, best (and median) of ``--repeats``;
* the bytes the layer matrices hold (what resident memory grows by).

``--kind fbgemm`` instead runs the same requantized int8 weights through fbgemm's dynamic
int8 GEMM (``quantized.linear_dynamic``): the activations are quantized to int8 too, with one
scale per call (so a row's result depends on the other rows of the batch), and the product is
integer dot products, as in llama.cpp (which keeps the file's 4-bit groups, though).

    python benchmarks/bench_int8_layers.py --threads 1 --repeats 5
    python benchmarks/bench_int8_layers.py --only w_gate_up wqkv
    python benchmarks/bench_int8_layers.py --kind fbgemm --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams

LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")
PROMPTS = ("The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "List three colors:")


class Int8Rows:
    """``x @ W.T`` with ``W`` as per-output-row symmetric int8 (see the module docstring); the
    activations and scales go to the kernel in bfloat16, its fast path (float32 activations
    measured about 3x slower end to end on AVX2)."""

    def __init__(self, w: torch.Tensor):
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        self.codes = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16).contiguous()
        self.out_features = w.shape[0]

    def __call__(self, x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.codes, self.scale)
        return y.to(x.dtype).view(*lead, self.out_features)

    def nbytes(self) -> int:
        return self.codes.numel() + 2 * self.scale.numel()


class FbgemmDynamic:
    """``x @ W.T`` by fbgemm's dynamic int8 GEMM: ``W`` requantized per output row as in
    :class:`Int8Rows`, ``x`` quantized to uint8 per call (min/max over the whole call) inside
    ``quantized.linear_dynamic``; float32 in and out."""

    def __init__(self, w: torch.Tensor):
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # torch deprecates quantized tensors (pytorch issue 184982)
            wq = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0,
                                            torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(wq, None)
        self.out_features = w.shape[0]
        self._bytes = w.numel() + 8 * w.shape[0]

    def __call__(self, x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float(), self.packed, False)
        return y.to(x.dtype).view(*lead, self.out_features)

    def nbytes(self) -> int:
        return self._bytes


class Fp16Rows:
    """``x @ W.T`` by fbgemm's float16-weight GEMM (``quantized.linear_dynamic_fp16``: float32
    activations, ``W`` rounded to float16, float32 accumulation). fbgemm picks its micro-kernels
    by the call's row count and a row's bits differ between some of them, so rows go through calls
    of exactly ``chunk`` rows (the last one padded with zeros): every row then gets the same bits
    whatever the batch."""

    def __init__(self, w: torch.Tensor, chunk: int):
        self.packed = torch.ops.quantized.linear_prepack_fp16(w.float().contiguous(), None)
        self.out_features, self.chunk = w.shape[0], chunk
        self._bytes = 2 * w.numel()

    def __call__(self, x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float()
        m, c = x2.shape[0], self.chunk
        if c and m % c:
            x2 = torch.cat([x2, x2.new_zeros(c - m % c, x2.shape[1])])
        if c:
            y = torch.cat([torch.ops.quantized.linear_dynamic_fp16(part, self.packed) for part in x2.split(c)])[:m]
        else:
            y = torch.ops.quantized.linear_dynamic_fp16(x2, self.packed)
        return y.to(x.dtype).view(*lead, self.out_features)

    def nbytes(self) -> int:
        return self._bytes


def dense_w(lin) -> torch.Tensor:
    """``W`` ``[N, K]`` float32 of a packed int4 linear: the file's matrix with its scales and
    zeros as the default model holds them (rounded to bfloat16), so that the int8 variant differs
    from the default only by the requantization."""
    return lin.dense_t().float().t().contiguous()


def agreement(exact: LlamaBackend, other: LlamaBackend) -> tuple[int, int, float]:
    prompts = [exact.tokenize(p) for p in PROMPTS]
    e, o = exact.prefill(prompts).last, other.prefill(prompts).last
    worst, agree, total = (e - o).abs().max().item(), 0, 0
    for _ in range(32):
        nxt = e.argmax(-1)
        agree += int((o.argmax(-1) == nxt).sum())
        total += len(prompts)
        e, o = exact.step(nxt), other.step(nxt)
        worst = max(worst, (e - o).abs().max().item())
    return agree, total, worst


def decode_rate(backend: LlamaBackend, steps: int, batch: int = 1) -> float:
    """New tokens per second over ``steps`` decode steps of ``batch`` rows (one prompt, repeated)."""
    backend.prefill([backend.tokenize(PROMPTS[0])] * batch)
    nxt = torch.tensor([backend.tokenize(" Paris")[0]] * batch)
    for _ in range(3):
        backend.step(nxt)
    start = time.perf_counter()
    for _ in range(steps):
        backend.step(nxt)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    ap.add_argument("--only", nargs="+", choices=LINEARS, default=list(LINEARS),
                    help="which layer matrices become int8 (default: all four)")
    ap.add_argument("--batch", type=int, default=1, help="rows per decode step in the timing")
    ap.add_argument("--chunk", type=int, default=4, help="fp16: rows per fbgemm call (0: one call)")
    ap.add_argument("--output", action="store_true", help="the output matrix too (default: int4 always)")
    ap.add_argument("--kind", choices=("int8", "fbgemm", "fp16"), default="int8",
                    help="int8: weight-only _weight_int8pack_mm (bfloat16 activations); fbgemm: dynamic int8 "
                         "activations and weights (quantized.linear_dynamic)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    exact = LlamaBackend(LlamaParams(weights="dequantize", cache=False))
    packed = LlamaBackend(LlamaParams(weights="packed", cache=False))
    int8 = LlamaBackend(LlamaParams(weights="packed", cache=False))
    before = after = 0
    make = {"int8": Int8Rows, "fbgemm": FbgemmDynamic, "fp16": lambda w: Fp16Rows(w, args.chunk)}[args.kind]
    for layer in int8.model.layers:
        for name in args.only:
            lin = getattr(layer, name)
            before += lin.nbytes()
            setattr(layer, name, make(dense_w(lin)))
            after += getattr(layer, name).nbytes()
    if args.output:
        before += int8.model.lm_head.nbytes()
        int8.model.lm_head = make(dense_w(int8.model.lm_head))
        after += int8.model.lm_head.nbytes()
    print(f"torch {torch.__version__}, ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} thread(s); {args.kind}: {', '.join(args.only)}")
    print(f"matrices {args.kind}: {after / 1e6:.1f} MB vs int4 {before / 1e6:.1f} MB (+{(after - before) / 1e6:.1f} MB)")
    label = f"{args.kind} layers"
    for name, b in (("packed int4 (default)", packed), (label, int8)):
        agree, total, worst = agreement(exact, b)
        print(f"{name}: top-1 agreement {agree}/{total}, largest logit gap {worst:.3f}")
    rates: dict[str, list[float]] = {"packed int4 (default)": [], label: []}
    for _ in range(args.repeats):                  # alternate, so background load hits both alike
        rates["packed int4 (default)"].append(decode_rate(packed, args.steps, args.batch))
        rates[label].append(decode_rate(int8, args.steps, args.batch))
    base = max(rates["packed int4 (default)"])
    for name, r in rates.items():
        print(f"{name}: batch-{args.batch} decode best {max(r):.1f} tok/s (median {statistics.median(r):.1f}), "
              f"{max(r) / base:.2f}x the default")


if __name__ == "__main__":
    main()
