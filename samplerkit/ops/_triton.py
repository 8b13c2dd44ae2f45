"""Fused CUDA kernels (Triton) for the counter-based race: the same bits as the torch path.

On a GPU the torch implementation of :mod:`samplerkit.ops.random` is launch-bound: SplitMix64
and the Gumbel transform are about fifty tiny elementwise kernels per step. These two kernels
compute exactly the same values (unsigned 64-bit wrapping arithmetic is the torch path's int64
arithmetic bit for bit; ``log`` is libdevice's, as torch's CUDA ``log``), so tokens do not
depend on which path ran. Used only for CUDA tensors when Triton imports; set
``SAMPLERKIT_NO_TRITON=1`` to force the torch path.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CPU installs do not have it.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except Exception:  # noqa: BLE001 - any import problem means "not available"
    triton = None


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda and not os.environ.get("SAMPLERKIT_NO_TRITON")


if triton is not None:

    @triton.jit
    def _mix(x):
        x = x ^ (x >> 30)
        x = x * 0xBF58476D1CE4E5B9
        x = x ^ (x >> 27)
        x = x * 0x94D049BB133111EB
        return x ^ (x >> 31)

    @triton.jit
    def _row_keys_kernel(seeds_ptr, counters_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        seed = tl.load(seeds_ptr + offs, mask=mask, other=0).to(tl.uint64)
        counter = tl.load(counters_ptr + offs, mask=mask, other=0).to(tl.uint64)
        golden = 0x9E3779B97F4A7C15
        key = _mix(_mix(seed * golden + 1) + counter * golden)
        tl.store(out_ptr + offs, key.to(tl.int64, bitcast=True), mask=mask)

    @triton.jit
    def _race_kernel(values_ptr, ids_ptr, keys_ptr, out_ptr, k, stride_v, stride_i, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < k
        values = tl.load(values_ptr + row * stride_v + cols, mask=mask, other=float("-inf"))
        ids = tl.load(ids_ptr + row * stride_i + cols, mask=mask, other=0)
        key = tl.load(keys_ptr + row).to(tl.uint64)
        h = _mix(key + ids.to(tl.uint64) * 0xD1B54A32D192ED03)
        u = ((h >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        noise = -libdevice.log(-libdevice.log(u))
        score = tl.where(mask, values + noise, float("-inf"))
        best = tl.argmax(score, axis=0)
        token = tl.sum(tl.where(cols == best, ids, 0), axis=0)
        tl.store(out_ptr + row, token)


    @triton.jit
    def _topk_keys_kernel(x_ptr, div_ptr, out_ptr, vocab, stride_x, HAS_DIV: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_DIV:
            # Temperature's division (IEEE round-to-nearest, as torch's), saturated at the
            # float32 range where a finite logit overflows.
            q = tl.div_rn(x, tl.load(div_ptr + row))
            overflow = (tl.abs(q) == float("inf")) & (tl.abs(x) != float("inf"))
            x = tl.where(overflow, tl.where(q > 0, 3.4028234663852886e38, -3.4028234663852886e38), q)
        x = tl.where(x == 0.0, 0.0, x)                     # -0.0 ranks with +0.0
        bits = x.to(tl.int32, bitcast=True)
        order = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = (order.to(tl.int64) << 32) + (4294967295 - cols.to(tl.int64))
        tl.store(out_ptr + row * vocab + cols, key, mask=mask)


def topk_keys(logits: torch.Tensor, divisor: torch.Tensor | None = None) -> torch.Tensor:
    """int64 top-k keys of ``logits`` (or of ``logits / divisor``, saturated), as
    :func:`samplerkit.ops.candidates.top_k_candidates_keyed` builds them with torch ops."""
    rows, vocab = logits.shape
    logits = logits.float()
    out = torch.empty(rows, vocab, dtype=torch.int64, device=logits.device)
    block = 1024
    div = divisor.float().reshape(rows).contiguous() if divisor is not None else logits
    _topk_keys_kernel[(rows, triton.cdiv(vocab, block))](logits, div, out, vocab, logits.stride(0),
                                                        HAS_DIV=divisor is not None, BLOCK=block)
    return out


if triton is not None:

    @triton.jit
    def _divide_kernel(x_ptr, div_ptr, out_ptr, vocab, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        q = tl.div_rn(x, tl.load(div_ptr + row))
        overflow = (tl.abs(q) == float("inf")) & (tl.abs(x) != float("inf"))
        q = tl.where(overflow, tl.where(q > 0, 3.4028234663852886e38, -3.4028234663852886e38), q)
        tl.store(out_ptr + row * vocab + cols, q, mask=mask)


def divide(logits: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """``logits / divisor`` saturated at the float32 range, as temperature computes it, in one kernel."""
    rows, vocab = logits.shape
    logits = logits.float()
    out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    block = 1024
    _divide_kernel[(rows, triton.cdiv(vocab, block))](logits, divisor.float().reshape(rows).contiguous(), out,
                                                     vocab, logits.stride(0), BLOCK=block)
    return out


def row_keys(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    seeds = seeds.to(torch.int64).contiguous()
    counters = counters.to(torch.int64).contiguous()
    out = torch.empty_like(seeds)
    n = seeds.numel()
    block = 256
    _row_keys_kernel[(triton.cdiv(n, block),)](seeds, counters, out, n, BLOCK=block)
    return out


def race_candidates(values: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    values = values.float().contiguous()
    ids = ids.to(torch.int64).contiguous()
    rows, k = values.shape
    out = torch.empty(rows, dtype=torch.int64, device=values.device)
    _race_kernel[(rows,)](values, ids, keys.contiguous(), out, k, values.stride(0), ids.stride(0),
                          BLOCK=max(16, triton.next_power_of_2(k)))
    return out
