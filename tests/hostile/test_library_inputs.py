"""Hostile library input to the pipeline (issue 14 item 14, library part): each bad call gets
a ValueError or ConfigError that says what was wrong and what to pass, never an IndexError,
a NotImplementedError from deep inside torch, a silent conversion or a nested PluginError."""

from __future__ import annotations

import pytest
import torch

import samplerkit
from samplerkit.errors import ConfigError, PluginError

PIPE = {"pipeline": [{"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.9}], "sampler": "categorical"}


@pytest.fixture(scope="module")
def pipe():
    return samplerkit.load_pipeline(PIPE)


@pytest.mark.parametrize(("logits", "message"), [
    (torch.tensor(1.0), r"must be \[batch, vocab\], got shape \(\)"),
    (torch.zeros(5), r"got shape \(5,\) \(one row: logits.unsqueeze\(0\)\)"),
    (torch.zeros(2, 0), r"empty vocabulary .*pass one logit per token"),
    (torch.zeros(0, 5), r"no rows .*pass at least one row"),
    (torch.randn(2, 5, dtype=torch.complex64), r"complex .*pass real logits"),
    (torch.randint(0, 5, (2, 5)), r"floating point .*got torch.int64 .*logits.float\(\)"),
    (torch.ones(2, 5, dtype=torch.bool), r"floating point .*got torch.bool"),
    ([[1.0, 2.0]], r"must be a torch.Tensor .*got list"),
    (None, r"must be a torch.Tensor .*got NoneType"),
], ids=["0-d", "1-d", "V=0", "B=0", "complex", "int", "bool", "list", "None"])
@pytest.mark.parametrize("method", ["sample", "process", "bound_sample", "bound_process", "sample_async"])
def test_bad_logits_get_a_clear_value_error(pipe, logits, message, method):
    call = {
        "sample": lambda: pipe.sample(logits),
        "process": lambda: pipe.process(logits),
        "bound_sample": lambda: pipe.bind(2).sample(logits),
        "bound_process": lambda: pipe.bind(2).process(logits),
        "sample_async": lambda: pipe.bind(2).sample_async(logits),
    }[method]
    with pytest.raises(ValueError, match=message):
        call()


def test_requires_grad_logits_are_sampled_detached(pipe):
    x = torch.randn(3, 50, requires_grad=True)
    ids = pipe.sample(x, seeds=[1, 2, 3])
    assert torch.equal(ids, pipe.sample(x.detach(), seeds=[1, 2, 3]))
    ids, valid = pipe.bind(3).sample_with_validity(x)
    assert valid.all()


def test_requires_grad_logits_to_process_say_to_detach(pipe):
    with pytest.raises(ValueError, match=r"require grad.*pass logits.detach\(\)"):
        pipe.process(torch.randn(2, 50, requires_grad=True))


def test_a_plugin_failure_names_its_own_step_once():
    """A step deferred into the next one (temperature into top_k) that fails is reported as
    itself, not wrapped in the other step's PluginError."""
    from samplerkit.builtins.shaping.temperature import Temperature

    pipe = samplerkit.load_pipeline(PIPE)
    bound = pipe.bind(2)
    temperature = bound.steps[0][1]
    assert isinstance(temperature, Temperature)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    temperature.apply_candidates = broken
    temperature.apply_into = broken
    temperature.apply = broken
    with pytest.raises(PluginError) as info:
        bound.sample(torch.randn(2, 50))
    text = str(info.value)
    assert text.startswith("pipeline[0] temperature") and text.count("failed") == 1, text


@pytest.mark.parametrize(("rows", "message"), [
    ([{"top_p": 0.5}], r"rows\[0\] top_p: must map that step's parameters to values, e\.g\. \{'top_p': \{'top_p': 0\.5\}\}"),
    (["top_p"], r"rows\[0\]: must be a mapping of step name to parameters.*got 'top_p'"),
    ([None, 3], r"rows\[1\]: must be a mapping"),
    ([], r"rows: is empty"),
    (0, r"rows: the batch size must be at least 1, got 0"),
    (-2, r"at least 1, got -2"),
    (2.0, r"rows: must be a batch size .*got 2\.0"),
    ("top_p", r"rows: must be a batch size"),
    (True, r"rows: must be a batch size"),
    ([{"top_q": {"top_p": 0.5}}], r"rows\[0\]: overrides name steps not in this pipeline: 'top_q'"),
    ([{"top_p": {"top_p": 1.5}}], r"rows\[0\] top_p: must be in \(0, 1\], got 1.5"),
], ids=["flat", "str-row", "int-row", "empty", "zero", "negative", "float", "str", "bool", "unknown-step", "range"])
def test_bad_rows_get_a_config_error_saying_what_to_pass(pipe, rows, message):
    with pytest.raises(ConfigError, match=message):
        pipe.bind(rows)
