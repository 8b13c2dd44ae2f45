"""Exactness of the sampling ops on a CUDA device (run by benchmarks/gpu_check.sh).

Checks, on the GPU: the fast nucleus mask equals the sort-based reference on random and
adversarial logits; the candidate-list pipeline equals the dense one (processed logits and
sampled tokens); seeded rows draw the same tokens on CUDA as on the CPU; and sampled
frequencies pass a chi-square test. Prints one line per check and exits non-zero on failure.
"""

from __future__ import annotations

import sys

import torch

import samplerkit
from samplerkit.context import StepContext
from samplerkit.ops.truncation import top_p_mask, top_p_mask_reference
from samplerkit.testing import FAST_PATH_CHAINS

DEVICE = "cuda"
failures = 0


def check(name: str, ok: bool, detail: str = "") -> None:
    global failures
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def adversarial(batch: int, vocab: int, g: torch.Generator) -> list[torch.Tensor]:
    x = torch.randn(batch, vocab, generator=g)
    mostly_inf = x.clone()
    mostly_inf[:, : vocab - 40] = float("-inf")
    return [x, x * 0.01, torch.zeros(batch, vocab), x.round(), x * 100, mostly_inf]


def main() -> int:
    g = torch.Generator().manual_seed(0)
    for vocab in (1000, 32000, 128256):
        mismatches = 0
        for x in adversarial(16, vocab, g):
            x = x.to(DEVICE)
            for p in (0.1, 0.5, 0.9, 0.99):
                pp = torch.full((x.shape[0],), p, device=DEVICE)
                mismatches += int((top_p_mask(x, pp) != top_p_mask_reference(x, pp)).sum())
        check(f"top_p fast == reference, V={vocab}", mismatches == 0, f"({mismatches} differing entries)")
    check_checked_paths_on_cuda(g)

    configs = [
        [{"temperature": 0.7}, {"top_k": 50}, {"top_p": 0.9}],
        [{"top_p": 0.8}, {"min_p": 0.1}, {"temperature": 1.3}],
        [{"min_p": 0.05}],
        [{"top_k": 40}, {"temperature": 0.0}],
    ]
    for steps in configs:
        bad = 0
        for trial in range(5):
            x = (torch.randn(8, 32000, generator=g) * (trial + 1)).to(DEVICE)
            pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps, "sampler": "categorical"}, device=DEVICE)
            bound = pipe.bind(8, seeds=list(range(8)))
            ctx = StepContext(8, 32000, device=DEVICE)
            dense = x.clone()
            for _, step in bound.steps:
                dense = step.apply(dense, ctx)
            got = bound.process(x, ctx)
            bad += int((torch.isfinite(dense) != torch.isfinite(got)).sum())
            bad += int((bound.sample(x, ctx) != bound.sampler.sample(dense, ctx)).sum())
            cpu_pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps, "sampler": "categorical"})
            cpu_ids = cpu_pipe.bind(8, seeds=list(range(8))).sample(x.cpu())
            bad += int((cpu_ids != bound.sample(x, ctx).cpu()).sum())
        check(f"candidates == dense == cpu: {steps}", bad == 0, f"({bad} mismatches)")

    # Chi-square: 200k seeded draws from a small filtered distribution.
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], device=DEVICE)
    n = 200_000
    pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": [{"top_p": 0.95}], "sampler": "categorical"}, device=DEVICE)
    ids = pipe.sample(logits.expand(n, -1).contiguous(), seeds=list(range(n)))
    probs = pipe.process(logits.unsqueeze(0)).softmax(-1).squeeze(0).double()
    counts = torch.bincount(ids, minlength=8).double()
    kept = probs > 0
    expected = probs[kept] * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), torch.tensor(chi2 / 2, dtype=torch.float64)))
    check("chi-square categorical after top_p on CUDA", p_value > 1e-6 and int(counts[~kept].sum()) == 0,
          f"(chi2={chi2:.2f}, dof={dof}, p={p_value:.3g}, outside kept set={int(counts[~kept].sum())})")
    # The two-level sampler on a large vocabulary: most draws come from the tail.
    vocab, n = 1000, 200_000
    flat = torch.randn(vocab, generator=g).to(DEVICE) * 0.5
    pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": [], "sampler": "categorical"}, device=DEVICE)
    ids = pipe.sample(flat.expand(n, -1).contiguous(), seeds=list(range(n)))
    expected = flat.double().softmax(-1) * n
    counts = torch.bincount(ids, minlength=vocab).double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    p_value = float(torch.special.gammaincc(torch.tensor((vocab - 1) / 2.0, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    check("chi-square categorical, V=1000 untruncated (tail path) on CUDA", p_value > 1e-6,
          f"(chi2={chi2:.1f}, dof={vocab - 1}, p={p_value:.3g})")
    check_triton_matches_torch()
    check_sync_free_and_graphs()
    check_llama_backend_on_cuda()
    return 1 if failures else 0


def without_triton(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the torch path (``SAMPLERKIT_NO_TRITON=1`` while it runs)."""
    import os

    os.environ["SAMPLERKIT_NO_TRITON"] = "1"
    try:
        return fn(*args, **kwargs)
    finally:
        del os.environ["SAMPLERKIT_NO_TRITON"]


def check_triton_matches_torch() -> None:
    """The Triton kernels give bit-identical keys, candidate lists and tokens to the torch path."""
    from samplerkit.ops import _triton
    from samplerkit.ops.candidates import order_keys, top_k_candidates_keyed
    from samplerkit.ops.random import race_candidates, row_keys

    if not _triton.available(torch.zeros(1, device=DEVICE)):
        print("skip Triton race: Triton is not available on this device", flush=True)
        return
    g = torch.Generator().manual_seed(3)
    rows, k = 20_000, 64
    values = (torch.randn(rows, k, generator=g) * 3).to(DEVICE)
    values[::7, 40:] = float("-inf")
    ids = torch.randint(0, 128256, (rows, k), generator=g).to(DEVICE)
    seeds = torch.randint(0, 2**62, (rows,), generator=g).to(DEVICE)
    counters = torch.randint(0, 5000, (rows,), generator=g).to(DEVICE)
    fused_keys = row_keys(seeds, counters)
    fused = race_candidates(values, ids, fused_keys)
    torch_keys = without_triton(row_keys, seeds, counters)
    reference = without_triton(race_candidates, values, ids, torch_keys)
    check("Triton row keys == torch row keys", bool(torch.equal(fused_keys, torch_keys)))
    same = int((fused == reference).sum())
    check("Triton race == torch race", same == rows, f"({same}/{rows} rows equal)")
    # The fused top-k key kernel (temperature's division included) == the torch keys.
    from samplerkit.builtins.shaping.temperature import finite_division
    x = (torch.randn(64, 128256, generator=g) * 3).to(DEVICE)
    x[0, :1000] = float("-inf")
    x[1, 5], x[1, 6], x[2, 7] = -0.0, 0.0, 3e38
    x[3] = torch.randint(0, 3, (128256,), generator=g).float().to(DEVICE)
    divisor = torch.linspace(0.05, 3.0, 64, device=DEVICE).unsqueeze(-1)
    quotient = finite_division(x.clone(), divisor, torch.empty_like(x))
    check("Triton top-k keys (with temperature) == torch keys",
          bool(torch.equal(_triton.topk_keys(x, divisor), order_keys(quotient))))
    check("Triton temperature division == torch", bool(torch.equal(_triton.divide(x, divisor).view(torch.int32),
                                                                      quotient.view(torch.int32))))
    # The fused two-kernel selection == one int64 topk over the torch keys: values bit for bit, ids.
    x[5] = torch.randint(0, 3, (128256,), generator=g).float().to(DEVICE)
    xn = x.clone()
    xn[6, 100:200] = float("nan")              # (the tie repair below does not order NaN ties)

    def divide(values, ids):
        return finite_division(values, divisor, values)

    for k_max in (1, 50, 256):
        k = torch.randint(1, k_max + 1, (64,), generator=g).to(DEVICE)
        values, ids = without_triton(top_k_candidates_keyed, xn, k, k_max, divide)
        got_values, got_ids = _triton.top_k_candidates(xn, k, k_max, divisor)
        check(f"fused Triton top-k == int64 keys topk, k_max={k_max}",
              bool(torch.equal(got_ids, ids)) and bool(torch.equal(got_values.view(torch.int32), values.view(torch.int32))))
    # top_p and the two-stage race on candidate lists, one kernel each == the torch ops.
    from samplerkit.ops.candidates import top_p_on_sorted
    from samplerkit.ops.random import race_sample_candidates
    from samplerkit.ops.truncation import remove_unkept
    values = (torch.randn(20_000, 50, generator=g) * torch.linspace(0.1, 8, 20_000).unsqueeze(-1))
    values[1::9] = values[1::9].round()
    values[3::9, 20:] = float("-inf")
    values = values.sort(dim=-1, descending=True).values.to(DEVICE)
    cand_ids = torch.randint(0, 4096, (20_000, 50), generator=g).to(DEVICE)
    p = torch.rand(20_000, generator=g).clamp(min=0.05).to(DEVICE)
    got = _triton.top_p_candidates_(values.clone(), p)
    want = remove_unkept(values.clone(), top_p_on_sorted(values, p))
    same = int((got.view(torch.int32) == want.view(torch.int32)).all(-1).sum())
    check("Triton top_p on candidates == torch", same == 20_000, f"({same}/20000 rows equal)")
    keys = torch.randint(-(2**63), 2**63 - 1, (20_000,), generator=g).to(DEVICE)
    got = race_sample_candidates(values, cand_ids, keys, 128256)
    want = without_triton(race_sample_candidates, values, cand_ids, keys, 128256)
    same = int((got == want).sum())
    check("Triton two-stage candidate race == torch", same == 20_000, f"({same}/20000 rows equal)")
    # The two sync-free exact top-k selections keep the same sets (x has ties and -inf).
    from samplerkit.ops.candidates import top_k_candidates_repaired
    x[4] = torch.randint(0, 5, (128256,), generator=g).float().to(DEVICE)
    k = torch.randint(1, 64, (64,), generator=g).to(DEVICE)
    sets = []
    for select in (top_k_candidates_keyed, top_k_candidates_repaired):
        values, ids = select(x, k, int(k.max()), divisor=divisor)
        used = torch.arange(ids.shape[1], device=DEVICE) < k.unsqueeze(-1)
        kept = torch.zeros(x.shape, dtype=torch.bool, device=DEVICE)
        kept[torch.arange(64, device=DEVICE).unsqueeze(-1).expand_as(ids)[used], ids[used]] = True
        sets.append(kept)
    check("sync-free top-k: float32 topk + tie repair == int64 keys", bool(torch.equal(*sets)))


def check_checked_paths_on_cuda(g: torch.Generator) -> None:
    """The paths eager CUDA steps take with ``SAMPLERKIT_SYNC_FREE=0`` (host checks allowed):
    top_p's histogram and candidates, typical_p's histogram, top_n_sigma's float32 threshold,
    each against its reference on the GPU."""
    from samplerkit.ops import sync
    from samplerkit.ops.shaping import top_n_sigma_mask, typical_mask, typical_mask_reference

    saved, sync.EAGER_CUDA = sync.EAGER_CUDA, False
    try:
        for vocab in (5000, 128256):
            top_p_bad = typical_bad = sigma_bad = 0
            for x in adversarial(16, vocab, g):
                x = x.to(DEVICE)
                ones = torch.ones(x.shape[0], dtype=torch.int64, device=DEVICE)
                for p in (0.1, 0.5, 0.9, 0.99):
                    pp = torch.full((x.shape[0],), p, device=DEVICE)
                    top_p_bad += int((top_p_mask(x, pp) != top_p_mask_reference(x, pp)).sum())
                    typical_bad += int((typical_mask(x, pp, ones, 1) != typical_mask_reference(x, pp, ones, 1)).sum())
                for n in (0.5, 2.0):
                    nn = torch.full((x.shape[0],), n, device=DEVICE)
                    finite = torch.isfinite(x)
                    x64 = torch.where(finite, x.double(), 0.0)
                    count = finite.sum(-1, keepdim=True).clamp(min=1).double()
                    mean = x64.sum(-1, keepdim=True) / count
                    std = ((torch.where(finite, x64 - mean, 0.0) ** 2).sum(-1, keepdim=True) / count).sqrt()
                    want = x.double() >= x.amax(-1, keepdim=True).double() - n * std
                    sigma_bad += int((top_n_sigma_mask(x, nn) != want).sum())
            for name, bad in (("top_p", top_p_bad), ("typical_p", typical_bad), ("top_n_sigma", sigma_bad)):
                check(f"checked CUDA path: {name} == reference, V={vocab}", bad == 0, f"({bad} differing entries)")
    finally:
        sync.EAGER_CUDA = saved


def check_sync_free_and_graphs() -> None:
    """No host synchronisation inside a step on CUDA (torch's sync debug mode raises on one),
    the same tokens as the CPU pipeline, and a CUDA-graph replay equal to the eager step."""
    from samplerkit.context import StepContext

    g = torch.Generator().manual_seed(5)
    batch, vocab = 64, 128256
    for steps in FAST_PATH_CHAINS:
        name = "+".join(next(iter(d)) for d in steps)
        config = {"backend": "bigram", "pipeline": steps, "sampler": "categorical"}
        x = torch.randn(batch, vocab, generator=g) * torch.linspace(0.3, 4, batch).unsqueeze(-1)
        bound = samplerkit.load_pipeline(config, device=DEVICE).bind(batch, seeds=list(range(batch)))
        ctx = StepContext(batch, vocab, device=DEVICE)
        xd = x.to(DEVICE)
        for _ in range(2):                                   # warm-up: workspaces, Triton compilation
            bound.sample_async(xd, ctx)
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            ids, valid = bound.sample_async(xd, ctx)
            synced = ""
        except RuntimeError as exc:
            synced = str(exc).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        check(f"no host sync in a CUDA step: {name}", not synced, f"({synced})" if synced else "")
        if synced:
            ids, valid = bound.sample_async(xd, ctx)
        cpu_ids = samplerkit.load_pipeline(config).bind(batch, seeds=list(range(batch))).sample(x)
        same = int((ids.cpu() == cpu_ids).sum())
        check(f"sync-free CUDA tokens == CPU tokens: {name}", same == batch and bool(valid.all()), f"({same}/{batch})")
        try:
            captured = bound.capture(xd, ctx)
            bad = 0
            for step in range(4):
                xs = (torch.randn(batch, vocab, generator=g) * (1 + step)).to(DEVICE)
                if step % 2:                                 # written into the graph's input: no copy
                    captured.logits.copy_(xs)
                    got, _ = captured(captured.logits)
                else:
                    got, _ = captured(xs)
                got = got.clone()
                want, _ = bound.sample_async(xs, ctx)
                bad += int((got != want).sum())
                ctx.num_generated += 1                       # the graph reads the counters in place
            check(f"CUDA graph replay == eager step: {name}", bad == 0, f"({bad} mismatches over 4 steps)")
        except Exception as exc:  # noqa: BLE001 - report and go on
            check(f"CUDA graph capture: {name}", False, f"({type(exc).__name__}: {str(exc).splitlines()[0]})")


def check_llama_backend_on_cuda() -> None:
    """The llama backend on CUDA vs transformers on CUDA, on a tiny random Llama."""
    import tempfile
    from pathlib import Path

    try:
        import transformers
    except ImportError:
        print("skip llama backend on CUDA: transformers is not installed", flush=True)
        return
    from samplerkit.builtins.backends.llama import LlamaBackend
    from samplerkit.testing.tiny_models import TINY_LLAMA, train_byte_level_bpe

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY_LLAMA, bos_token_id=0, eos_token_id=1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        train_byte_level_bpe().save(str(Path(tmp) / "tokenizer.json"))
        Path(tmp, "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}')
        backend = LlamaBackend(LlamaBackend.Params(model=tmp, device=DEVICE))
        cpu_backend = LlamaBackend(LlamaBackend.Params(model=tmp, device="cpu"))
    hf = hf.to(DEVICE)
    prompts = [[0, 5, 9, 33, 2], [0, 7], [0, 100, 101, 102, 103, 104, 105]]
    out = backend.prefill(prompts).last
    worst = 0.0
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            ref = hf(torch.tensor([prompt], device=DEVICE)).logits[0, -1].float()
            worst = max(worst, float((out[row] - ref).abs().max()))
    check("llama backend prefill on CUDA == transformers on CUDA", worst <= 1e-4, f"(max abs diff {worst:.2e})")
    config = {"backend": "bigram", "pipeline": [], "sampler": "greedy",
              "generation": {"max_new_tokens": 16, "ignore_eos": True}}
    texts = ["The quick brown fox", "Sphinx of"]
    on_gpu = samplerkit.Generator(config, backend=backend).generate(texts)
    on_cpu = samplerkit.Generator(config, backend=cpu_backend).generate(texts)
    same = [a.token_ids == b.token_ids for a, b in zip(on_gpu, on_cpu)]
    check("greedy generation: CUDA tokens == CPU tokens", all(same), f"({sum(same)}/{len(same)} rows equal)")


if __name__ == "__main__":
    sys.exit(main())
