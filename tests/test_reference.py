"""Agreement with reference implementations (transformers' warpers, the seed's sample_top_p,
the full-sort top_p mask) and golden tables on tiny hand-computed distributions."""

from __future__ import annotations

import math

import pytest
import torch

import samplerkit
from samplerkit.builtins.samplers import Greedy
from samplerkit.builtins.shaping import Temperature
from samplerkit.builtins.truncation import MinP, TopK, TopP
from samplerkit.context import StepContext
from samplerkit.ops import top_k_mask, top_p_mask, top_p_mask_reference
from samplerkit.registry import default_registry

INF = math.inf

REGISTRY = default_registry()        # one snapshot for the module (building one scans entry points)


def load_pipeline(config):
    return samplerkit.load_pipeline(config, registry=REGISTRY)


def run(cls, rows, logits):
    """Apply a processor with one Params per row."""
    return cls([cls.Params(**r) for r in rows]).apply(logits.clone(), StepContext(logits.shape[0], logits.shape[1]))


def random_logits(seed, batch=64, vocab=1000, scale=None):
    g = torch.Generator().manual_seed(seed)
    scales = scale if scale is not None else torch.linspace(0.3, 6.0, batch).unsqueeze(-1)
    return torch.randn(batch, vocab, generator=g) * scales


# -- transformers -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers.generation.logits_process",
                               reason="transformers is the reference implementation for these tests")


def assert_same(ours, theirs, ambiguous=None):
    kept_o, kept_t = torch.isfinite(ours), torch.isfinite(theirs)
    diff = kept_o != kept_t
    if ambiguous is not None:
        diff &= ~ambiguous
    assert not bool(diff.any()), f"kept sets differ at {diff.nonzero()[:10].tolist()}"
    both = kept_o & kept_t
    torch.testing.assert_close(ours[both], theirs[both], rtol=0, atol=1e-5)


@pytest.mark.parametrize("t", [0.3, 0.7, 1.0, 1.5, 4.0])
def test_temperature_matches_transformers(hf, t):
    x = random_logits(0)
    assert_same(run(Temperature, [{"temperature": t}] * 64, x), hf.TemperatureLogitsWarper(t)(None, x.clone()))


@pytest.mark.parametrize("k", [1, 2, 10, 50, 999, 1000])
def test_top_k_matches_transformers(hf, k):
    x = random_logits(1)
    assert_same(run(TopK, [{"top_k": k}] * 64, x), hf.TopKLogitsWarper(k)(None, x.clone()))


def _near_boundary(x, p, tol=1e-5):
    """Tokens whose float64 mass-before is within ``tol`` of p: float32 rounding may flip them."""
    probs = x.double().softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p
    near = ((before - p).abs() < tol)
    return torch.zeros_like(near).scatter(-1, order, near)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.95, 0.999])
def test_top_p_matches_transformers(hf, p):
    x = random_logits(2)
    ambiguous = _near_boundary(x, p)
    assert int(ambiguous.sum()) < 0.002 * ambiguous.numel()       # the exemption stays negligible
    assert_same(run(TopP, [{"top_p": p}] * 64, x), hf.TopPLogitsWarper(p)(None, x.clone()), ambiguous)


@pytest.mark.parametrize("m", [0.01, 0.05, 0.2, 0.5, 0.9])
def test_min_p_matches_transformers(hf, m):
    x = random_logits(3)
    ours = run(MinP, [{"min_p": m}] * 64, x)
    # Computed on probabilities (transformers) vs in logit space (here): float32 rounding may
    # disagree only for a token whose ratio to the top is within ~1e-6 of min_p.
    ratio = (x.double() - x.double().amax(-1, keepdim=True)).exp()
    ambiguous = (ratio - m).abs() < 1e-5
    assert_same(ours, hf.MinPLogitsWarper(m)(None, x.clone()), ambiguous)


def test_mixed_per_row_params_match_transformers_row_by_row(hf):
    x = random_logits(4, batch=12)
    rows = [{"top_p": p} for p in (0.1, 0.5, 0.9, 1.0, 0.3, 0.99, 0.2, 0.8, 0.6, 1.0, 0.05, 0.7)]
    ours = run(TopP, rows, x)
    for i, r in enumerate(rows):
        ref = x[i:i + 1].clone() if r["top_p"] == 1.0 else hf.TopPLogitsWarper(r["top_p"])(None, x[i:i + 1].clone())
        assert_same(ours[i:i + 1], ref, _near_boundary(x[i:i + 1], r["top_p"]))


def test_transformers_chain_matches_pipeline(hf):
    x = random_logits(5)
    chain = [hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(50), hf.TopPLogitsWarper(0.9), hf.MinPLogitsWarper(0.05)]
    ref = x.clone()
    for w in chain:
        ref = w(None, ref)
    pipe = load_pipeline({"pipeline": [{"temperature": 0.7}, {"top_k": 50}, {"top_p": 0.9}, {"min_p": 0.05}],
                                     "sampler": "greedy"})
    assert_same(pipe.process(x), ref)


# -- the seed's sample_top_p (meta-llama/llama generation.py) -----------------------------------

def sample_top_p_kept(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The kept set of the seed's ``sample_top_p`` (everything but its final multinomial)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, probs_idx, probs_sort > 0)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.95])
@pytest.mark.parametrize("t", [0.6, 1.0])
def test_top_p_matches_the_seeds_sample_top_p(p, t):
    x = random_logits(6)
    ref = sample_top_p_kept(torch.softmax(x / t, dim=-1), p)
    pipe = load_pipeline({"pipeline": [{"temperature": t}, {"top_p": p}], "sampler": "greedy"})
    ours = torch.isfinite(pipe.process(x))
    ambiguous = _near_boundary(x / t, p)
    assert not bool(((ours != ref) & ~ambiguous).any())


# -- top_p_mask (partial selection + fallback) vs the full-sort reference ----------------------

def adversarial_rows(vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = {
        "flat": torch.zeros(vocab),
        "all_equal_negative": torch.full((vocab,), -3.5),
        "mostly_-inf": torch.full((vocab,), -INF).index_fill(0, torch.tensor([3, vocab // 2, vocab - 1]), 1.0),
        "one_finite": torch.full((vocab,), -INF).index_fill(0, torch.tensor([vocab // 3]), -2.0),
        "huge": torch.randn(vocab, generator=g) * 1e4,
        "tiny": torch.randn(vocab, generator=g) * 1e-7,
        "large_offset": torch.randn(vocab, generator=g) + 1e4,
        "ties": torch.randint(0, 4, (vocab,), generator=g).float(),
        "near_flat": torch.randn(vocab, generator=g) * 0.01,
        "random": torch.randn(vocab, generator=g) * 2,
        "peaked": torch.randn(vocab, generator=g) * 10,
    }
    return list(rows), torch.stack(list(rows.values())).float()


@pytest.mark.parametrize("vocab", [5, 256, 257, 1000, 5000])
@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_top_p_mask_equals_reference_on_adversarial_rows(vocab, p):
    names, x = adversarial_rows(vocab)
    ps = torch.full((x.shape[0],), p)
    got, ref = top_p_mask(x, ps), top_p_mask_reference(x, ps)
    bad = [names[i] for i in (got != ref).any(-1).nonzero().squeeze(-1).tolist()]
    assert not bad, f"rows differ: {bad}"
    assert bool(got.any(-1).all())


@pytest.mark.parametrize("seed", range(4))
def test_top_p_mask_equals_reference_on_random_batches_with_fallback_rows(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 3000, generator=g) * torch.linspace(0.05, 8, 48).unsqueeze(-1)
    p = torch.rand(48, generator=g) * 0.98 + 0.01
    # Flat rows with a high p need more than the 256 candidates: the fallback path.
    probs = x.softmax(-1)
    top256 = probs.topk(256, -1).values.sum(-1)
    assert bool((top256 < p).any()) and bool((top256 > p).any())
    assert torch.equal(top_p_mask(x, p), top_p_mask_reference(x, p))


@pytest.mark.parametrize("chunk_elements", [None, 5000])
@pytest.mark.parametrize("seed", range(3))
def test_top_p_histogram_path_equals_reference_on_wide_rows(seed, chunk_elements, monkeypatch):
    """Flat rows over a vocabulary larger than one scale of bins: the histogram path (with and
    without its reusable workspace, and after a temperature) keeps the reference's sets, in one
    column chunk or in many (with a short last one)."""
    from samplerkit.ops import histogram
    from samplerkit.ops.truncation import exp_weights, nucleus_stats, nucleus_threshold_histogram

    if chunk_elements is not None:
        monkeypatch.setattr(histogram, "CHUNK_ELEMENTS", chunk_elements)

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 40_000, generator=g) * torch.linspace(0.2, 3, 12).unsqueeze(-1)
    x[0, :30_000] = -INF
    x[1] = torch.randint(0, 40, (40_000,), generator=g).float() / 8          # many exact ties
    p = torch.rand(12, generator=g) * 0.9 + 0.05
    want = top_p_mask_reference(x, p)
    work = {}
    for _ in range(2):                                                       # buffers reused
        stats = nucleus_stats(x, work)
        threshold = nucleus_threshold_histogram(x, stats.top, stats.weights, stats.total, p, work)
        assert torch.equal(x >= threshold, want)
    stats = nucleus_stats(x)
    assert torch.equal(x >= nucleus_threshold_histogram(x, stats.top, stats.weights, stats.total, p), want)
    assert torch.equal(top_p_mask(x, p, work=work), want)
    # The chunked exp into a workspace is bit-identical to the one-pass form.
    assert torch.equal(exp_weights(x, stats.top, out=torch.empty_like(x)), exp_weights(x, stats.top))


def test_top_p_histogram_batch_with_nan_and_inf_rows():
    """A mostly flat batch takes the histogram for every row; rows holding NaN or +inf (which
    the pipeline reports invalid) must neither crash it nor differ from the reference."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 5000, generator=g) * 0.3
    x[1, 5], x[2, 7], x[3], x[4, :4000] = float("nan"), INF, -INF, -INF
    p = torch.full((8,), 0.9)
    assert torch.equal(top_p_mask(x, p, work={}), top_p_mask_reference(x, p))
    pipe = load_pipeline({"pipeline": [{"temperature": 0.7}, {"top_p": 0.9}], "sampler": "categorical",
                          "on_invalid": "mark_invalid"})
    _, valid = pipe.bind(8).sample_with_validity(x)
    assert valid.tolist() == [True, False, False, False, True, True, True, True]


def test_cut_below_keeps_signed_zeros_at_a_zero_threshold():
    from samplerkit.ops.truncation import cut_below

    x = torch.tensor([[-0.0, 0.0, -1.0, 1.0, -INF], [-0.0, 0.0, -1e-45, 1e-45, INF]])
    for threshold in (torch.tensor([[0.0], [0.0]]), torch.tensor([[-0.0], [-0.0]])):
        got = cut_below(x, threshold)
        want = x.masked_fill(x < threshold, -INF)
        assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))
        assert torch.equal(cut_below(x.clone(), threshold, out=None), want)


def test_sparse_nonzero_equals_nonzero():
    from samplerkit.ops.histogram import _sparse_nonzero

    g = torch.Generator().manual_seed(0)
    for vocab in (64, 1000, 4001):
        mask = torch.rand(7, vocab, generator=g) < 0.01
        mask[3] = False
        for got, want in zip(_sparse_nonzero(mask), mask.nonzero(as_tuple=True)):
            assert torch.equal(got, want)


def test_top_p_golden_boundary_semantics():
    """Kept iff the mass strictly before a token is below p (and ties with the last kept)."""
    x = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    assert top_p_mask(x, torch.tensor([0.499])).tolist() == [[True, False, False, False]]
    assert top_p_mask(x, torch.tensor([0.501])).tolist() == [[True, True, False, False]]
    assert top_p_mask(x, torch.tensor([0.749])).tolist() == [[True, True, False, False]]
    assert top_p_mask(x, torch.tensor([0.76])).tolist() == [[True, True, True, True]]   # tie with the last kept


# -- top_k tie rule ------------------------------------------------------------------------------

def test_top_k_keeps_exactly_k_with_lower_ids_winning_ties():
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0]])
    for k, kept in [(1, [1]), (2, [1, 3]), (3, [1, 2, 3]), (4, [1, 2, 3, 4]), (5, [1, 2, 3, 4, 5]), (7, list(range(7)))]:
        out = run(TopK, [{"top_k": k}], x)
        assert torch.isfinite(out[0]).nonzero().squeeze(-1).tolist() == kept, k
        assert int(top_k_mask(x, torch.tensor([k]), k).sum()) == k


def test_top_k_exactly_k_on_random_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (200, 40), generator=g).float()
    k = torch.randint(1, 41, (200,), generator=g)
    out = TopK([TopK.Params(top_k=int(v)) for v in k]).apply(x.clone(), StepContext(200, 40))
    kept = torch.isfinite(out)
    assert torch.equal(kept.sum(-1), k)
    # Every kept token is >= every removed one, and among equal values lower ids are kept.
    for i in range(200):
        row, keep = x[i], kept[i]
        if (~keep).any():
            assert row[keep].min() >= row[~keep].max()
            boundary = row[keep].min()
            tied = (row == boundary).nonzero().squeeze(-1)
            assert keep[tied].tolist() == sorted(keep[tied].tolist(), reverse=True)


def test_top_k_1_equals_greedy_with_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, (500, 16), generator=g).float()
    greedy = load_pipeline({"pipeline": [], "sampler": "greedy"}).sample(x)
    top1 = load_pipeline({"pipeline": [{"top_k": 1}], "sampler": "categorical"}).sample(x, seeds=list(range(500)))
    t0 = load_pipeline({"pipeline": [{"temperature": 0.0}], "sampler": "categorical"}).sample(x, seeds=list(range(500)))
    assert torch.equal(top1, greedy) and torch.equal(t0, greedy)
    assert torch.equal(greedy, x.argmax(-1))


def test_top_k_1_equals_greedy_with_ties_on_a_large_vocabulary():
    # Above 256 tokens the candidate fast paths run; ties at the top must still go to the lowest id.
    x = torch.zeros(4, 2000)
    x[:, [1500, 700, 1999]] = 5.0
    x[1, 3] = 5.0
    for steps in ([{"top_k": 1}], [{"temperature": 0.0}], [{"top_k": 5}, {"temperature": 0.0}],
                  [{"min_p": 1.0}, {"temperature": 0.0}]):
        ids = load_pipeline({"pipeline": steps, "sampler": "categorical"}).sample(x, seeds=[1, 2, 3, 4])
        assert ids.tolist() == [700, 3, 700, 700], steps


# -- golden tables (after llama.cpp tests/test-sampling.cpp) -------------------------------------

GOLDEN = [
    # (step, params, input probabilities, expected probabilities after the step, renormalised)
    ("top_k", {"top_k": 1}, [0.1, 0.2, 0.3, 0.4], [0, 0, 0, 1]),
    ("top_k", {"top_k": 3}, [0.1, 0.2, 0.3, 0.4], [0, 2 / 9, 3 / 9, 4 / 9]),
    ("top_k", {"top_k": 4}, [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]),
    ("top_k", {"top_k": 0}, [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]),
    ("top_p", {"top_p": 0.3}, [0.1, 0.2, 0.3, 0.4], [0, 0, 0, 1]),
    ("top_p", {"top_p": 0.5}, [0.1, 0.2, 0.3, 0.4], [0, 0, 3 / 7, 4 / 7]),
    ("top_p", {"top_p": 0.65}, [0.1, 0.2, 0.3, 0.4], [0, 0, 3 / 7, 4 / 7]),
    ("top_p", {"top_p": 0.45}, [0.3, 0.3, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3, 0]),    # ties with the last kept
    ("top_p", {"top_p": 0.8}, [0.1, 0.2, 0.3, 0.4], [0, 2 / 9, 3 / 9, 4 / 9]),
    ("top_p", {"top_p": 1.0}, [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]),
    ("min_p", {"min_p": 0.76}, [0.1, 0.2, 0.3, 0.4], [0, 0, 0, 1]),
    ("min_p", {"min_p": 0.74}, [0.1, 0.2, 0.3, 0.4], [0, 0, 3 / 7, 4 / 7]),
    ("min_p", {"min_p": 0.49}, [0.1, 0.2, 0.3, 0.4], [0, 2 / 9, 3 / 9, 4 / 9]),
    ("min_p", {"min_p": 0.0}, [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]),
    ("min_p", {"min_p": 1.0}, [0.2, 0.4, 0.4], [0, 0.5, 0.5]),
    ("temperature", {"temperature": 1.0}, [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]),
    ("temperature", {"temperature": 0.5}, [0.1, 0.2, 0.3, 0.4], [0.01 / 0.3, 0.04 / 0.3, 0.09 / 0.3, 0.16 / 0.3]),
    ("temperature", {"temperature": 0.0}, [0.1, 0.4, 0.4, 0.1], [0, 1, 0, 0]),
    ("temperature", {"temperature": 2.0}, [0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]),
]
STEPS = {"top_k": TopK, "top_p": TopP, "min_p": MinP, "temperature": Temperature}


@pytest.mark.parametrize("name, params, probs, expected", GOLDEN,
                         ids=[f"{g[0]}-{list(g[1].values())[0]}-{i}" for i, g in enumerate(GOLDEN)])
def test_golden(name, params, probs, expected):
    x = torch.log(torch.tensor([probs]))
    out = run(STEPS[name], [params], x)
    got = torch.softmax(out, -1)[0]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_golden_sequences():
    """Chains in both popular orders on one tiny distribution."""
    x = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    # transformers order: temperature 0.5 -> top_p 0.5; p = [1, 4, 9, 16] / 30 -> keep 16/30 (0.533 >= 0.5)
    pipe = load_pipeline({"pipeline": [{"temperature": 0.5}, {"top_p": 0.5}], "sampler": "greedy"})
    assert torch.softmax(pipe.process(x), -1)[0].tolist() == pytest.approx([0, 0, 0, 1], abs=1e-6)
    # llama.cpp order: top_p 0.5 -> temperature 0.5: keep {0.3, 0.4} then sharpen: 9/25, 16/25
    pipe = load_pipeline({"pipeline": [{"top_p": 0.5}, {"temperature": 0.5}], "sampler": "greedy"})
    assert torch.softmax(pipe.process(x), -1)[0].tolist() == pytest.approx([0, 0, 9 / 25, 16 / 25], abs=1e-6)


def test_greedy_picks_lowest_id_among_ties():
    x = torch.tensor([[0.0, 2.0, 2.0], [5.0, 5.0, 5.0], [-INF, -1.0, -1.0]])
    assert Greedy.for_batch(Greedy.Params(), 3).sample(x, StepContext(3)).tolist() == [1, 0, 1]


@pytest.mark.parametrize("kind", ["distinct", "ulp_apart"])
def test_temperature_deferred_past_top_k_equals_the_dense_order(kind, monkeypatch):
    """temperature -> top_k runs top_k on the raw logits and divides only its k + 1 values.
    With logits one ulp apart (distinct before the division, which merges neighbours into ties)
    the fused path must detect the tie and fall back; with ordinary logits it is taken. Either way
    the result equals the sequential dense one: values and sampled tokens."""
    import samplerkit.builtins.truncation.top_k as top_k_module
    from samplerkit.context import StepContext
    from samplerkit.ops.candidates import top_k_candidates

    taken = {"fused": 0, "fell_back": 0}

    def spy(logits, k, k_max, transform=None):
        out = top_k_candidates(logits, k, k_max, transform)
        if transform is not None:
            taken["fused" if out is not None else "fell_back"] += 1
        return out

    monkeypatch.setattr(top_k_module, "top_k_candidates", spy)
    g = torch.Generator().manual_seed(0)
    batch, vocab = 16, 600
    if kind == "distinct":
        x = torch.randn(batch, vocab, generator=g) * 3
    else:
        base = 1.0 + torch.rand(batch, 1, generator=g)                     # in [1, 2): one ulp = eps
        steps = torch.stack([torch.randperm(vocab, generator=g) for _ in range(batch)]).float()
        x = base + steps * torch.finfo(torch.float32).eps                  # distinct, one ulp apart
    for temperature, k in ((3.0, 7), (0.37, 50), (7.1, 300), (1.5, 1)):
        pipe = samplerkit.load_pipeline({"backend": "bigram", "sampler": "categorical",
                                         "pipeline": [{"temperature": temperature}, {"top_k": k}, {"top_p": 0.9}]})
        bound = pipe.bind(batch, seeds=list(range(batch)))
        ctx = StepContext(batch, vocab)
        dense = x.clone()
        for _, step in bound.steps:
            dense = step.apply(dense, ctx)
        fused = bound.process(x, ctx)
        assert torch.equal(torch.isfinite(fused), torch.isfinite(dense)), (temperature, k)
        assert torch.equal(fused[torch.isfinite(fused)], dense[torch.isfinite(dense)])
        assert torch.equal(bound.sample(x, ctx), bound.sampler.sample(dense, ctx))
    if kind == "distinct":
        assert taken["fused"] > 0 and taken["fell_back"] == 0
    else:
        assert taken["fell_back"] > 0


def test_remove_unkept_equals_masked_fill():
    """The branch-free removal gives masked_fill_'s result bit for bit: random masks, -inf
    already present, +-inf and NaN (the masked_fill_ route), an all-kept and an all-removed row,
    a reused buffer."""
    from samplerkit.ops.truncation import remove_unkept

    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4000, generator=g) * 3
    x[1, ::3] = -INF
    x[2, 0] = 0.0
    keep = torch.rand(6, 4000, generator=g) < 0.4
    keep[3] = True
    keep[4] = False
    work = {}
    for _ in range(2):
        assert torch.equal(remove_unkept(x.clone(), keep, work), x.masked_fill(~keep, -INF))
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[5, 10:20] = bad
        y[1, 0] = INF
        assert torch.equal(remove_unkept(y.clone(), keep).isnan(), y.masked_fill(~keep, -INF).isnan())
        assert torch.equal(remove_unkept(y.clone(), keep).nan_to_num(), y.masked_fill(~keep, -INF).nan_to_num())


def test_top_p_ties_past_the_candidate_list_are_kept():
    """A nucleus that ends inside the 256 candidates at a value tied with tokens outside them
    keeps those tokens too (ties with a kept token are kept): the candidate path must not
    decide such rows. Dense process() and the sampling path both match the reference."""
    import samplerkit

    x = torch.zeros(3, 1000)
    x[1, :300] = 1.0                                    # 300 tied tokens at the top
    x[2, 500:] = 2.0
    x[2, 17] = 3.0
    p = torch.full((3,), 0.1)
    want = top_p_mask_reference(x, p)
    assert want.sum(-1).tolist() == [1000, 300, 501]
    assert torch.equal(top_p_mask(x, p), want)
    pipe = samplerkit.load_pipeline({"pipeline": [{"top_p": 0.1}], "sampler": "categorical"})
    assert torch.equal(torch.isfinite(pipe.bind(3).process(x)), want)
    for seed in range(20):
        ids = pipe.sample(x, seeds=[seed, seed + 100, seed + 200])
        assert bool(want.gather(1, ids.unsqueeze(1)).all())
    drawn = torch.stack([pipe.sample(x, seeds=[s, s, s]) for s in range(200)])
    assert int((drawn[:, 1] >= 256).sum()) > 0           # tokens past the first 256 ties are drawn


@pytest.mark.parametrize("vocab, k", [(128 * 32, 32), (256 * 32 + 7, 51), (40_000, 256), (1000, 256)])
def test_largest_equals_topk_values(vocab, k):
    """The group-maxima preselection returns topk's values exactly, with ids that hold them
    (distinct ids), on random rows, rows of many exact ties, -inf rows, rows with NaN, a short
    last group, and the top values packed into a few groups."""
    from samplerkit.ops.truncation import largest

    g = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(8, vocab, generator=g)
    x[1] = torch.randint(0, 5, (vocab,), generator=g).float()            # ties everywhere
    x[2] = -INF
    x[3, ::3] = -INF
    x[4, 5] = float("nan")
    x[5, -3:] = 10.0                                                      # the top in the last group
    x[6] = 1.0
    x[7, :k] = 50.0 + torch.arange(k)                                     # the top packed into few groups
    values, ids = largest(x, k)
    want = x.topk(k, dim=-1).values
    assert torch.equal(values.nan_to_num(), want.nan_to_num()) and torch.equal(values.isnan(), want.isnan())
    assert torch.equal(x.gather(-1, ids).nan_to_num(), values.nan_to_num())
    assert all(len(set(row.tolist())) == k for row in ids)
