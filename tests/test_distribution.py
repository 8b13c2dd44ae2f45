"""Empirical frequencies of `categorical` after each built-in processor match the
analytically filtered distribution (chi-square, alpha 1e-6), and nothing outside the kept
set is ever drawn."""

from __future__ import annotations

import math

import pytest
import torch

import samplerkit
from samplerkit.ops import race_sample, row_keys

N = 50_000
ALPHA = 1e-6
LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.7, 0.4, 0.1, -0.2, -0.5, -0.9, -1.3, -2.0], dtype=torch.float64)
V = LOGITS.numel()


def chi2_sf(stat: float, df: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:
        return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                             torch.tensor(stat / 2, dtype=torch.float64)))
    return float(chi2.sf(stat, df))


def test_chi2_sf_fallback_is_right():
    # Known quantiles: P(chi2_1 > 3.841) = 0.05, P(chi2_10 > 23.209) = 0.01.
    assert chi2_sf(3.8415, 1) == pytest.approx(0.05, abs=1e-4)
    assert chi2_sf(23.2093, 10) == pytest.approx(0.01, abs=1e-4)
    sf = float(torch.special.gammaincc(torch.tensor(5.0, dtype=torch.float64), torch.tensor(23.2093 / 2, dtype=torch.float64)))
    assert sf == pytest.approx(0.01, abs=1e-4)


# Analytic filters, in float64, straight from the definitions.
def softmax(x):
    return torch.softmax(x, -1)


def temperature(x, t):
    return x / t


def top_k(x, k):
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[x.argsort(descending=True, stable=True)[:k]] = True
    return x.masked_fill(~keep, -math.inf)


def top_p(x, p):
    probs = softmax(x)
    order = probs.argsort(descending=True, stable=True)
    before = probs[order].cumsum(0) - probs[order]
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[order[before < p]] = True
    return x.masked_fill(~keep, -math.inf)


def min_p(x, m):
    probs = softmax(x)
    return x.masked_fill(probs < m * probs.max(), -math.inf)


CASES = {
    "plain": ([], lambda x: x),
    "temperature_0.7": ([{"temperature": 0.7}], lambda x: temperature(x, 0.7)),
    "temperature_1.6": ([{"temperature": 1.6}], lambda x: temperature(x, 1.6)),
    "top_k_4": ([{"top_k": 4}], lambda x: top_k(x, 4)),
    "top_p_0.6": ([{"top_p": 0.6}], lambda x: top_p(x, 0.6)),
    "min_p_0.2": ([{"min_p": 0.2}], lambda x: min_p(x, 0.2)),
    "chain": ([{"temperature": 0.8}, {"top_k": 9}, {"top_p": 0.9}, {"min_p": 0.05}],
              lambda x: min_p(top_p(top_k(temperature(x, 0.8), 9), 0.9), 0.05)),
    "chain_llama_cpp_order": ([{"top_k": 10}, {"top_p": 0.8}, {"min_p": 0.1}, {"temperature": 1.5}],
                              lambda x: temperature(min_p(top_p(top_k(x, 10), 0.8), 0.1), 1.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_categorical_frequencies_match_the_filtered_distribution(case):
    steps, reference = CASES[case]
    expected = softmax(reference(LOGITS.clone()))
    kept = expected > 0
    if steps:       # every case except "plain" must actually filter or reshape
        assert not torch.allclose(expected, softmax(LOGITS))
    pipe = samplerkit.load_pipeline({"pipeline": steps, "sampler": "categorical"})
    logits = LOGITS.to(torch.float32).expand(N, V)
    ids = pipe.sample(logits, seeds=list(range(N)))
    counts = torch.bincount(ids, minlength=V).to(torch.float64)
    outside = counts[~kept]
    assert outside.sum() == 0, f"drew removed tokens: {(~kept).nonzero().squeeze(-1).tolist()} counts {outside.tolist()}"
    exp_counts = expected[kept] * N
    stat = float(((counts[kept] - exp_counts) ** 2 / exp_counts).sum())
    df = int(kept.sum()) - 1
    if df == 0:
        assert counts[kept].item() == N
        return
    p_value = chi2_sf(stat, df)
    assert p_value > ALPHA, f"{case}: chi2={stat:.1f} df={df} p={p_value:.2e}; counts {counts.tolist()} expected {(expected * N).tolist()}"


def test_the_chi_square_check_detects_a_wrong_distribution():
    """The same statistic rejects frequencies from a slightly different temperature."""
    pipe = samplerkit.load_pipeline({"pipeline": [{"temperature": 0.9}], "sampler": "categorical"})
    ids = pipe.sample(LOGITS.to(torch.float32).expand(N, V), seeds=list(range(N)))
    counts = torch.bincount(ids, minlength=V).to(torch.float64)
    wrong = softmax(LOGITS) * N                           # temperature 1.0 instead of 0.9
    stat = float(((counts - wrong) ** 2 / wrong).sum())
    assert chi2_sf(stat, V - 1) < ALPHA


def test_seeded_draws_are_reproducible_and_independent_of_batch_size():
    pipe = samplerkit.load_pipeline({"pipeline": [{"top_p": 0.9}], "sampler": "categorical"})
    logits = LOGITS.to(torch.float32).expand(1000, V)
    a = pipe.sample(logits, seeds=list(range(1000)))
    b = pipe.sample(logits[:10], seeds=list(range(10)))
    assert torch.equal(a[:10], b)
    assert torch.equal(a, pipe.sample(logits, seeds=list(range(1000))))
    assert len(set(a.tolist())) > 1


@pytest.mark.parametrize("vocab, limit", [(1000, 5), (4096, 64), (300, 1), (64, 15)])
def test_race_sample_candidate_fast_path_matches_the_full_path(vocab, limit):
    g = torch.Generator().manual_seed(vocab + limit)
    rows = 512
    logits = torch.randn(rows, vocab, generator=g) * 2
    # Truncate each row to a random number (1..limit) of random survivors.
    keep_n = torch.randint(1, limit + 1, (rows,), generator=g)
    order = torch.rand(rows, vocab, generator=g).argsort(-1)
    ranks = order.argsort(-1)
    logits = logits.masked_fill(ranks >= keep_n.unsqueeze(-1), float("-inf"))
    keys = row_keys(torch.arange(rows) * 7919 + 3, torch.randint(0, 100, (rows,), generator=g))
    full = race_sample(logits, keys)
    assert limit < vocab // 4                             # the fast path really runs
    fast = race_sample(logits, keys, candidate_limit=limit)
    assert torch.equal(fast, full)
    assert bool(torch.isfinite(logits.gather(1, full.unsqueeze(1))).all())


def test_race_sample_fast_path_when_only_some_rows_are_truncated():
    # The limit comes from the batch's widest row; narrower rows pad with -inf candidates.
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 2048, generator=g)
    logits[:, 40:] = float("-inf")
    logits[::2, 3:] = float("-inf")
    keys = row_keys(torch.arange(64), torch.zeros(64, dtype=torch.int64))
    assert torch.equal(race_sample(logits, keys, candidate_limit=40), race_sample(logits, keys))


def test_categorical_uses_the_fast_path_without_changing_draws():
    """Through the pipeline: top_k truncation (fast path) vs the same survivors given as
    already-masked logits to a pipeline without processors (full path) draw the same ids."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(256, 2000, generator=g)
    truncated = samplerkit.load_pipeline({"pipeline": [{"top_k": 20}], "sampler": "categorical"})
    seeds = list(range(1000, 1256))
    ids = truncated.sample(logits, seeds=seeds)
    masked = truncated.process(logits)
    # Add one finite token far below the rest so the batch is not "truncated" for the sampler:
    # full path, and that token essentially never wins.
    wide = masked.clone()
    wide[:, 1000:1999] = torch.where(torch.isfinite(wide[:, 1000:1999]), wide[:, 1000:1999], torch.tensor(-1e30))
    plain = samplerkit.load_pipeline({"pipeline": [], "sampler": "categorical"})
    assert torch.equal(plain.sample(wide, seeds=seeds), ids)
