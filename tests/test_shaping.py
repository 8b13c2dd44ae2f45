"""Truncation and shaping processors (samplerkit.builtins.shaping): golden cases against the
reference engines' definitions, agreement with transformers' warpers on random batches, neutral
values, keep-at-least-one and XTC's seeded per-row coin."""

from __future__ import annotations

import math

import pytest
import torch

import samplerkit
from samplerkit import ConfigError, StepContext
from samplerkit.builtins.shaping import BUILTIN_SHAPING, DynamicTemperature, Smoothing, Temperature
from samplerkit.builtins.truncation import (
    BUILTIN_TRUNCATION,
    EpsilonCutoff,
    EtaCutoff,
    TailFree,
    TopA,
    TopNSigma,
    TypicalP,
    Xtc,
)
from samplerkit.builtins.truncation.xtc import XTC_STREAM
from samplerkit.ops import row_keys, uniform
from samplerkit.testing import examples_for

NEG_INF = float("-inf")
P4 = [[0.5, 0.3, 0.15, 0.05]]


def run(cls, params, logits, ctx=None):
    rows = params if isinstance(params, list) else [params] * logits.shape[0]
    step = cls([cls.Params(**p) for p in rows])
    return step.apply(logits.clone(), ctx or StepContext(logits.shape[0], logits.shape[-1]))


def kept(out):
    return torch.isfinite(out).nonzero()[:, -1].tolist() if out.shape[0] == 1 else torch.isfinite(out)


def logp(probs):
    return torch.log(torch.tensor(probs))


# -- registration, examples, neutral values ------------------------------------------------

def test_all_registered_in_their_family_plugin():
    registry = samplerkit.default_registry()
    for family, classes in (("truncation", BUILTIN_TRUNCATION), ("shaping", BUILTIN_SHAPING)):
        for cls in classes:
            entry = registry.entry("processor", cls.name)
            assert entry.cls is cls and entry.plugin.name == f"samplerkit.builtins.{family}"
    assert {c.name for c in BUILTIN_TRUNCATION} == {
        "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_a", "tfs", "top_n_sigma", "xtc"}
    assert {c.name for c in BUILTIN_SHAPING} == {"temperature", "dynamic_temperature", "smoothing"}


@pytest.mark.parametrize("cls", BUILTIN_SHAPING, ids=lambda c: c.name)
def test_contract_examples_are_non_neutral(cls):
    examples = examples_for(cls)
    assert examples and all(not cls.Params(**e).is_neutral() for e in examples)


NEUTRAL_BUT_NOT_DEFAULT = [
    (TypicalP, {"min_tokens_to_keep": 5}), (EpsilonCutoff, {"min_tokens_to_keep": 5}),
    (EtaCutoff, {"min_tokens_to_keep": 5}), (TailFree, {"min_keep": 3}),
    (Smoothing, {"smoothing_curve": 2.0}), (Xtc, {"threshold": 0.05, "seed": 3}),
    (DynamicTemperature, {"exponent": 2.0}),
]


@pytest.mark.parametrize("cls, params", [(c, {}) for c in BUILTIN_SHAPING] + NEUTRAL_BUT_NOT_DEFAULT,
                         ids=lambda v: v.name if isinstance(v, type) else str(v))
def test_neutral_rows_are_bitwise_unchanged(cls, params):
    assert cls.Params(**params).is_neutral()
    logits = torch.randn(4, 50) * 3
    logits[1, :20] = NEG_INF
    out = run(cls, params, logits)
    assert torch.equal(out, logits)
    # Skipped on the host side by the pipeline.
    greedy = samplerkit.default_registry().get("sampler", "greedy")
    assert samplerkit.Pipeline([cls.spec(**params)], sampler=greedy.spec()).bind(4).steps == []


@pytest.mark.parametrize("cls, params", [
    (TypicalP, {"typical_p": 1e-6}), (EpsilonCutoff, {"epsilon_cutoff": 0.999}), (EtaCutoff, {"eta_cutoff": 0.999}),
    (TopA, {"top_a": 1.0}), (TailFree, {"tfs": 0.0}), (TopNSigma, {"top_n_sigma": 1e-6}),
    (DynamicTemperature, {"low": 0.0, "high": 0.0}), (Smoothing, {"smoothing_factor": 100.0, "smoothing_curve": 10.0}),
    (Xtc, {"threshold": 1e-6, "probability": 1.0, "seed": 1}),
], ids=lambda v: v.name if isinstance(v, type) else str(v))
def test_extreme_settings_keep_at_least_one_token(cls, params):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 64, generator=g) * torch.tensor([0.01, 1, 3, 10, 100, 1e4]).unsqueeze(-1)
    logits[0, 1:] = logits[0, 0]                     # flat
    out = run(cls, params, logits)
    assert not out.isnan().any()
    assert torch.isfinite(out).any(-1).all()


# -- transformers agreement (typical, epsilon, eta) ------------------------------------------

transformers_lp = pytest.importorskip("transformers.generation.logits_process")


def _random_batches():
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        scale = torch.tensor([0.3, 1.0, 2.0, 4.0, 8.0, 1.5, 3.0, 6.0]).unsqueeze(-1)
        x = torch.randn(8, 1000, generator=g) * scale
        if seed % 2:
            x[:, torch.randperm(1000, generator=g)[:300]] = NEG_INF       # earlier truncation
        yield x


@pytest.mark.parametrize("mass, keep", [(0.2, 1), (0.5, 1), (0.9, 1), (0.95, 4), (0.05, 10)])
def test_typical_p_matches_transformers(mass, keep):
    warper = transformers_lp.TypicalLogitsWarper(mass=mass, min_tokens_to_keep=keep)
    for x in _random_batches():
        ours = run(TypicalP, {"typical_p": mass, "min_tokens_to_keep": keep}, x)
        ref = warper(None, x.clone())
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eps, keep", [(3e-4, 1), (1e-3, 1), (0.01, 3), (0.2, 1), (0.5, 5)])
def test_epsilon_cutoff_matches_transformers(eps, keep):
    warper = transformers_lp.EpsilonLogitsWarper(epsilon=eps, min_tokens_to_keep=keep)
    for x in _random_batches():
        ours = run(EpsilonCutoff, {"epsilon_cutoff": eps, "min_tokens_to_keep": keep}, x)
        ref = warper(None, x.clone())
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eps, keep", [(3e-4, 1), (2e-3, 1), (0.01, 3), (0.2, 1), (0.5, 5)])
def test_eta_cutoff_matches_transformers(eps, keep):
    warper = transformers_lp.EtaLogitsWarper(epsilon=eps, min_tokens_to_keep=keep)
    for x in _random_batches():
        ours = run(EtaCutoff, {"eta_cutoff": eps, "min_tokens_to_keep": keep}, x)
        ref = warper(None, x.clone())
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_per_row_parameters_match_one_warper_per_row():
    x = next(_random_batches())
    params = [{"typical_p": m} for m in (0.2, 1.0, 0.5, 0.9, 0.3, 1.0, 0.7, 0.95)]
    ours = run(TypicalP, params, x)
    for i, p in enumerate(params):
        if p["typical_p"] == 1.0:
            assert torch.equal(ours[i], x[i])
        else:
            ref = transformers_lp.TypicalLogitsWarper(mass=p["typical_p"])(None, x[i:i + 1].clone())
            assert torch.equal(torch.isfinite(ours[i:i + 1]), torch.isfinite(ref))


# -- golden cases (llama.cpp / text-generation-webui definitions, by hand) --------------------

def test_tfs_golden():
    # p = .5 .25 .15 .06 .04 -> |second differences| .15 .01 .07 -> shares .652 .043 .304
    x = logp([[0.5, 0.25, 0.15, 0.06, 0.04]])
    assert kept(run(TailFree, {"tfs": 0.95}, x)) == [0, 1]        # first i >= 1 with cum > .95: i = 2
    assert kept(run(TailFree, {"tfs": 0.5}, x)) == [0]            # i = 0 passes .5 but min_keep 1: i = 1
    assert kept(run(TailFree, {"tfs": 0.5, "min_keep": 2}, x)) == [0, 1]
    # llama.cpp only cuts at i < n - 2: min_keep >= n - 2 keeps every token.
    assert kept(run(TailFree, {"tfs": 0.5, "min_keep": 3}, x)) == [0, 1, 2, 3, 4]
    assert kept(run(TailFree, {"tfs": 0.99999}, x)) == [0, 1]     # cum reaches 1.0 at i = 2
    # Removed tokens do not count: the same four probabilities with a -inf in the middle.
    y = torch.cat([x[:, :2], torch.tensor([[NEG_INF]]), x[:, 2:]], dim=1)
    assert kept(run(TailFree, {"tfs": 0.95}, y)) == [0, 1]
    # Two or fewer finite tokens: unchanged (llama.cpp returns early).
    z = torch.tensor([[1.0, NEG_INF, 0.0, NEG_INF]])
    assert torch.equal(run(TailFree, {"tfs": 0.0}, z), z)


def test_tfs_uniform_when_curvature_vanishes():
    # A linear probability curve has zero second differences: llama.cpp uses uniform shares 1/(n-2).
    x = logp([[0.3, 0.25, 0.2, 0.15, 0.1]])                        # d = 0, 0, 0 -> shares 1/3 each
    assert kept(run(TailFree, {"tfs": 0.5}, x)) == [0]             # i = 1: 2/3 > .5
    assert kept(run(TailFree, {"tfs": 0.7}, x)) == [0, 1]          # i = 2: 1 > .7


def test_top_n_sigma_golden():
    x = torch.tensor([[4.0, 3.0, 1.0, 0.0, NEG_INF]])             # finite: mean 2, std sqrt(2.5)
    assert kept(run(TopNSigma, {"top_n_sigma": 1.0}, x)) == [0, 1]       # >= 4 - 1.581
    assert kept(run(TopNSigma, {"top_n_sigma": 2.0}, x)) == [0, 1, 2]    # >= 4 - 3.162
    assert kept(run(TopNSigma, {"top_n_sigma": 3.0}, x)) == [0, 1, 2, 3]
    assert kept(run(TopNSigma, {"top_n_sigma": 1e-3}, torch.tensor([[1.0, 2.0, 2.0]]))) == [1, 2]


def test_top_a_golden():
    x = logp(P4)
    assert kept(run(TopA, {"top_a": 0.5}, x)) == [0, 1, 2]        # floor .5 * .25 = .125
    assert kept(run(TopA, {"top_a": 1.0}, x)) == [0, 1]           # floor .25


def test_xtc_golden():
    x = logp(P4)
    on = {"probability": 1.0, "seed": 0}
    assert kept(run(Xtc, {"threshold": 0.1, **on}, x)) == [2, 3]  # .5 .3 .15 are top choices; .15 stays
    assert kept(run(Xtc, {"threshold": 0.2, **on}, x)) == [1, 2, 3]
    assert kept(run(Xtc, {"threshold": 0.4, **on}, x)) == [0, 1, 2, 3]    # one top choice: nothing removed
    assert kept(run(Xtc, {"threshold": 0.6, **on}, x)) == [0, 1, 2, 3]
    # The least probable top choice stays with its ties.
    y = logp([[0.4, 0.25, 0.25, 0.1]])
    assert kept(run(Xtc, {"threshold": 0.2, **on}, y)) == [1, 2, 3]
    assert kept(run(Xtc, {"threshold": 0.2, **on}, logp([[0.5, 0.5]]))) == [0, 1]


def test_xtc_coin_is_seeded_per_row_and_batch_independent():
    x = logp(P4).expand(64, -1).contiguous()
    params = [{"threshold": 0.1, "probability": 0.5, "seed": s} for s in range(64)]
    ctx = StepContext(64, 4)
    ctx.num_generated = torch.arange(64) % 5
    out = run(Xtc, params, x, ctx)
    fired = ~torch.isfinite(out[:, 0])
    coins = uniform(row_keys(torch.arange(64), ctx.num_generated), XTC_STREAM)
    assert torch.equal(fired, coins < 0.5)
    assert 10 < int(fired.sum()) < 54
    for i in (0, 17, 63):                                          # alone == in the batch
        alone_ctx = StepContext(1, 4)
        alone_ctx.num_generated = ctx.num_generated[i:i + 1].clone()
        assert torch.equal(run(Xtc, [params[i]], x[i:i + 1], alone_ctx), out[i:i + 1])


def test_xtc_fires_with_the_given_probability():
    n = 4000
    x = logp(P4).expand(n, -1).contiguous()
    out = run(Xtc, {"threshold": 0.1, "probability": 0.3, "seed": 11}, x[:1].expand(n, -1).contiguous(),
              _ctx_with_counters(n))
    rate = float((~torch.isfinite(out[:, 0])).float().mean())
    assert abs(rate - 0.3) < 0.03


def _ctx_with_counters(n):
    ctx = StepContext(n, 4)
    ctx.num_generated = torch.arange(n)
    return ctx


def test_dynamic_temperature_golden():
    # p = .5 .25 .25: H = 1.5 ln 2, n = 3, H / ln 3 = 0.94639
    x = logp([[0.5, 0.25, 0.25]])
    ratio = 1.5 * math.log(2) / math.log(3)
    for low, high, exponent in [(0.5, 1.5, 1.0), (0.5, 1.5, 2.0), (0.0, 2.0, 0.5), (0.8, 0.8, 1.0)]:
        t = low + (high - low) * ratio ** exponent
        out = run(DynamicTemperature, {"low": low, "high": high, "exponent": exponent}, x)
        torch.testing.assert_close(out, x / t, rtol=1e-6, atol=1e-6)
    # -inf tokens are not candidates: n counts the finite ones only.
    y = torch.cat([x, torch.tensor([[NEG_INF]])], dim=1)
    out = run(DynamicTemperature, {"low": 0.5, "high": 1.5}, y)
    torch.testing.assert_close(out[:, :3], x / (0.5 + ratio), rtol=1e-6, atol=1e-6)
    # Flat rows get `high`, one-hot rows `low`; zero temperature is greedy.
    torch.testing.assert_close(run(DynamicTemperature, {"low": 0.5, "high": 2.0}, torch.zeros(1, 5)), torch.zeros(1, 5))
    peaked = torch.tensor([[0.0, 200.0, 1.0, 0.0]])
    assert kept(run(DynamicTemperature, {"low": 0.0, "high": 1.0}, peaked)) == [1]


def test_dynamic_temperature_with_low_equal_high_is_temperature():
    x = torch.randn(3, 40)
    out = run(DynamicTemperature, {"low": 0.7, "high": 0.7}, x)
    ref = Temperature([Temperature.Params(temperature=0.7)] * 3).apply(x.clone(), StepContext(3))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


def test_dynamic_temperature_rejects_high_below_low():
    with pytest.raises(ConfigError, match="high .* must be >= low"):
        samplerkit.load_pipeline({"pipeline": [{"dynamic_temperature": {"low": 1.5, "high": 0.5}}], "sampler": "greedy"})


def test_smoothing_golden():
    x = torch.tensor([[2.0, 1.0, 0.0, NEG_INF]])
    out = run(Smoothing, {"smoothing_factor": 0.5}, x)              # k = 1, s = 0
    assert out.tolist() == [[2.0, 1.5, 0.0, NEG_INF]]
    out = run(Smoothing, {"smoothing_factor": 0.5, "smoothing_curve": 2.0}, x)   # k = s = .5
    assert out.tolist() == [[2.0, 1.5, -1.0, NEG_INF]]


def test_epsilon_and_eta_golden():
    x = logp([[0.6, 0.3, 0.08, 0.02]])
    assert kept(run(EpsilonCutoff, {"epsilon_cutoff": 0.05}, x)) == [0, 1, 2]
    assert kept(run(EpsilonCutoff, {"epsilon_cutoff": 0.9}, x)) == [0]
    assert kept(run(EpsilonCutoff, {"epsilon_cutoff": 0.9, "min_tokens_to_keep": 2}, x)) == [0, 1]
    # eta = min(.05, sqrt(.05) exp(-H)), H = 0.9752 -> 0.0845 * ... = min(.05, .0843) = .05
    h = -sum(p * math.log(p) for p in (0.6, 0.3, 0.08, 0.02))
    eta = min(0.05, math.sqrt(0.05) * math.exp(-h))
    assert kept(run(EtaCutoff, {"eta_cutoff": 0.05}, x)) == [i for i, p in enumerate((0.6, 0.3, 0.08, 0.02)) if p >= eta]
    assert kept(run(EtaCutoff, {"eta_cutoff": 0.5}, x)) == [0, 1]    # eta = sqrt(.5) exp(-H) = .2674


# -- from YAML through generate -------------------------------------------------------------

def test_every_shaping_step_runs_in_generate():
    config = {"backend": "bigram", "pipeline": [
        {"top_n_sigma": 2.0}, {"typical_p": {"typical_p": 0.95}}, {"epsilon_cutoff": {"epsilon_cutoff": 3e-4}},
        {"eta_cutoff": {"eta_cutoff": 1e-3}}, {"top_a": 0.1}, {"tfs": 0.95},
        {"xtc": {"threshold": 0.1, "probability": 0.5, "seed": 1}}, {"smoothing": {"smoothing_factor": 0.3}},
        {"dynamic_temperature": {"low": 0.5, "high": 1.2}}],
        "sampler": {"name": "categorical", "seed": 5}, "generation": {"max_new_tokens": 20, "n": 2}}
    first = samplerkit.generate(["The"], config)
    again = samplerkit.generate(["The"], config)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert all(c.token_ids for c in first)


# -- typical_p without a sort ------------------------------------------------------------------

@pytest.mark.parametrize("chunk_elements", [None, 3000])
@pytest.mark.parametrize("seed", range(3))
def test_typical_histogram_path_equals_the_sorted_reference(seed, chunk_elements, monkeypatch):
    """Over vocabularies where typical_p takes the histogram, it keeps exactly the stable-sort
    reference's set, min_tokens_to_keep included, on random and adversarial rows (flat, exact
    ties, mostly -inf, huge and tiny magnitudes, and rows the reference must handle: NaN, +inf,
    all -inf), in one column chunk or many."""
    from samplerkit.ops import histogram
    from samplerkit.ops.shaping import typical_mask, typical_mask_reference

    if chunk_elements is not None:
        monkeypatch.setattr(histogram, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(seed)
    rows, vocab = 20, 5000
    scale = torch.tensor([0.3, 1.0, 2.0, 4.0, 8.0, 1e-3, 1e4, 0.5] + [1.5] * 12).unsqueeze(-1)
    x = torch.randn(rows, vocab, generator=g) * scale
    x[8] = 0.0                                                               # all equal
    x[9] = torch.randint(0, 40, (vocab,), generator=g).float() / 8          # many exact ties
    x[10, torch.rand(vocab, generator=g) < 0.98] = NEG_INF                  # mostly -inf
    x[11, :vocab // 2] = NEG_INF
    x[12, 7] = float("nan")
    x[13, 3] = float("inf")
    x[14] = NEG_INF
    x[15, :vocab - 3] = NEG_INF                                              # three tokens left
    mass = torch.rand(rows, generator=g) * 0.94 + 0.05
    mass[16] = 0.999999
    for min_keep, min_keep_max in ((torch.ones(rows, dtype=torch.int64), 1),
                                   (torch.randint(1, 9, (rows,), generator=g), 8)):
        want = typical_mask_reference(x, mass, min_keep, min_keep_max)
        got = typical_mask(x, mass, min_keep, min_keep_max)
        assert torch.equal(got, want), (got != want).any(-1).nonzero().flatten().tolist()
    # The histogram path was taken (one wide bin would be a sort in disguise).
    assert (want.sum(-1) > 1).sum() > rows // 2


def test_typical_p_processor_on_a_large_vocabulary_matches_transformers():
    """The processor over 5000 tokens (the histogram path) against transformers' warper, on rows
    whose float32 running mass is far from the cut (transformers sums in float32)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 5000, generator=g) * torch.tensor([0.3, 1.0, 2.0, 4.0, 8.0, 1.5, 3.0, 6.0]).unsqueeze(-1)
    for mass in (0.2, 0.9):
        ours = run(TypicalP, {"typical_p": mass}, x)
        ref = transformers_lp.TypicalLogitsWarper(mass=mass)(None, x.clone())
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


@pytest.mark.parametrize("min_keep", [1, 3])
def test_typical_p_processor_threshold_path_equals_its_mask(min_keep):
    """The processor writes score <= s as arithmetic (no bool mask) when it can: the same
    logits as removing what keep() drops, in place and into a buffer, with neutral rows in the
    batch (typical_p = 1) left unchanged; min_tokens_to_keep > 1 takes the mask."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5000, generator=g) * torch.tensor([0.3, 1.0, 2.0, 4.0, 8.0, 1.5, 3.0, 6.0]).unsqueeze(-1)
    x[3, :100] = NEG_INF
    params = [{"typical_p": m, "min_tokens_to_keep": min_keep} for m in (0.2, 1.0, 0.5, 0.9, 0.3, 1.0, 0.7, 0.95)]
    step = TypicalP([TypicalP.Params(**p) for p in params])
    ctx = StepContext(8, 5000)
    keep = step.keep(x, ctx) | ~step.active.unsqueeze(-1)
    want = x.masked_fill(~keep, NEG_INF)
    assert torch.equal(step.apply(x.clone(), ctx), want)
    out = torch.full_like(x, 7.0)
    assert torch.equal(step.apply_into(x, out, ctx), want) and torch.equal(out, want)
    assert torch.equal(want[1], x[1]) and torch.equal(want[5], x[5])
    assert bool((torch.isfinite(want).sum(-1)[[0, 2, 4]] < 5000).all())


def test_top_n_sigma_float32_threshold_is_the_float64_comparison():
    """The processor cuts at a float32 threshold; keeping x >= it is exactly keeping
    x >= max - n std in float64 (the definition, computed here the direct way), on rows with and
    without -inf, with +inf and NaN, constant rows and huge magnitudes."""
    from samplerkit.ops.shaping import float32_at_least, top_n_sigma_mask

    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 3000, generator=g) * torch.tensor([1.0, 3.0, 1e-3, 1e30, 0.5, 2.0, 1.0, 1.0, 1.0, 1.0]).unsqueeze(-1)
    x[4, ::2] = NEG_INF
    x[5] = 2.5
    x[6, 9] = float("inf")
    x[7, 1] = float("nan")
    x[8] = NEG_INF
    x[9] = x[9].round()                                   # many exact ties at the cut
    for n in (0.5, 1.0, 2.3):
        finite = torch.isfinite(x)
        x64 = torch.where(finite, x.double(), 0.0)
        count = finite.sum(-1, keepdim=True).clamp(min=1).double()
        mean = x64.sum(-1, keepdim=True) / count
        var = (torch.where(finite, x64 - mean, 0.0) ** 2).sum(-1, keepdim=True) / count
        want = x.double() >= x.amax(-1, keepdim=True).double() - n * var.sqrt()
        assert torch.equal(top_n_sigma_mask(x, torch.full((10,), n)), want)
        out = run(TopNSigma, {"top_n_sigma": n}, x)
        rows = [r for r in range(10) if r not in (6, 7)]   # +inf and NaN rows: invalid either way
        assert torch.equal(out[rows], x.masked_fill(~want, NEG_INF)[rows])
    t = torch.tensor([1.0, 1.0 + 1e-12, -1e-300, 3.5e38, -3.5e38, float("nan")], dtype=torch.float64)
    t32 = float32_at_least(t)
    assert bool((t32[:5].double() >= t[:5]).all()) and t32[5].isnan()
    below = torch.nextafter(t32[:5], torch.tensor(float("-inf")))
    assert bool((below.double() < t[:5]).all())
