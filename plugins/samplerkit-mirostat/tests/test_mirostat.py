"""Tests of the mirostat plugin, run against the *installed* distribution (entry point)."""

from __future__ import annotations

import math

import pytest
import torch
from samplerkit_mirostat import MU_KEY, Mirostat, MirostatV2, mirostat_k

import samplerkit
from samplerkit import ConfigError, StepContext
from samplerkit.ops import row_keys
from samplerkit.ops.random import race_candidates
from samplerkit.testing import check_sampler

NEG_INF = float("-inf")


def sampler(cls, **params):
    return cls([cls.Params(**params)])


# -- registration --------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Mirostat, MirostatV2])
def test_registered_with_its_distribution(cls):
    entry = samplerkit.default_registry().entry("sampler", cls.name)
    assert entry.cls is cls
    assert entry.plugin.name == "mirostat"
    assert entry.plugin.distribution == "samplerkit-mirostat"
    assert entry.plugin.describe() == "mirostat (samplerkit-mirostat 0.1.0)"


def test_blocked_by_name():
    with pytest.raises(ConfigError, match="unknown sampler 'mirostat_v2'"):
        samplerkit.load_pipeline({"sampler": "mirostat_v2", "plugins": {"block": ["mirostat"]}})


@pytest.mark.parametrize("cls", [Mirostat, MirostatV2])
def test_contract(cls):
    check_sampler(cls)


def test_register_samplers_hook_lists_both():
    import samplerkit_mirostat

    assert samplerkit_mirostat.register_samplers() == [Mirostat, MirostatV2]


# -- golden semantics (llama.cpp) ----------------------------------------------------------

def test_v2_truncates_at_surprise_mu_and_updates_mu():
    # tau = 1: mu starts at 2, so tokens with -log2 p <= 2 (p >= 1/4) are kept: .5 and .3.
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for seed in range(40):
        ctx = StepContext(1)
        token = int(sampler(MirostatV2, tau=1.0, eta=0.1, seed=seed).sample(x, ctx))
        seen.add(token)
        p = {0: 0.5 / 0.8, 1: 0.3 / 0.8}[token]                   # renormalised over the kept two
        expected = 2.0 - 0.1 * (-math.log2(p) - 1.0)
        assert ctx.state[MU_KEY].item() == pytest.approx(expected, rel=1e-6)
    assert seen == {0, 1}


def test_v2_keeps_the_top_token_when_mu_is_below_every_surprise():
    ctx = StepContext(1)
    ctx.state[MU_KEY] = torch.tensor([0.1])                         # only p >= 0.933 would pass
    x = torch.log(torch.tensor([[0.25, 0.4, 0.35]]))
    assert int(sampler(MirostatV2, seed=3).sample(x, ctx)) == 1
    assert ctx.state[MU_KEY].item() == pytest.approx(0.1 - 0.1 * (0.0 - 5.0))


def test_v1_k_matches_the_formula_on_a_zipf_distribution():
    # p_i ∝ (i+1)^-s makes every b_i = s t_i, so s_hat = s exactly.
    vocab, s = 500, 1.3
    x = -s * torch.log(torch.arange(1, vocab + 1, dtype=torch.float64)).float().unsqueeze(0)
    for mu in (2.0, 5.0, 8.0):
        e = s - 1
        k = (e * 2 ** mu / (1 - vocab ** -e)) ** (1 / s)
        assert int(mirostat_k(x, torch.tensor([mu]), torch.tensor([100]), 100)) == max(int(k), 1)


def test_v1_k_edge_cases():
    m = torch.tensor([100, 100, 100])
    x = torch.tensor([[5.0, NEG_INF, NEG_INF, NEG_INF],     # one finite token: k = 1
                      [0.0, 0.0, 0.0, 0.0],                 # flat: s_hat = 0 -> k = V (2^10 / 3 > 1)
                      [9.0, 0.0, NEG_INF, 0.0]])
    k = mirostat_k(x, torch.tensor([10.0, 10.0, 10.0]), m, 100)
    assert k[0] == 1 and k[1] == 4 and 1 <= k[2] <= 3


def test_v1_samples_from_the_top_k_and_updates_mu():
    vocab, s = 200, 1.1
    x = -s * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32)).unsqueeze(0)
    tau = 2.0
    k = int(mirostat_k(x, torch.tensor([2 * tau]), torch.tensor([100]), 100))
    assert 1 < k < vocab
    kept_logp = x[0, :k] - torch.logsumexp(x[0, :k], dim=0)
    for seed in range(20):
        ctx = StepContext(1)
        token = int(sampler(Mirostat, tau=tau, eta=0.5, seed=seed).sample(x, ctx))
        assert token < k
        surprise = -float(kept_logp[token]) / math.log(2)
        assert ctx.state[MU_KEY].item() == pytest.approx(2 * tau - 0.5 * (surprise - tau), rel=1e-5)


def test_draws_are_the_exponential_race_over_the_kept_tokens():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for seed in range(10):
        got = sampler(MirostatV2, tau=1.0, seed=seed).sample(x, StepContext(1))
        kept = x.masked_fill(torch.tensor([[False, False, True, True]]), NEG_INF)
        want = race_candidates(kept, torch.arange(4).unsqueeze(0), row_keys(torch.tensor([seed]), torch.tensor([0])))
        assert torch.equal(got, want)


def test_observed_surprise_tracks_tau():
    # Feeding back its own choices, the average observed surprise settles near tau (a flat
    # enough distribution, ~7.5 bits of entropy, so tau = 4 bits is reachable).
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(0))
    for cls in (Mirostat, MirostatV2):
        step = sampler(cls, tau=4.0, eta=0.1, seed=7)
        ctx = StepContext(1, 256)
        surprises = []
        for _ in range(400):
            mu = step.mu(ctx).clone()
            ctx.append(step.sample(x, ctx))
            surprises.append((mu - ctx.state[MU_KEY]).item() / 0.1 + 4.0)    # mu' = mu - eta (s - tau)
        mean = sum(surprises[100:]) / 300
        assert abs(mean - 4.0) < 0.5, (cls.name, mean)


# -- state follows rows --------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Mirostat, MirostatV2])
def test_state_follows_rows_through_select_rows(cls):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, generator=g) * 2
    params = [cls.Params(tau=t, eta=0.3, seed=s) for t, s in ((1.0, 10), (3.0, 11), (6.0, 12))]

    def alone(i, steps):
        step, ctx = cls([params[i]]), StepContext(1, 64)
        out = []
        for _ in range(steps):
            ids = step.sample(x[i:i + 1], ctx)
            ctx.append(ids)
            out.append(int(ids))
        return out, ctx.state[MU_KEY].clone()

    pipe = samplerkit.Pipeline([], sampler=cls.spec(tau=1.0, eta=0.3))
    bound = pipe.bind([{cls.name: {"tau": p.tau, "seed": p.seed}} for p in params])
    ctx = StepContext(3, 64)
    history = [[], [], []]
    rows = [0, 1, 2]
    for step in range(6):
        if step == 3:                                   # row 1 finishes; rows 2 and 0 swap places
            keep = [2, 0]
            bound = bound.select_rows(keep)
            ctx.select_rows(keep)
            rows = [rows[k] for k in keep]
        ids = bound.sample(x[rows], ctx)
        ctx.append(ids)
        for slot, r in enumerate(rows):
            history[r].append(int(ids[slot]))
    for slot, r in enumerate(rows):
        tokens, mu = alone(r, 6)
        assert history[r] == tokens
        assert ctx.state[MU_KEY][slot].item() == pytest.approx(mu.item())
    assert history[1] == alone(1, 3)[0]


def test_initialised_per_row_to_twice_tau():
    step = MirostatV2([MirostatV2.Params(tau=1.0, eta=0.0, seed=1), MirostatV2.Params(tau=4.0, eta=0.0, seed=1)])
    ctx = StepContext(2)
    step.sample(torch.zeros(2, 8), ctx)
    assert ctx.state[MU_KEY].tolist() == [2.0, 8.0]                 # eta 0: mu stays


# -- reproducibility and the decode loop ----------------------------------------------------

@pytest.mark.parametrize("cls", [Mirostat, MirostatV2])
def test_seeded_reproducibility(cls):
    x = torch.randn(1, 300, generator=torch.Generator().manual_seed(2)) * 2

    def run(seed):
        step, ctx, out = cls([cls.Params(tau=4.0, seed=seed)]), StepContext(1, 300), []
        for _ in range(12):
            ids = step.sample(x, ctx)
            ctx.append(ids)
            out.append(int(ids))
        return out

    assert run(5) == run(5)
    assert run(5) != run(6)


YAML = """\
backend: bigram
pipeline:
  - temperature: 0.9
sampler: {name: %s, tau: 3.0, eta: 0.1, seed: 42}
generation: {max_new_tokens: 24, n: 3}
"""


@pytest.mark.parametrize("name", ["mirostat", "mirostat_v2"])
def test_generate_from_yaml_on_the_bigram_backend(tmp_path, name):
    path = tmp_path / "run.yaml"
    path.write_text(YAML % name, encoding="utf-8")
    first = samplerkit.generate(["The", "A bird"], str(path))
    again = samplerkit.generate(["The", "A bird"], str(path))
    assert len(first) == 6
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert all(c.token_ids for c in first)
    assert len({tuple(c.token_ids) for c in first}) > 1


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="sampler mirostat.m: must be >= 2"):
        samplerkit.load_pipeline({"sampler": {"name": "mirostat", "m": 1}})
    with pytest.raises(ConfigError, match="unknown parameter 'm'"):
        samplerkit.load_pipeline({"sampler": {"name": "mirostat_v2", "m": 100}})
