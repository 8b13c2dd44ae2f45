"""Sampler output is checked at run time, as processor output is (issue 15 item 1), and the
pipeline has no built-in names or closure attributes special-cased (issue 15 item 10)."""

from __future__ import annotations

import pathlib

import pytest
import torch

import samplerkit
from samplerkit import Sampler
from samplerkit.errors import PluginError
from samplerkit.testing import temporary_plugin

VOCAB = 8


def _sampler(name: str, result):
    return type(name.title().replace("_", ""), (Sampler,), {"name": name, "sample": lambda self, logits, ctx: result(logits)})


BAD = [
    ("past_the_end", lambda x: torch.full((x.shape[0],), VOCAB), r"returned ids outside \[0, 8\): \[8, 8\] in rows \[0, 1\]"),
    ("negative", lambda x: torch.tensor([0, -1]), r"returned ids outside \[0, 8\): \[-1\] in rows \[1\]"),
    ("float_ids", lambda x: x.argmax(-1).float(), r"returned torch.float32 ids; samplers must return int64"),
    ("column", lambda x: x.argmax(-1, keepdim=True), r"returned ids of shape \(2, 1\).*shape \(2,\) \(squeeze"),
    ("a_list", lambda x: [0, 1], r"returned list; samplers must return an int64 tensor of shape \(2,\)"),
    ("removed_token", lambda x: x.argmin(-1), r"chose tokens the processed logits removed \(-inf\): \[\d, \d\] in rows \[0, 1\]"),
]


PIPELINES = {"top_k": [{"top_k": 3}], "top_p": [{"top_p": 0.5}], "min_p": [{"min_p": 0.3}], "none": []}
# Without a truncation no token is removed: removed_token runs only with one.
CASES = [pytest.param(name, result, message, steps, id=f"{name}-{label}")
         for name, result, message in BAD for label, steps in PIPELINES.items()
         if steps or name != "removed_token"]


@pytest.mark.parametrize(("name", "result", "message", "pipeline"), CASES)
def test_bad_sampler_output_is_a_plugin_error_naming_the_sampler(name, result, message, pipeline):
    cls = _sampler(name, result)
    with temporary_plugin(cls, "bad_sampler_plugin") as registry:
        pipe = samplerkit.load_pipeline({"pipeline": pipeline, "sampler": name}, registry=registry)
        x = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
        with pytest.raises(PluginError, match=rf"^sampler {name} \(plugin bad_sampler_plugin[^)]*\)\) {message}"):
            pipe.sample(x)


def test_good_sampler_output_passes_on_every_path():
    for pipeline in ([{"top_k": 3}], [{"top_p": 0.5}], [{"temperature": 0.5}, {"top_k": 2}], []):
        for sampler in ("greedy", "categorical"):
            pipe = samplerkit.load_pipeline({"pipeline": pipeline, "sampler": sampler})
            x = torch.randn(4, 2000, generator=torch.Generator().manual_seed(2))
            ids = pipe.sample(x)
            assert ids.shape == (4,)


def test_a_sampler_declaring_picks_argmax_skips_argmax_invariant_steps():
    class Argmax(Sampler):
        name = "my_argmax"
        picks_argmax = True

        def sample(self, logits, ctx):
            return logits.argmax(-1)

    class NamedGreedy(Sampler):        # a name proves nothing: it does not declare picks_argmax
        name = "greedy2"

        def sample(self, logits, ctx):
            return logits.argmax(-1)

    with temporary_plugin([Argmax, NamedGreedy]) as registry:
        steps = [{"temperature": 0.5}, {"top_k": 3}]
        fast = samplerkit.load_pipeline({"pipeline": steps, "sampler": "my_argmax"}, registry=registry).bind(1)
        plain = samplerkit.load_pipeline({"pipeline": steps, "sampler": "greedy2"}, registry=registry).bind(1)
        assert fast._plan.skip_for_sampling and not plain._plan.skip_for_sampling
        x = torch.randn(1, 50)
        assert torch.equal(fast.sample(x), plain.sample(x))


def test_no_builtin_special_cases_in_the_pipeline():
    source = (pathlib.Path(samplerkit.__file__).parent / "pipeline.py").read_text()
    assert '== "greedy"' not in source
    assert ".divisor =" not in source and 'getattr(deferred' not in source
