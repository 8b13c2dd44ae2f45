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
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
