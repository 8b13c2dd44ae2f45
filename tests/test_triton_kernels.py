"""The Triton kernels (``samplerkit.ops._triton``) against the torch path they replace, bit for bit.

On a machine without a GPU they run in Triton's interpreter (the root conftest sets
``TRITON_INTERPRET=1`` before anything imports Triton), so CI checks the kernels' logic on the
CPU; ``benchmarks/gpu_check.sh`` runs the same comparisons compiled on CUDA. Shapes are small:
the interpreter executes each program with numpy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from samplerkit.builtins.shaping.temperature import finite_division  # noqa: E402
from samplerkit.ops import _triton  # noqa: E402
from samplerkit.ops import random as torch_random  # noqa: E402
from samplerkit.ops.candidates import order_keys, top_k_candidates_keyed  # noqa: E402

# In the interpreter numpy warns about IEEE arithmetic the kernels mean to do on adversarial
# rows (-inf - -inf, log of a zero mass, a quotient that overflows and is then saturated).
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not _triton.INTERPRETED:
    pytest.skip("no GPU and Triton's interpreter is off (run pytest from the repository root)",
                allow_module_level=True)


def adversarial_rows(vocab: int, g: torch.Generator) -> torch.Tensor:
    """Rows a selection must get exactly right: random, integer ties, all equal, fewer finite
    logits than k, NaN, signed zeros, values that overflow after temperature, huge spreads."""
    x = torch.randn(9, vocab, generator=g) * 3
    x[1] = torch.randint(0, 3, (vocab,), generator=g).float()            # many ties at every rank
    x[2] = 0.0                                                            # all equal
    x[3] = float("-inf")
    x[3, [0, 17, vocab - 1]] = torch.tensor([1.0, 2.0, 2.0])              # three finite logits
    x[4, 5], x[4, 6], x[4, 7] = float("nan"), -0.0, 0.0
    x[5, :: 7] = -0.0
    x[6, 3], x[6, 9] = 3e38, -3e38                                        # overflow when divided by < 1
    x[7] = x[7] * 1e4
    x[8, : vocab // 2] = float("-inf")
    return x.to(DEVICE)


def divisors(rows: int) -> torch.Tensor:
    return torch.linspace(0.05, 3.0, rows, device=DEVICE).unsqueeze(-1)


def bitwise(a: torch.Tensor) -> torch.Tensor:
    return a.view(torch.int32) if a.dtype == torch.float32 else a


def test_division_and_keys_equal_the_torch_ops():
    g = torch.Generator().manual_seed(0)
    x = adversarial_rows(3000, g)
    div = divisors(x.shape[0])
    quotient = finite_division(x.clone(), div, torch.empty_like(x))
    assert torch.equal(bitwise(_triton.divide(x, div)), bitwise(quotient))
    assert torch.equal(_triton.topk_keys(x, div), order_keys(quotient))
    assert torch.equal(_triton.topk_keys(x), order_keys(x))


def test_row_keys_and_race_equal_the_torch_path(monkeypatch):
    g = torch.Generator().manual_seed(1)
    rows, k = 300, 40
    values = torch.randn(rows, k, generator=g) * 3
    values[::7, 25:] = float("-inf")
    values[::11, 1] = values[::11, 0]                                     # equal values, different noise
    ids = torch.randint(0, 128256, (rows, k), generator=g)
    seeds = torch.randint(0, 2**62, (rows,), generator=g)
    counters = torch.randint(0, 5000, (rows,), generator=g)
    values, ids, seeds, counters = (t.to(DEVICE) for t in (values, ids, seeds, counters))
    keys = _triton.row_keys(seeds, counters)
    tokens = _triton.race_candidates(values, ids, keys)
    monkeypatch.setattr(_triton, "available", lambda t: False)           # the torch ops from here
    assert torch.equal(keys, torch_random.row_keys(seeds, counters))
    assert torch.equal(tokens, torch_random.race_candidates(values, ids, keys))


@pytest.mark.parametrize(("vocab", "k_max", "temperature"), [
    (3000, 1, False), (3000, 7, True), (3000, 7, False), (512, 16, True), (4099, 16, False), (2500, 50, True)])
def test_fused_top_k_equals_the_keyed_topk(vocab, k_max, temperature):
    """Same values (bit for bit) and ids as one int64 topk over all keys, per-row k included."""
    g = torch.Generator().manual_seed(vocab + k_max)
    x = adversarial_rows(vocab, g)
    rows = x.shape[0]
    k = torch.randint(1, k_max + 1, (rows,), generator=g).to(DEVICE)
    k[0] = k_max
    div = divisors(rows) if temperature else None
    transform = (lambda values, ids: finite_division(values, div, values)) if temperature else None
    assert _triton.fused_top_k_supported(vocab, k_max)
    values, ids = _triton.top_k_candidates(x, k, k_max, div)
    want_values, want_ids = top_k_candidates_keyed(x, k, k_max, transform, div)
    assert torch.equal(ids, want_ids)
    assert torch.equal(bitwise(values), bitwise(want_values))


def candidate_lists(rows: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted candidate lists as the fused top-k leaves them: spread, tied, all equal, short
    (a -inf tail), one token, NaN, +inf; ids crowded into a few 256-id race blocks."""
    values = torch.randn(rows, k, generator=g) * torch.linspace(0.1, 8, rows).unsqueeze(-1)
    values[1::9] = values[1::9].round()
    values[2::9] = 0.5
    values[3::9, k // 3:] = float("-inf")
    values[4::9, 1:] = float("-inf")
    values[5::9, min(3, k - 1)] = float("nan")
    values[6::9, 0] = float("inf")
    values[7::9] *= 1e-3
    values = values.sort(dim=-1, descending=True).values
    ids = torch.randint(0, 2048, (rows, k), generator=g)
    return values.to(DEVICE), ids.to(DEVICE)


@pytest.mark.parametrize("k", [1, 12, 50])
def test_top_p_kernel_equals_the_torch_steps(k, monkeypatch):
    from samplerkit.ops.candidates import top_p_on_sorted
    from samplerkit.ops.truncation import remove_unkept

    g = torch.Generator().manual_seed(k)
    values, _ = candidate_lists(90, k, g)
    for p in (0.05, 0.5, 0.9, 0.999, 1.0):
        pp = torch.full((values.shape[0],), p, device=DEVICE)
        pp[::4] = 0.3
        # top_p = 1 is neutral: TopP marks such rows inactive. (At p = 1 the boundary is the
        # row's last float64 rounding, which the order of the sum decides.)
        active = (torch.rand(values.shape[0], generator=g).to(DEVICE) < 0.8) & (pp < 1)
        got = _triton.top_p_candidates_(values.clone(), pp, active)
        want = remove_unkept(values.clone(), top_p_on_sorted(values, pp) | ~active.unsqueeze(-1))
        assert torch.equal(bitwise(got), bitwise(want)), p
        if p == 1.0:
            continue
        got = _triton.top_p_candidates_(values.clone(), pp)
        want = remove_unkept(values.clone(), top_p_on_sorted(values, pp))
        assert torch.equal(bitwise(got), bitwise(want)), p


@pytest.mark.parametrize("k", [1, 7, 64])
def test_block_race_kernel_equals_the_torch_race(k, monkeypatch):
    """``race_sample_candidates``' two stages in one kernel: the same tokens."""
    g = torch.Generator().manual_seed(100 + k)
    values, ids = candidate_lists(400, k, g)
    valid = torch.isfinite(values[:, 0]) & ~values.isnan().any(-1)       # invalid rows' draws are discarded
    keys = torch.randint(-(2**63), 2**63 - 1, (values.shape[0],), generator=g).to(DEVICE)
    monkeypatch.setattr(_triton, "available", lambda t: True)            # the kernel, on any device
    got = torch_random.race_sample_candidates(values, ids, keys, 128256)
    monkeypatch.setattr(_triton, "available", lambda t: False)
    want = torch_random.race_sample_candidates(values, ids, keys, 128256)
    assert torch.equal(got[valid], want[valid])


def test_validity_kernel_equals_the_torch_ops():
    g = torch.Generator().manual_seed(5)
    for k in (1, 9, 50):
        values, _ = candidate_lists(90, k, g)
        values[8::9, 0] = float("-inf")                                   # nothing left
        values[7::9, k - 1] = float("nan")                                # a NaN past the first slot
        want = torch.isfinite(values[:, 0]) & ~values.isnan().any(dim=-1)
        assert torch.equal(_triton.candidates_valid(values), want)
        assert not want.all() and want.any()


def test_fused_top_k_reads_strided_rows():
    g = torch.Generator().manual_seed(7)
    wide = adversarial_rows(2048 + 96, g)
    x = wide[:, 64:64 + 2048]                                             # rows 2144 apart
    k = torch.full((x.shape[0],), 9, device=DEVICE)
    values, ids = _triton.top_k_candidates(x, k, 9)
    want_values, want_ids = top_k_candidates_keyed(x.contiguous(), k, 9)
    assert torch.equal(ids, want_ids) and torch.equal(bitwise(values), bitwise(want_values))


def test_fused_top_k_shape_limits():
    assert _triton.fused_top_k_supported(128256, 50)
    assert _triton.fused_top_k_supported(32 * 64, 50)                     # K = 64 groups of 32
    assert not _triton.fused_top_k_supported(32 * 64 - 1, 50)             # fewer groups than K
    assert not _triton.fused_top_k_supported(128256, 257)
    assert not _triton.fused_top_k_supported(_triton.FUSED_VOCAB_MAX + 1, 50)
    assert not _triton.fused_top_k_supported(128256, 0)


if _triton.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _largest_by_sort_kernel(x_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr):
        x = tl.load(x_ptr + tl.program_id(0) * N + tl.arange(0, N))
        tl.store(out_ptr + tl.program_id(0) * K + tl.arange(0, K), _triton._largest_by_sort(x, N, K))


def test_largest_by_sort_fallback_equals_topk():
    """The selection older Tritons (no ``tl.topk``) use."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-(2**62), 2**62, (4, 256), generator=g).to(DEVICE)
    x[1, :100] = _triton.KEY_NONE
    out = torch.empty(4, 16, dtype=torch.int64, device=DEVICE)
    _largest_by_sort_kernel[(4,)](x, out, N=256, K=16)
    assert torch.equal(out, x.topk(16, dim=-1).values)


def test_pipeline_tokens_do_not_depend_on_triton(monkeypatch):
    """temperature -> top_k -> top_p, sync-free (the CUDA path): the same processed logits and
    tokens with the Triton kernels (keys, fused selection, race) as with torch ops."""
    import samplerkit
    from samplerkit.context import StepContext
    from samplerkit.ops.sync import sync_free_scope

    g = torch.Generator().manual_seed(11)
    x = adversarial_rows(2048, g)
    x[4, 5] = 0.0                                                         # keep the rows valid
    rows = x.shape[0]
    pipe = samplerkit.load_pipeline({"backend": "bigram", "sampler": "categorical",
                                     "pipeline": [{"temperature": 0.7}, {"top_k": 12}, {"top_p": 0.9}]},
                                    device=DEVICE)
    results = []
    for use_triton in (False, True):
        monkeypatch.setattr(_triton, "available", lambda t, use=use_triton: use and _triton.triton is not None)
        bound = pipe.bind(rows, seeds=list(range(rows)))
        ctx = StepContext(rows, x.shape[-1], device=DEVICE)
        with sync_free_scope():
            results.append((bound.process(x, ctx), *bound.sample_async(x, ctx)))
    (dense_torch, ids_torch, valid_torch), (dense_triton, ids_triton, valid_triton) = results
    assert torch.equal(torch.isfinite(dense_torch), torch.isfinite(dense_triton))
    assert torch.equal(ids_torch, ids_triton)
    assert torch.equal(valid_torch, valid_triton) and bool(valid_torch.all())


def test_kernels_compile_for_cuda_without_spills():
    """The interpreter accepts code Triton's compiler rejects (non-constexpr globals, for one):
    every kernel is also compiled to an sm_90 cubin here, GPU or not, and must not spill."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")          # Triton's default, without its warning
    script = Path(__file__).with_name("compile_triton_kernels.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
