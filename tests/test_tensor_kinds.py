"""Every registered step on every kind of tensor a caller may hand the pipeline.

Issue 13 defect 1: top_p read ``logits._version``, which inference-mode tensors do not have,
once its kept set was too large for the candidate path (the default model's vocabulary, a
flat row). Every processor and sampler in the registry (plugins included) must give the same
tokens on logits made under ``torch.inference_mode()``, on ordinary (grad-mode) tensors, on
non-contiguous views and when the pipeline itself runs in inference mode.
"""

from __future__ import annotations

import pytest
import torch

from samplerkit.builtins.samplers.categorical import Categorical
from samplerkit.context import StepContext
from samplerkit.pipeline import Pipeline
from samplerkit.registry import default_registry
from samplerkit.testing import examples_for, registered_classes

REGISTRY = default_registry()
VOCAB = 49152                   # SmolLM2's vocabulary (the default model)
BATCH = 3
SEEDS = [11, 12, 13]


def _logits() -> torch.Tensor:
    """Flat rows (a nucleus of most of the vocabulary: top_p leaves its candidate path) and a
    peaked one, so both the dense and the candidate paths run."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, VOCAB, generator=g)
    x[2] *= 8.0
    return x


def _ctx(cls: type) -> StepContext:
    ctx = StepContext(BATCH, VOCAB, prompt_ids=[[1, 2, 3, 1, 2], [5, 6], [7, 7, 7, 7]],
                      uses=frozenset(cls.uses), max_new_tokens=8, eos_token_ids=[0],
                      tokenize=lambda text: [ord(c) % 97 + 1 for c in text])
    for t in ([1, 5, 7], [2, 6, 7]):
        ctx.append(torch.tensor(t))
    return ctx


def _kinds(base: torch.Tensor):
    """(name, logits, run the pipeline under inference mode) with the same values."""
    with torch.inference_mode():
        inference = base.clone()
    wide = torch.empty(BATCH, 2 * VOCAB)
    wide[:, 1::2] = base
    strided = wide[:, 1::2]                                # a non-contiguous view
    assert not strided.is_contiguous()
    transposed = base.t().contiguous().t()                 # column-major view
    yield "grad_mode", base.clone(), False
    yield "inference_tensor", inference, False
    yield "inference_tensor_in_inference_mode", inference, True
    yield "strided_view", strided, False
    yield "transposed_view", transposed, False
    yield "view_in_inference_mode", strided, True
    yield "requires_grad_false_leaf_of_graph", (base.clone().requires_grad_(True) * 1.0).detach(), False


def _cases():
    for cls in registered_classes("processor", REGISTRY):
        if getattr(cls, "needs_vocabulary", False):      # need a tokenizer: tests/test_structured.py
            continue
        for example in examples_for(cls) or [{}]:
            yield pytest.param(cls, example, id=f"{cls.name}-{example}")


def _sample(pipe: Pipeline, cls: type, logits: torch.Tensor, inference: bool):
    def run():
        bound = pipe.bind(BATCH, seeds=SEEDS if "seed" in pipe.sampler.cls.Params.model_fields else None)
        processed = bound.process(logits, _ctx(cls))
        ids, valid = bound.sample_with_validity(logits, _ctx(cls))
        return processed, ids, valid
    if inference:
        with torch.inference_mode():
            return run()
    return run()


@pytest.mark.parametrize(("cls", "example"), list(_cases()))
def test_every_processor_on_every_tensor_kind(cls, example):
    pipe = Pipeline([cls.spec(**example)], sampler=Categorical.spec(), on_invalid="mark_invalid")
    base = _logits()
    expected = None
    for kind, logits, inference in _kinds(base):
        before = logits.clone()
        processed, ids, valid = _sample(pipe, cls, logits, inference)
        assert torch.equal(logits, before), f"{kind}: the caller's logits were modified"
        assert ids.shape == (BATCH,) and bool(((ids >= 0) & (ids < VOCAB)).all()), f"{kind}: ids {ids.tolist()}"
        if expected is None:
            expected = (processed, ids, valid)
            continue
        assert torch.equal(processed.isfinite(), expected[0].isfinite()), f"{kind}: kept set differs"
        assert torch.equal(processed[processed.isfinite()], expected[0][expected[0].isfinite()]), f"{kind}: values differ"
        assert torch.equal(ids, expected[1]), f"{kind}: ids {ids.tolist()} vs {expected[1].tolist()}"
        assert torch.equal(valid, expected[2]), f"{kind}: validity differs"


@pytest.mark.parametrize("cls", registered_classes("sampler", REGISTRY), ids=lambda c: c.name)
@pytest.mark.parametrize("before", [[], [{"top_p": 0.6}], [{"temperature": 0.8}, {"top_p": 0.9}], [{"min_p": 0.001}]],
                         ids=["alone", "top_p", "temperature+top_p", "min_p"])
def test_every_sampler_on_every_tensor_kind(cls, before):
    from samplerkit import load_pipeline

    config = {"pipeline": before, "sampler": cls.name}
    pipe = load_pipeline(config)
    base = _logits()
    expected = None
    for kind, logits, inference in _kinds(base):
        _, ids, _ = _sample(pipe, cls, logits, inference)
        assert ids.shape == (BATCH,) and bool(((ids >= 0) & (ids < VOCAB)).all()), f"{kind}: ids {ids.tolist()}"
        if expected is None:
            expected = ids
        assert torch.equal(ids, expected), f"{kind}: ids {ids.tolist()} vs {expected.tolist()}"


def test_issue_13_repro_top_p_on_inference_tensor():
    from samplerkit import load_pipeline

    with torch.inference_mode():
        x = torch.randn(2, VOCAB)
    ids = load_pipeline({"pipeline": [{"top_p": 0.6}], "sampler": "categorical"}).sample(x)
    assert ids.shape == (2,)


def test_no_step_reads_tensor_identity():
    """The class of defect: no step or pipeline code keys state on a tensor's version counter
    or identity (inference tensors have no version counter; ids are reused after free)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "samplerkit"
    offenders = []
    for path in root.rglob("*.py"):
        if "backends" in path.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\._version\b|memo\[0\] is ", line):
                offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
