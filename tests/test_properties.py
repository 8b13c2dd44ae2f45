"""Property-based tests: random pipelines on random logits, random configs, random --set."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import samplerkit
from samplerkit.cli import main as cli_main
from samplerkit.config import resolve
from samplerkit.errors import SamplerkitError
from samplerkit.registry import default_registry

REGISTRY = default_registry()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

special = st.sampled_from([0.0, -0.0, 1e-30, -1e30, 1e30, 88.0, -88.0, float("-inf")])
logit = st.one_of(st.floats(-50, 50, allow_nan=False, width=32), special)


@st.composite
def logits_batches(draw, max_rows=4, max_vocab=40):
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(1, max_vocab))
    values = draw(st.lists(st.lists(logit, min_size=vocab, max_size=vocab), min_size=rows, max_size=rows))
    x = torch.tensor(values, dtype=torch.float32)
    for r in range(rows):                       # every row has at least one finite logit
        if not bool(torch.isfinite(x[r]).any()):
            x[r, draw(st.integers(0, vocab - 1))] = draw(st.floats(-5, 5, width=32))
    return x


step = st.one_of(
    st.builds(lambda t: {"temperature": t}, st.one_of(st.just(0.0), st.floats(1e-6, 5.0))),
    st.builds(lambda k: {"top_k": k}, st.integers(0, 50)),
    st.builds(lambda p: {"top_p": p}, st.floats(1e-6, 1.0)),
    st.builds(lambda p: {"min_p": p}, st.floats(0.0, 1.0, width=32, allow_subnormal=False)),  # float32 normal: validation rejects the rest
)


@SETTINGS
@given(x=logits_batches(), steps=st.lists(step, max_size=5), sampler=st.sampled_from(["categorical", "greedy"]))
def test_random_pipelines_never_crash_and_keep_a_token(x, steps, sampler):
    pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps, "sampler": sampler}, registry=REGISTRY)
    before = x.clone()
    out = pipe.process(x)
    assert torch.equal(x, before), "the caller's logits were modified"
    assert out.shape == x.shape and out.dtype == torch.float32
    assert bool(torch.isfinite(out).any(-1).all()), "a row lost every token"
    assert not bool(out.isnan().any())
    ids = pipe.sample(x, seeds=list(range(x.shape[0])) if sampler == "categorical" else None)
    assert bool(((ids >= 0) & (ids < x.shape[1])).all())
    assert bool(torch.isfinite(out.gather(-1, ids.unsqueeze(-1))).all()), "drew a removed token"


@SETTINGS
@given(x=logits_batches(), k=st.integers(1, 60))
def test_top_k_keeps_exactly_k_lowest_ids_on_ties(x, k):
    out = samplerkit.load_pipeline({"backend": "bigram", "pipeline": [{"top_k": k}]}, registry=REGISTRY).process(x)
    finite_in = torch.isfinite(x).sum(-1)
    kept = torch.isfinite(out)
    assert torch.equal(kept.sum(-1), torch.minimum(finite_in, torch.tensor(k)))
    for r in range(x.shape[0]):               # kept = the first k of (value desc, id asc)
        order = sorted(range(x.shape[1]), key=lambda i: (-float(x[r, i]), i))
        expected = {i for i in order[:k] if math.isfinite(float(x[r, i]))}
        assert set(kept[r].nonzero().flatten().tolist()) == expected


@SETTINGS
@given(x=logits_batches())
def test_top_k_one_and_temperature_zero_equal_greedy(x):
    greedy = x.argmax(-1)
    for steps in ([{"top_k": 1}], [{"temperature": 0.0}], [{"temperature": 0.0}, {"top_p": 0.5}]):
        pipe = samplerkit.load_pipeline({"backend": "bigram", "pipeline": steps, "sampler": "categorical"}, registry=REGISTRY)
        assert torch.equal(pipe.sample(x, seeds=list(range(x.shape[0]))), greedy), steps


@SETTINGS
@given(x=logits_batches(), p=st.floats(1e-6, 0.999999))
def test_top_p_keeps_the_minimal_prefix(x, p):
    out = samplerkit.load_pipeline({"backend": "bigram", "pipeline": [{"top_p": p}]}, registry=REGISTRY).process(x)
    probs = torch.softmax(x.double(), -1)
    for r in range(x.shape[0]):
        kept = torch.isfinite(out[r])
        mass_kept = float(probs[r][kept].sum())
        smallest_kept = float(probs[r][kept].min())
        # Minimal: without the tokens tied at the least probable kept value, the mass is < p.
        without_last = float(probs[r][kept & (probs[r] > smallest_kept)].sum())
        assert mass_kept >= p - 1e-9 or bool(kept[torch.isfinite(x[r])].all())
        assert without_last < p + 1e-9
        # A threshold: nothing more probable than a kept token is dropped.
        assert not bool(((probs[r] > smallest_kept) & ~kept).any())


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=8))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
section_names = st.sampled_from(["backend", "pipeline", "sampler", "generation", "plugins", "on_invalid", "piplne"])


@SETTINGS
@given(doc=st.dictionaries(section_names, yaml_values, max_size=4))
def test_random_config_documents_give_only_clean_errors(doc):
    try:
        resolve(doc, REGISTRY)
    except SamplerkitError as exc:
        assert str(exc)
        assert "Traceback" not in str(exc)


keys = st.sampled_from(["sampler.seed", "pipeline[0].top_p", "pipeline[9].x", "generation.n", "generation",
                        "backend", "a.b[2]", "pipeline[0]", "sampler", "[1]", "", "on_invalid"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=keys, value=st.one_of(st.text(max_size=6), st.sampled_from(["1", "-1", "nan", ".inf", "[1, 2]", "{a: 1}", "top_q"])))
def test_random_set_overrides_give_only_clean_errors(key, value, capsys):
    code = cli_main(["validate", "examples/bigram.yaml", "--set", f"{key}={value}"])
    captured = capsys.readouterr()
    assert code in (0, 2)
    assert "Traceback" not in captured.err
    if code == 2:
        assert captured.err.startswith("samplerkit validate: error:")


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
