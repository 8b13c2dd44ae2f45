"""Empirical frequencies of `categorical` after each built-in processor match the
analytically filtered distribution (chi-square, alpha 1e-6), and nothing outside the kept
set is ever drawn."""

from __future__ import annotations

import math

import pytest
import torch

import samplerkit
from samplerkit.context import StepContext
from samplerkit.ops import race_sample, row_keys
from samplerkit.ops.random import (
    _BLOCK_STREAM,
    RACE_BLOCK,
    _race_kept_blocks,
    _race_kept_blocks_lazily,
    _stream_keys,
    race_sample_candidates,
)
from samplerkit.ops.truncation import exp_weights, safe_top
from samplerkit.registry import default_registry

N = 50_000
ALPHA = 1e-6
LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.7, 0.4, 0.1, -0.2, -0.5, -0.9, -1.3, -2.0], dtype=torch.float64)
V = LOGITS.numel()

REGISTRY = default_registry()        # one snapshot for the module (building one scans entry points)


def load_pipeline(config):
    return samplerkit.load_pipeline(config, registry=REGISTRY)


ROWS = 5_000          # N draws = ROWS seeded rows x N // ROWS steps of their streams


def draw(pipe, row: torch.Tensor, n: int = N, seed0: int = 0) -> torch.Tensor:
    """``n`` independent draws for one logit row: distinct seeds, several stream steps each
    (a (seed, step) pair keys an independent stream, so this is ``n`` i.i.d. draws)."""
    logits = row.to(torch.float32).expand(ROWS, -1)
    bound = pipe.bind(ROWS, seeds=list(range(seed0, seed0 + ROWS)))
    out = []
    for t in range(n // ROWS):
        ctx = StepContext(ROWS, logits.shape[-1])
        ctx.num_generated.fill_(t)
        out.append(bound.sample(logits, ctx))
    return torch.cat(out)


def chi2_sf(stat: float, df: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:
        return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                             torch.tensor(stat / 2, dtype=torch.float64)))
    return float(chi2.sf(stat, df))


def assert_frequencies_match(ids: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    """``N`` draws ``ids`` never land outside ``expected``'s support and pass the chi-square test
    against it (every expected count above 5, as the test needs)."""
    kept = expected > 0
    counts = torch.bincount(ids, minlength=expected.numel()).to(torch.float64)
    assert counts[~kept].sum() == 0
    exp_counts = expected[kept] * N
    assert float(exp_counts.min()) > 5
    stat = float(((counts[kept] - exp_counts) ** 2 / exp_counts).sum())
    p_value = chi2_sf(stat, int(kept.sum()) - 1)
    assert p_value > ALPHA, f"{label}: chi2={stat:.1f} p={p_value:.2e}"


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
    pipe = load_pipeline({"pipeline": steps, "sampler": "categorical"})
    ids = draw(pipe, LOGITS)
    assert ids.numel() == N
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
    pipe = load_pipeline({"pipeline": [{"temperature": 0.9}], "sampler": "categorical"})
    ids = draw(pipe, LOGITS)
    counts = torch.bincount(ids, minlength=V).to(torch.float64)
    wrong = softmax(LOGITS) * N                           # temperature 1.0 instead of 0.9
    stat = float(((counts - wrong) ** 2 / wrong).sum())
    assert chi2_sf(stat, V - 1) < ALPHA


def test_seeded_draws_are_reproducible_and_independent_of_batch_size():
    pipe = load_pipeline({"pipeline": [{"top_p": 0.9}], "sampler": "categorical"})
    logits = LOGITS.to(torch.float32).expand(1000, V)
    a = pipe.sample(logits, seeds=list(range(1000)))
    b = pipe.sample(logits[:10], seeds=list(range(10)))
    assert torch.equal(a[:10], b)
    assert torch.equal(a, pipe.sample(logits, seeds=list(range(1000))))
    assert len(set(a.tolist())) > 1


def _truncated(rows, vocab, limit, seed):
    """Random logits with 1..limit random survivors per row, and their sorted candidate list."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 2
    keep_n = torch.randint(1, limit + 1, (rows,), generator=g)
    ranks = torch.rand(rows, vocab, generator=g).argsort(-1).argsort(-1)
    logits = logits.masked_fill(ranks >= keep_n.unsqueeze(-1), float("-inf"))
    values, ids = logits.topk(limit, dim=-1)
    keys = row_keys(torch.arange(rows) * 7919 + 3, torch.randint(0, 100, (rows,), generator=g))
    return logits, values, ids, keys


@pytest.mark.parametrize("vocab, limit", [(1000, 5), (4096, 64), (300, 1), (2000, 200), (64, 15)])
def test_race_sample_candidate_fast_path_matches_the_full_path(vocab, limit):
    logits, values, ids, keys = _truncated(512, vocab, limit, vocab + limit)
    full = race_sample(logits, keys)
    fast = race_sample_candidates(values, ids, keys, vocab)
    assert torch.equal(fast, full)
    assert bool(torch.isfinite(logits.gather(1, full.unsqueeze(1))).all())


def test_race_sample_candidates_with_a_long_list_spanning_blocks():
    """K > 64 candidates spread over many blocks of the two-stage race (block masses by a
    scatter, not the pairwise sum): the list and the dense row draw the same token, and the
    draws land in many blocks and far down the list."""
    rows, vocab, k = 2000, 3000, 500
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(rows, vocab, generator=g) * 0.1
    values, ids = logits.topk(k, dim=-1)
    dense = torch.full_like(logits, float("-inf")).scatter_(-1, ids, values)
    keys = row_keys(torch.arange(rows), torch.zeros(rows, dtype=torch.int64))
    full = race_sample(dense, keys)
    fast = race_sample_candidates(values, ids, keys, vocab)
    assert torch.equal(fast, full)
    rank = (ids == full.unsqueeze(-1)).int().argmax(-1)
    assert int((rank >= 64).sum()) > rows // 2          # most of the mass is outside the top 64
    assert len(set((full // RACE_BLOCK).tolist())) == (vocab + RACE_BLOCK - 1) // RACE_BLOCK


def test_race_sample_with_a_threshold_equals_sampling_the_truncated_row():
    """The lazy truncation (the sampler applies ``x >= threshold`` itself, reusing the
    truncation's weights) draws the token that sampling the truncated logits draws."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(512, 5000, generator=g) * torch.linspace(0.1, 6, 512).unsqueeze(-1)
    threshold = logits.amax(-1, keepdim=True) - torch.rand(512, 1, generator=g) * 8
    keys = row_keys(torch.arange(512) + 11, torch.full((512,), 3))
    truncated = logits.masked_fill(logits < threshold, float("-inf"))
    want = race_sample(truncated, keys)
    top = safe_top(logits)
    assert torch.equal(race_sample(logits, keys, threshold=threshold), want)
    assert torch.equal(race_sample(logits, keys, threshold=threshold, weights=exp_weights(logits, top),
                                   workspace=torch.empty_like(logits), mask_workspace=torch.empty_like(logits)), want)
    assert bool((truncated.gather(1, want.unsqueeze(1)) > float("-inf")).all())


@pytest.mark.parametrize("vocab", [5000, 4096 + 17, 1 << 15])
def test_lazy_block_race_picks_the_block_of_the_full_computation(vocab):
    """Stage 1 of the race over a threshold's kept tokens, certified from 16 blocks' kept
    masses: every row it decides gets the block the full masking pass picks, and the rows it
    cannot decide are reported (both kinds occur here: shallow and deep cuts, flat and spread
    rows, mostly -inf rows, all-equal rows, a short last block)."""
    g = torch.Generator().manual_seed(vocab)
    rows = 768
    logits = torch.randn(rows, vocab, generator=g) * torch.linspace(0.05, 6, rows).unsqueeze(-1)
    logits[::7] = 0.0                                                   # all equal
    logits[3::7] = logits[3::7].masked_fill(torch.rand(len(logits[3::7]), vocab, generator=g) < 0.97,
                                            float("-inf"))              # mostly -inf
    top = safe_top(logits)
    weights = exp_weights(logits, top)
    depth = torch.rand(rows, 1, generator=g) * torch.tensor([0.0, 0.5, 4.0, 12.0]).repeat(rows // 4).unsqueeze(-1)
    threshold = logits.amax(-1, keepdim=True) - depth
    keys = _stream_keys(row_keys(torch.arange(rows) * 31 + 5, torch.full((rows,), 2)), _BLOCK_STREAM)
    full = _race_kept_blocks(logits, weights, threshold, keys)
    lazy, undecided = _race_kept_blocks_lazily(logits, weights, threshold, keys)
    assert lazy is not None and undecided is not None
    decided = ~undecided
    assert int(decided.sum()) > rows // 2 and int(undecided.sum()) > 0
    assert torch.equal(lazy[decided], full[decided])


@pytest.mark.parametrize("steps, scale", [([{"top_p": 0.9}], 0.3), ([{"min_p": 0.3}], 1.0)])
def test_categorical_frequencies_through_a_lazy_threshold_on_many_blocks(steps, scale):
    """A truncation last hands its threshold to the sampler; over 20 blocks of the two-stage
    race the lazy block stage runs (top_p on flat rows: nearly every row decided; min_p: many
    rows left to the full pass). The frequencies match the truncated distribution."""
    row = torch.randn(5000, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * scale
    key, value = next(iter(steps[0].items()))
    expected = softmax(top_p(row.clone(), value) if key == "top_p" else min_p(row.clone(), value))
    pipe = load_pipeline({"pipeline": steps, "sampler": "categorical"})
    assert_frequencies_match(draw(pipe, row, seed0=11), expected, str(steps))


@pytest.mark.parametrize("steps", [[{"min_p": 0.05}], [{"temperature": 0.7}, {"top_p": 0.9}], [{"top_p": 0.6}]])
def test_lazy_truncation_matches_processing_then_sampling(steps):
    """With a truncation last, sample() hands its threshold to the sampler: the same tokens as
    sampling process()'s output, on peaked and flat rows alike."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 3000, generator=g) * torch.linspace(0.05, 8, 64).unsqueeze(-1)
    seeds = list(range(64))
    pipe = load_pipeline({"pipeline": steps, "sampler": "categorical"})
    processed = pipe.bind(64).process(x)
    plain = load_pipeline({"pipeline": [], "sampler": "categorical"})
    assert torch.equal(pipe.sample(x, seeds=seeds), plain.sample(processed, seeds=seeds))


def test_categorical_pipeline_candidate_path_matches_dense_sampling():
    """top_k / top_p / min_p truncation hands the sampler a candidate list; sampling the
    densified processed logits with no processors must draw the very same tokens."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(256, 2000, generator=g) * 3
    seeds = list(range(1000, 1256))
    plain = load_pipeline({"pipeline": [], "sampler": "categorical"})
    for steps in ([{"top_k": 20}], [{"top_k": 150}], [{"top_p": 0.5}], [{"min_p": 0.1}],
                  [{"top_k": 100}, {"temperature": 0.7}, {"top_p": 0.9}, {"min_p": 0.02}]):
        pipe = load_pipeline({"pipeline": steps, "sampler": "categorical"})
        ids = pipe.sample(logits, seeds=seeds)
        processed = pipe.bind(256).process(logits)
        assert torch.equal(plain.sample(processed, seeds=seeds), ids), steps
        assert bool(torch.isfinite(processed.gather(1, ids.unsqueeze(1))).all())


# Large vocabulary: the two-level race (top 64 by Gumbel-max, the tail by CDF inversion).
BIG_V = 1500
BIG_LOGITS = (torch.randn(BIG_V, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3)


@pytest.mark.parametrize("case", ["plain", "top_k_300", "top_p_0.15"])
def test_categorical_frequencies_on_a_large_vocabulary(case):
    steps, ref = {"plain": ([], lambda x: x),
                  "top_k_300": ([{"top_k": 300}], lambda x: top_k(x, 300)),
                  # within the 256 top_p candidates: the candidate list (K > 64) reaches the sampler
                  "top_p_0.15": ([{"top_p": 0.15}], lambda x: top_p(x, 0.15))}[case]
    expected = softmax(ref(BIG_LOGITS.clone()))
    pipe = load_pipeline({"pipeline": steps, "sampler": "categorical"})
    assert_frequencies_match(draw(pipe, BIG_LOGITS, seed0=7), expected, case)
