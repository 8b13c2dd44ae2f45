"""Fused CUDA kernels (Triton) for the sync-free sampling path: the same results as the torch ops.

On a GPU the torch implementation of a sampling step is launch-bound (tens of small kernels) or,
for ``top_k``, bound by an int64 ``topk`` over ``[B, V]`` keys. These kernels replace them:

- the counter-based race (:func:`row_keys`, :func:`race_candidates`) and the two-stage race on
  a candidate list (:func:`race_blocks_candidates`);
- temperature's division and the top-k keys (:func:`divide`, :func:`topk_keys`);
- the exact top-k selection without a ``topk`` over the vocabulary (:func:`top_k_candidates`);
- top_p on a candidate list (:func:`top_p_candidates_`).

Integer hashing is bit for bit the torch path's (unsigned 64-bit wrapping arithmetic is the
torch path's int64 arithmetic), and ``log``/``exp`` are libdevice's, as torch's CUDA ones, so
tokens do not depend on which path ran. Sums that the torch path also does in another order are
float64 sums rounded once (see each function). Used only for CUDA tensors when Triton imports;
``SAMPLERKIT_NO_TRITON=1`` forces the torch path. ``tests/test_triton_kernels.py`` checks every
kernel against the torch ops, on machines without a GPU in Triton's interpreter.
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


#: Triton's interpreter (``TRITON_INTERPRET=1``: kernels run on CPU tensors with numpy, which is
#: how the tests check these kernels on machines without a GPU) has no libdevice; its ``tl.log``
#: is numpy's. Compiled kernels use libdevice's ``log``, torch's CUDA ``log``, not ``tl.log``'s
#: fast approximation.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda and not os.environ.get("SAMPLERKIT_NO_TRITON")


#: Longest candidate list the one-program-per-row kernels take (a row is held in registers).
CANDIDATES_MAX = 1024


def _row_block(k: int) -> int:
    """The block of a one-program-per-row kernel over ``k`` columns (a power of two)."""
    return max(16, triton.next_power_of_2(k))


if triton is not None:
    _math = tl if INTERPRETED else libdevice       # a module: kernels may read it as a global

    @triton.jit
    def _log(x):
        return _math.log(x)

    @triton.jit
    def _exp(x):
        return _math.exp(x)

    @triton.jit
    def _mix(x):
        """SplitMix64's finaliser on uint64 (``random._mix``)."""
        x = x ^ (x >> 30)
        x = x * 0xBF58476D1CE4E5B9
        x = x ^ (x >> 27)
        x = x * 0x94D049BB133111EB
        return x ^ (x >> 31)

    @triton.jit
    def _gumbel(key, ids):
        """``gumbel_noise`` of (row key, ids): SplitMix64, 24-bit uniforms, ``-log(-log u)``."""
        h = _mix(key + ids.to(tl.uint64) * 0xD1B54A32D192ED03)
        # Clamped as in samplerkit.ops.random.gumbel_noise: 2^24 - 0.5 rounds to 2^24 (u = 1).
        u = tl.minimum((h >> 40).to(tl.float32) + 0.5, 16777215.0) * (1.0 / 16777216.0)
        return -_log(-_log(u))

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
        score = tl.where(mask, values + _gumbel(tl.load(keys_ptr + row).to(tl.uint64), ids), float("-inf"))
        best = tl.argmax(score, axis=0)
        token = tl.sum(tl.where(cols == best, ids, 0), axis=0)
        tl.store(out_ptr + row, token)


    @triton.jit
    def _saturating_divide(x, divisor):
        """Temperature's division (IEEE round-to-nearest, as torch's), saturated at the float32
        range where a finite logit overflows."""
        q = tl.div_rn(x, divisor)
        overflow = (tl.abs(q) == float("inf")) & (tl.abs(x) != float("inf"))
        return tl.where(overflow, tl.where(q > 0, 3.4028234663852886e38, -3.4028234663852886e38), q)

    @triton.jit
    def _order_key(x, cols):
        """``(order(x) << 32) + (2^32 - 1 - id)``: int64 keys whose order is the logits' order,
        lower ids first among equal logits (see ``top_k_candidates_keyed``)."""
        x = tl.where(x == 0.0, 0.0, x)                     # -0.0 ranks with +0.0
        bits = x.to(tl.int32, bitcast=True)
        order = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return (order.to(tl.int64) << 32) + (4294967295 - cols.to(tl.int64))

    @triton.jit
    def _topk_keys_kernel(x_ptr, div_ptr, out_ptr, vocab, stride_x, HAS_DIV: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_DIV:
            x = _saturating_divide(x, tl.load(div_ptr + row))
        tl.store(out_ptr + row * vocab + cols, _order_key(x, cols), mask=mask)


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
        tl.store(out_ptr + row * vocab + cols, _saturating_divide(x, tl.load(div_ptr + row)), mask=mask)


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
                          BLOCK=_row_block(k))
    return out


# --- Fused exact top-k selection --------------------------------------------------------------
#
# The k largest keys of a row lie in the k groups (of GROUP consecutive ids) with the largest
# group maxima: each of those k keys sits in a group whose maximum is at least as large, and at
# most k groups have a maximum that large (each such maximum is itself one of the k keys; keys
# are distinct because they carry the id). So kernel 1 reduces each group of 32 logits to its
# maximum key (one read of the logits), and kernel 2, one program per row, takes the top K
# groups and the top K keys among their K * GROUP members, sorted: the same list as one
# ``topk`` over all V keys, without that topk (the largest part of a captured B=64 step on a
# GPU: docs/performance.md).

#: Below this key no real token's key lies (the smallest is -2^63 + 2^32 - V): padding.
KEY_NONE = -9223372036854775807
GROUP = 32
#: Largest ``k_max`` the fused selection takes (kernel 2 holds K * GROUP keys in one program).
FUSED_TOP_K_MAX = 256
#: Largest vocabulary (kernel 2 also holds one key per group, padded to a power of two).
FUSED_VOCAB_MAX = 8192 * GROUP

if triton is not None:
    _KEY_NONE = tl.constexpr(KEY_NONE)      # compiled kernels read only constexpr globals

    @triton.jit
    def _largest_by_sort(x, N: tl.constexpr, K: tl.constexpr):
        """The ``K`` largest entries of ``x`` ([N], powers of two), descending: a full bitonic
        sort, then the first row of its [N // K, K] view (Triton cannot slice)."""
        s = tl.reshape(tl.sort(x, descending=True), (N // K, K))
        first = tl.arange(0, N // K)[:, None] == 0
        return tl.max(tl.where(first, s, _KEY_NONE), axis=0)

    if hasattr(tl, "topk"):          # Triton >= 3.5: a bitonic top-k, cheaper than a full sort
        @triton.jit
        def _largest(x, N: tl.constexpr, K: tl.constexpr):
            return tl.topk(x, K)
    else:
        _largest = _largest_by_sort

    @triton.jit
    def _group_max_kernel(x_ptr, div_ptr, out_ptr, vocab, stride_x, N_GROUPS: tl.constexpr,
                          HAS_DIV: tl.constexpr, GROUP: tl.constexpr, PER_PROGRAM: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        groups = tl.program_id(1) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
        cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = cols < vocab
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_DIV:
            x = _saturating_divide(x, tl.load(div_ptr + row))
        keys = tl.where(mask, _order_key(x, cols), _KEY_NONE)
        tl.store(out_ptr + row * N_GROUPS + groups, tl.max(keys, axis=1))

    @triton.jit
    def _select_top_k_kernel(x_ptr, div_ptr, group_max_ptr, k_ptr, values_ptr, ids_ptr, vocab, stride_x,
                             k_max, N_GROUPS: tl.constexpr, HAS_DIV: tl.constexpr, GROUP: tl.constexpr,
                             K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        best = _largest(tl.load(group_max_ptr + row * N_GROUPS + tl.arange(0, N_GROUPS)), N_GROUPS, K)
        group = (4294967295 - (best & 4294967295)) // GROUP      # padding decodes past the vocabulary
        cols = group[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = cols < vocab
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_DIV:
            divisor = tl.load(div_ptr + row)
            x = _saturating_divide(x, divisor)
        keys = tl.reshape(tl.where(mask, _order_key(x, cols), _KEY_NONE), (K * GROUP,))
        top = _largest(keys, K * GROUP, K)
        ids = 4294967295 - (top & 4294967295)
        slot = tl.arange(0, K)
        used = slot < k_max
        # The values again from the logits (not decoded from the keys): the same bits, -0.0 included.
        values = tl.load(x_ptr + row * stride_x + ids, mask=used, other=0.0)
        if HAS_DIV:
            values = _saturating_divide(values, divisor)
        k_eff = tl.minimum(tl.maximum(tl.load(k_ptr + row), 1), k_max)
        values = tl.where(slot < k_eff, values, float("-inf"))
        tl.store(values_ptr + row * k_max + slot, values, mask=used)
        tl.store(ids_ptr + row * k_max + slot, ids, mask=used)


def fused_top_k_supported(vocab: int, k_max: int) -> bool:
    """Shapes :func:`top_k_candidates` takes: ``k_max`` up to 256, ``32 * K <= V <= 2^18``
    (``K``: ``k_max`` rounded up to a power of two)."""
    return 1 <= k_max <= FUSED_TOP_K_MAX and GROUP * triton.next_power_of_2(k_max) <= vocab <= FUSED_VOCAB_MAX


def top_k_candidates(logits: torch.Tensor, k: torch.Tensor, k_max: int, divisor: torch.Tensor | None = None,
                     *, per_program: int = 128, select_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate list of :func:`samplerkit.ops.candidates.top_k_candidates_keyed` (of
    ``logits / divisor``, saturated, when ``divisor`` is given) in two kernels instead of an
    int64 ``topk`` over ``[B, V]``: the same ``values`` and ``ids``, bit for bit. Only for shapes
    :func:`fused_top_k_supported` accepts. ``per_program`` (groups per program of kernel 1)
    and ``select_warps`` (warps of kernel 2) are tuning knobs: ``benchmarks/bench_selection.py``
    times alternatives."""
    rows, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        logits = logits.float().contiguous()
    n_groups = triton.next_power_of_2(triton.cdiv(vocab, GROUP))
    per_program = min(per_program, n_groups)
    div = divisor.float().reshape(rows).contiguous() if divisor is not None else logits
    group_max = torch.empty(rows, n_groups, dtype=torch.int64, device=logits.device)
    _group_max_kernel[(rows, n_groups // per_program)](logits, div, group_max, vocab, logits.stride(0), n_groups,
                                                       HAS_DIV=divisor is not None, GROUP=GROUP,
                                                       PER_PROGRAM=per_program)
    values = torch.empty(rows, k_max, dtype=torch.float32, device=logits.device)
    ids = torch.empty(rows, k_max, dtype=torch.int64, device=logits.device)
    _select_top_k_kernel[(rows,)](logits, div, group_max, k.to(torch.int64).contiguous(), values, ids, vocab,
                                  logits.stride(0), k_max, n_groups, HAS_DIV=divisor is not None, GROUP=GROUP,
                                  K=triton.next_power_of_2(k_max), num_warps=select_warps)
    return values, ids


# --- Candidate lists: top_p and the two-stage race in one kernel each ---------------------------
#
# After the fused top-k, a row is a short list of candidates (values sorted descending, ids).
# With torch ops, top_p on that list is about twenty kernels of a few microseconds each, and the
# two-stage race about twenty-five; here each is one program per row.

if triton is not None:

    @triton.jit
    def _safe_top(values):
        """``safe_top``: the row maximum (NaN if the row holds one, as torch's ``amax``), with
        ``+-inf`` replaced by 0."""
        top = tl.max(values, axis=0)
        top = tl.where(tl.sum((values != values).to(tl.int32), axis=0) > 0, float("nan"), top)
        return tl.where(tl.abs(top) == float("inf"), 0.0, top)

    @triton.jit
    def _exp_weights(values, top):
        """``exp_weights``: ``exp(max(x - top, -87))``, NaN kept (a ``where``, not ``maximum``)."""
        d = values - top
        return _exp(tl.where(d < -87.0, -87.0, d))

    @triton.jit
    def _top_p_candidates_kernel(values_ptr, p_ptr, active_ptr, k, stride_v, HAS_ACTIVE: tl.constexpr,
                                 BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        used = cols < k
        values = tl.load(values_ptr + row * stride_v + cols, mask=used, other=float("-inf"))
        weights = tl.where(used, _exp_weights(values, _safe_top(values)), 0.0).to(tl.float64)
        total = tl.sum(weights, axis=0).to(tl.float32).to(tl.float64)
        before = tl.cumsum(weights, axis=0) - weights
        keep = (before < tl.load(p_ptr + row).to(tl.float64) * total) | (cols == 0)
        n_keep = tl.sum((keep & used).to(tl.int32), axis=0)
        threshold = tl.sum(tl.where(cols == n_keep - 1, values, 0.0), axis=0)
        kept = values >= threshold
        if HAS_ACTIVE:
            kept = kept | (tl.load(active_ptr + row) == 0)
        tl.store(values_ptr + row * stride_v + cols, tl.where(kept, values, float("-inf")), mask=used)


def top_p_candidates_(values: torch.Tensor, p: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """Top-p on a candidate list in place, in one kernel: ``values`` (``[B, K]`` float32, sorted
    descending, ``K <= CANDIDATES_MAX``) with every candidate outside the nucleus set to ``-inf``, as
    ``remove_unkept(values, top_p_on_sorted(values, p) | ~active)`` computes it. Rows where
    ``active`` is false are left as they are."""
    rows, k = values.shape
    if values.stride(-1) != 1:
        raise ValueError("top_p_candidates_ needs rows with unit stride")
    act = active.to(torch.int8).contiguous() if active is not None else values
    _top_p_candidates_kernel[(rows,)](values, p.float().contiguous(), act, k, values.stride(0),
                                      HAS_ACTIVE=active is not None, BLOCK=_row_block(k))
    return values


if triton is not None:

    @triton.jit
    def _race_blocks_kernel(values_ptr, ids_ptr, keys_ptr, out_ptr, k, stride_v, stride_i,
                            BLOCK_STREAM_SALT: tl.constexpr, RACE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        used = cols < k
        values = tl.load(values_ptr + row * stride_v + cols, mask=used, other=float("-inf"))
        ids = tl.load(ids_ptr + row * stride_i + cols, mask=used, other=0)
        key = tl.load(keys_ptr + row).to(tl.uint64)
        # Stage 1: each candidate's block mass (float64 sums rounded once, as the torch path), then
        # the race among blocks with the block stream's noise.
        weights = tl.where(used, _exp_weights(values, _safe_top(values)), 0.0).to(tl.float64)
        block = ids // RACE_BLOCK
        same = block[:, None] == block[None, :]
        mass = tl.sum(tl.where(same, weights[None, :], 0.0), axis=1).to(tl.float32)
        block_key = _mix(key + BLOCK_STREAM_SALT)
        # (NaN scores only occur in rows reported invalid, whose draw is discarded: as -inf here
        # they cannot trip the argmax.)
        block_score = _log(mass) + _gumbel(block_key, block)
        block_score = tl.where(used & (block_score == block_score), block_score, float("-inf"))
        chosen = tl.sum(tl.where(cols == tl.argmax(block_score, axis=0), block, 0), axis=0)
        # Stage 2: the race among the chosen block's candidates, with the tokens' own noise.
        score = values + _gumbel(key, ids)
        score = tl.where(used & (block == chosen) & (score == score), score, float("-inf"))
        tl.store(out_ptr + row, tl.sum(tl.where(cols == tl.argmax(score, axis=0), ids, 0), axis=0))


def race_blocks_candidates(values: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor, block_stream_salt: int,
                           race_block: int) -> torch.Tensor:
    """``race_sample_candidates``'s two stages (``K <= 64`` candidates: pairwise block masses)
    in one kernel: the same token as the torch ops."""
    values = values.float().contiguous()
    rows, k = values.shape
    ids = ids.expand_as(values).to(torch.int64).contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=values.device)
    _race_blocks_kernel[(rows,)](values, ids, keys.contiguous(), out, k, values.stride(0), ids.stride(0),
                                 BLOCK_STREAM_SALT=block_stream_salt, RACE_BLOCK=race_block,
                                 BLOCK=_row_block(k))
    return out


if triton is not None:

    @triton.jit
    def _candidates_valid_kernel(values_ptr, out_ptr, k, stride_v, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        values = tl.load(values_ptr + row * stride_v + cols, mask=cols < k, other=0.0)
        first = tl.sum(tl.where(cols == 0, values, 0.0), axis=0)
        nan = tl.sum((values != values).to(tl.int32), axis=0) > 0
        tl.store(out_ptr + row, (tl.abs(first) < float("inf")) & ~nan)


def candidates_valid(values: torch.Tensor) -> torch.Tensor:
    """``isfinite(values[:, 0]) & ~values.isnan().any(-1)`` (``[B]`` bool) in one kernel: a
    candidate list's rows that are usable (the pipeline's validity flag)."""
    values = values.float().contiguous()
    rows, k = values.shape
    out = torch.empty(rows, dtype=torch.bool, device=values.device)
    _candidates_valid_kernel[(rows,)](values, out, k, values.stride(0), BLOCK=_row_block(k))
    return out
