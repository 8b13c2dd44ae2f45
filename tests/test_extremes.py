"""Every value validation accepts gives finite, correct results (issue 13 defect 10).

For every registered processor, each numeric parameter is drawn at the ends of its declared
range (and the float32 extremes where the range is open), on logits that include the largest
finite float32 values. Either validation rejects the parameters with a ConfigError, or:

* no NaN and no ``+inf`` comes out of a row without NaN or ``+inf`` (a step that declares
  ``keeps_finite`` promises exactly this, and the pipeline trusts it);
* every row keeps at least one token, and a removed (``-inf``) token stays removed;
* a finite logit stays finite unless the step removes it (becomes ``-inf``), and the row is
  valid through the pipeline (sample_with_validity).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from samplerkit.context import StepContext
from samplerkit.errors import ConfigError
from samplerkit.params import FLOAT32_MAX, FLOAT32_TINY
from samplerkit.pipeline import Pipeline
from samplerkit.registry import default_registry
from samplerkit.spec import field_bounds
from samplerkit.testing import examples_for, registered_classes

REGISTRY = default_registry()
# Steps that declare `needs_vocabulary` need a tokenizer and a history their language accepts, which
# random histories are not: tests/test_structured.py covers their extremes and tensor kinds.
PROCESSORS = [c for c in registered_classes("processor", REGISTRY) if not getattr(c, "needs_vocabulary", False)]
VOCAB = 40
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

F32_MAX = float(torch.finfo(torch.float32).max)
extreme_logit = st.sampled_from([F32_MAX, -F32_MAX, 3e38, -3e38, 1e38, -1e38, 1e30, -1e30, 0.0, -0.0,
                                 1e-38, -1e-38, 88.0, -88.0, float("-inf")])
logit = st.one_of(extreme_logit, st.floats(-1e4, 1e4, width=32))


@st.composite
def logit_rows(draw):
    values = draw(st.lists(st.lists(logit, min_size=VOCAB, max_size=VOCAB), min_size=2, max_size=3))
    x = torch.tensor(values, dtype=torch.float32)
    for r in range(x.shape[0]):
        if not bool(torch.isfinite(x[r]).any()):
            x[r, draw(st.integers(0, VOCAB - 1))] = draw(extreme_logit.filter(math.isfinite))
    return x


def _extremes(field) -> list:
    """The ends of a numeric field's declared range, and the float32 extremes beyond open ends."""
    kind = field.annotation
    lo, lo_open, hi, hi_open = field_bounds(field)
    if kind is int or kind == (int | None):
        lo_v = int(lo) + (1 if lo_open else 0) if lo is not None else -(2**63)
        hi_v = int(hi) - (1 if hi_open else 0) if hi is not None else 2**63 - 1
        return [lo_v, hi_v, lo_v + 1, 2**31]
    if kind is float or kind == (float | None):
        lo_v = (max(lo, 0) + FLOAT32_TINY if lo_open and lo == 0 else math.nextafter(lo, math.inf) if lo_open else lo) \
            if lo is not None else -FLOAT32_MAX
        hi_v = (math.nextafter(hi, -math.inf) if hi_open else hi) if hi is not None else FLOAT32_MAX
        values = [lo_v, hi_v, FLOAT32_MAX, FLOAT32_TINY, 1e39, 1e300, 1e-300, -FLOAT32_MAX]
        return sorted(set(values))
    return []


def _param_cases():
    for cls in PROCESSORS:
        numeric = {name: _extremes(f) for name, f in cls.Params.model_fields.items()}
        numeric = {k: v for k, v in numeric.items() if v}
        if not numeric:
            continue
        yield pytest.param(cls, numeric, id=cls.name)


def _ctx(cls, batch: int) -> StepContext:
    ctx = StepContext(batch, VOCAB, prompt_ids=[[1, 2, 3, 1, 2, 3][: 2 + r] for r in range(batch)],
                      uses=frozenset(cls.uses), max_new_tokens=8, eos_token_ids=[0],
                      tokenize=lambda text: [ord(c) % (VOCAB - 1) + 1 for c in text])
    for t in (1, 2, 1, 2):
        ctx.append(torch.full((batch,), t))
    return ctx


def _check(cls, params: dict, x: torch.Tensor) -> None:
    try:
        spec = cls.spec(**params)
    except (ValidationError, ConfigError):
        return                                       # validation rejects it: allowed
    step = cls([spec.params] * x.shape[0])
    out = step.apply(x.clone(), _ctx(cls, x.shape[0]))
    what = f"{cls.name}({params})"
    assert not bool(out.isnan().any()), f"{what}: NaN {out.tolist()}"
    assert not bool((out == float("inf")).any()), f"{what}: +inf {out.tolist()}"
    assert bool(torch.isfinite(out).any(-1).all()), f"{what}: a row lost every token"
    removed = x == float("-inf")
    assert bool((out[removed] == float("-inf")).all()), f"{what}: a removed token came back"
    # Through the pipeline: every row valid, the chosen token kept.
    pipe = Pipeline([spec], sampler=REGISTRY.get("sampler", "categorical").spec(), on_invalid="mark_invalid")
    ids, valid = pipe.bind(x.shape[0], seeds=list(range(x.shape[0]))).sample_with_validity(x, _ctx(cls, x.shape[0]))
    assert valid.all(), f"{what}: rows reported invalid: {valid.tolist()}"


@pytest.mark.parametrize(("cls", "numeric"), list(_param_cases()))
@SETTINGS
@given(data=st.data(), x=logit_rows())
def test_declared_ranges_at_their_extremes(cls, numeric, data, x):
    base = data.draw(st.sampled_from(examples_for(cls) or [{}]))
    params = dict(base)
    for name, values in numeric.items():
        if data.draw(st.booleans()):
            params[name] = data.draw(st.sampled_from(values))
    _check(cls, params, x)


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.name)
@SETTINGS
@given(data=st.data(), x=logit_rows())
def test_examples_on_extreme_finite_logits(cls, data, x):
    params = data.draw(st.sampled_from(examples_for(cls) or [{}]))
    _check(cls, params, x)


@pytest.mark.parametrize(("config", "field"), [
    ({"temperature": 1e300}, "temperature"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"smoothing_factor": 1e39}, "smoothing_factor"),
    ({"smoothing_factor": 1.0, "smoothing_curve": 1e39}, "smoothing_curve"),
    ({"low": 1.0, "high": 1e39}, "high"),
])
def test_values_float32_cannot_hold_are_rejected_with_the_range(config, field):
    name = {"temperature": "temperature", "repetition_penalty": "repetition_penalty",
            "smoothing_factor": "smoothing", "smoothing_curve": "smoothing", "high": "dynamic_temperature"}[field]
    cls = REGISTRY.get("processor", name)
    spec = cls.spec()
    with pytest.raises(ConfigError, match=rf"{field}: must be 0 or of magnitude in \[1.2e-38, 3.4e38\].*got"):
        spec.with_params(config, f"pipeline[0] {name}")


@pytest.mark.parametrize(("name", "params"), [
    ("smoothing", {"smoothing_factor": 3e38}),
    ("smoothing", {"smoothing_factor": 1.0, "smoothing_curve": 3e38}),
    ("dynamic_temperature", {"low": 0.5, "high": 3e38}),
    ("dynamic_temperature", {"low": 1e-5, "high": 1e-5}),
    ("temperature", {"temperature": 3e38}),
    ("temperature", {"temperature": 1e-5}),
    ("repetition_penalty", {"repetition_penalty": 1.2e-38}),
    ("repetition_penalty", {"repetition_penalty": 3e38}),
    ("top_n_sigma", {"top_n_sigma": 3e38}),
    ("dry", {"multiplier": 3e38, "base": 3e38, "allowed_length": 1}),
])
def test_issue_13_extreme_parameters_on_extreme_logits(name, params):
    x = torch.tensor([[3e38, -3e38, 1.0, 0.0, -1.0, 2.0, float("-inf"), 5.0, 1e38, -1e38, 7.0, 3.0] * 3 + [0.0] * 4,
                      [-3e38, -3e38, 0.5, 0.25, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0] * 3 + [1.0] * 4])
    _check(REGISTRY.get("processor", name), params, x)
