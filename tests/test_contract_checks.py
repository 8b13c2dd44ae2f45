"""The contract of the contract: check_backend, check_sampler's distribution test, the
argmax_invariant claim, check_step with nothing to test, Params and hook checks, and the seeded
sampler API (samplerkit.seeded)."""

from __future__ import annotations

import math
import types

import pytest
import torch
from pydantic import BaseModel, Field

import samplerkit
from samplerkit import PluginError, PrefillOutput, Processor, StepContext, StepParams
from samplerkit.builtins.backends.bigram import BigramBackend
from samplerkit.builtins.samplers.categorical import Categorical
from samplerkit.pipeline import Pipeline
from samplerkit.seeded import RESERVED_STREAMS, RowStreams, SeededSampler, SeedParams, stream_id
from samplerkit.testing import check_backend, check_plugin, check_processor, check_sampler, check_step, temporary_plugin
from samplerkit.testing.contract import chi_square

NEG_INF = float("-inf")


# -- check_backend: passes on the real backends ------------------------------------------------

def test_check_backend_passes_on_bigram():
    check_backend(BigramBackend())


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from samplerkit.testing.tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def test_check_backend_passes_on_llama_with_a_tiny_model(tiny_llama_dir):
    from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams

    check_backend(LlamaBackend(LlamaParams(model=str(tiny_llama_dir), cache=False)))


def test_check_backend_passes_on_samplerkit_transformers(tiny_llama_dir):
    from samplerkit_transformers.backend import TransformersBackend, TransformersParams

    check_backend(TransformersBackend(TransformersParams(model=str(tiny_llama_dir))))


# -- check_backend: deliberately broken backends --------------------------------------------------

class WideLogits(BigramBackend):
    name = "wide_logits"

    @property
    def vocab_size(self) -> int:
        return super().vocab_size + 1          # the model's output is one narrower


class IntEos(BigramBackend):
    name = "int_eos"

    @property
    def eos_token_ids(self):
        return 257


class LossyTokenizer(BigramBackend):
    name = "lossy_tokenizer"

    def detokenize(self, ids):
        return super().detokenize(ids)[:-1]


class TensorPrefill(BigramBackend):
    name = "tensor_prefill"

    def prefill(self, prompts, *, keep_all_logits=False):
        return super().prefill(prompts, keep_all_logits=keep_all_logits).last


class DoubleLogits(BigramBackend):
    name = "double_logits"

    def step(self, next_ids):
        return super().step(next_ids).double()


class StaleStep(BigramBackend):
    """Returns the logits of the cache *before* appending the token (an off-by-one)."""

    name = "stale_step"

    def step(self, next_ids):
        before = self.table[self._last]
        super().step(next_ids)
        return before


class BatchDependent(BigramBackend):
    """Padding leaks into the logits: a row depends on the longest prompt of its batch."""

    name = "batch_dependent"

    def prefill(self, prompts, *, keep_all_logits=False):
        out = super().prefill(prompts, keep_all_logits=keep_all_logits)
        longest = max(len(p) for p in prompts)
        shift = torch.tensor([0.01 * (longest - len(p)) for p in prompts]).unsqueeze(-1)
        return PrefillOutput(out.last + shift, out.all)


class NoAllLogits(BigramBackend):
    name = "no_all_logits"

    def prefill(self, prompts, *, keep_all_logits=False):
        return PrefillOutput(super().prefill(prompts).last, None)


class Positional(BigramBackend):
    """A bigram whose logits also depend on the row's length: a cache with real per-row state."""

    name = "positional"

    def prefill(self, prompts, *, keep_all_logits=False):
        out = super().prefill(prompts, keep_all_logits=keep_all_logits)
        self._length = torch.tensor([len(p) for p in prompts])
        every = None if out.all is None else [a + 0.01 * torch.arange(1, len(a) + 1).unsqueeze(-1) for a in out.all]
        return PrefillOutput(out.last + 0.01 * self._length.unsqueeze(-1), every)

    def step(self, next_ids):
        self._length = self._length + 1
        return super().step(next_ids) + 0.01 * self._length.unsqueeze(-1)

    def select_rows(self, keep):
        super().select_rows(keep)
        self._length = self._length[list(keep)]


def test_check_backend_passes_on_a_backend_with_per_row_state():
    check_backend(Positional())


class DedupSelect(Positional):
    """Drops repeated indices of select_rows (a set), so fan-out loses rows."""

    name = "dedup_select"

    def select_rows(self, keep):
        super().select_rows(sorted(set(keep)))


class LengthNotSelected(Positional):
    """Re-selects the tokens but forgets the lengths: rows get each other's positions."""

    name = "length_not_selected"

    def select_rows(self, keep):
        BigramBackend.select_rows(self, keep)


class NanStep(BigramBackend):
    name = "nan_step"

    def step(self, next_ids):
        out = super().step(next_ids).clone()
        out[0, 5] = float("nan")
        return out


@pytest.mark.parametrize("cls, needle", [
    (WideLogits, "logits of width 258 but vocab_size is 259"),
    (IntEos, "eos_token_ids must be a collection"),
    (LossyTokenizer, "does not round-trip"),
    (TensorPrefill, "prefill returned Tensor, expected samplerkit.PrefillOutput"),
    (DoubleLogits, "torch.float64 logits, expected torch.float32"),
    (StaleStep, "KV cache is inconsistent: at step 1"),
    (BatchDependent, "depend on the other prompts of the batch"),
    (NoAllLogits, "keep_all_logits=True"),
    (DedupSelect, r"select_rows\(\[2, 0, 0\]\)"),
    (LengthNotSelected, r"after select_rows\(\[2, 0, 0\]\) \(reorder, and row 0 duplicated\) step 1 differs"),
    (NanStep, "NaN logits in rows \\[0\\]"),
], ids=lambda v: v.name if isinstance(v, type) else None)
def test_check_backend_rejects_broken_backends(cls, needle):
    with pytest.raises(AssertionError, match=needle) as info:
        check_backend(cls())
    assert str(info.value).startswith(f"backend {cls.name!r} ({cls.__qualname__}): ")


def test_check_backend_names_a_backend_that_raises():
    class Raises(BigramBackend):
        name = "raises"

        def step(self, next_ids):
            raise RuntimeError("cache full")

    with pytest.raises(AssertionError, match=r"backend 'raises' \(.*Raises\): step \(step 1\) raised RuntimeError: cache full"):
        check_backend(Raises())


# -- check_sampler: the drawn distribution against the claimed one ----------------------------

class DrawsSharper(SeededSampler):
    """Claims softmax(x) (no distribution()) but draws softmax(2x)."""

    name = "draws_sharper"

    def sample(self, logits, ctx):
        return self.streams.race(logits * 2.0, ctx)


class ClaimsSharper(DrawsSharper):
    """The same draws, with the honest claim."""

    name = "claims_sharper"

    def distribution(self, logits, ctx):
        return torch.softmax(logits * 2.0, dim=-1)


def test_check_sampler_rejects_a_sampler_drawing_another_distribution():
    with pytest.raises(AssertionError, match=r"draws_sharper\(seed=None\) on test row 0: the drawn tokens do not follow "
                                             r"softmax\(logits\) \(chi-square .* p = .* < 1e-06\)"):
        check_sampler(DrawsSharper)


def test_check_sampler_accepts_the_same_draws_with_an_honest_claim():
    check_sampler(ClaimsSharper)


def test_check_sampler_accepts_categorical_and_a_seeded_sampler():
    check_sampler(Categorical)
    check_sampler(type("PlainSeeded", (SeededSampler,), {"name": "plain_seeded"}))


def test_check_sampler_gives_a_sampler_the_history_it_declares():
    class ReadsHistory(SeededSampler):
        name = "reads_history"
        uses = frozenset({"generated", "counts"})

        def sample(self, logits, ctx):
            assert ctx.generated is not None and ctx.counts is not None, "history missing"
            return self.streams.race(logits, ctx)

    check_sampler(ReadsHistory)


def test_chi_square_matches_closed_forms():
    # Two degrees of freedom: p = exp(-X^2 / 2).
    stat, dof, p = chi_square(torch.tensor([60.0, 20.0, 20.0]), torch.tensor([40.0, 30.0, 30.0]))
    assert dof == 2 and stat == pytest.approx(20 ** 2 / 40 + 2 * 10 ** 2 / 30)
    assert p == pytest.approx(math.exp(-stat / 2), rel=1e-9)
    # Small expected counts are pooled: 4 + 1 + 0 -> one bin of 5.
    stat, dof, p = chi_square(torch.tensor([50.0, 45.0, 4.0, 1.0, 0.0]), torch.tensor([50.0, 45.0, 3.0, 1.5, 0.5]))
    assert dof == 2 and stat == pytest.approx(0.0) and p == pytest.approx(1.0)


# -- argmax_invariant claims ----------------------------------------------------------------------

class _Bias(StepParams):
    bias: float = Field(0.0, ge=0.0, description="added to token 0; 0 disables")


class BoostsTokenZero(Processor):
    """Adds ``bias`` to token 0: changes the argmax, so it is not argmax-invariant."""

    name = "boosts_token_zero"
    Params = _Bias
    argmax_invariant = True          # wrong

    def apply(self, logits, ctx):
        logits[:, 0] += self.p.bias
        return logits


def test_a_wrong_argmax_invariant_claim_fails():
    with pytest.raises(AssertionError, match=r"boosts_token_zero\(bias=50.0\) declares argmax_invariant = True but "
                                             r"changed the top token of test row 0"):
        check_processor(BoostsTokenZero, [{"bias": 50.0}])
    honest = type("BoostsTokenZeroHonest", (BoostsTokenZero,), {"name": "boosts_honest", "argmax_invariant": False})
    check_processor(honest, [{"bias": 50.0}])


# -- check_step with nothing to test ------------------------------------------------------------

def test_check_step_with_nothing_to_test_fails():
    with pytest.raises(AssertionError, match=r"boosts_token_zero: nothing to test: .*Params has fields \['bias'\] .* "
                                             r"contract_examples\(\)"):
        check_step(BoostsTokenZero)
    with pytest.raises(AssertionError, match="nothing to test"):
        check_step(BoostsTokenZero, [{"bias": 0.0}])           # only the neutral value
    with pytest.raises(AssertionError, match=r"check_step needs a samplerkit.Processor or samplerkit.Sampler .*check_backend"):
        check_step(BigramBackend)


# -- Params must derive from StepParams ------------------------------------------------------------

class LooseParams(BaseModel):
    strength: float = 0.0


class BadParamsProcessor(Processor):
    name = "bad_params"
    Params = LooseParams

    def apply(self, logits, ctx):
        return logits


def test_params_not_derived_from_step_params_is_rejected_at_registration():
    with pytest.raises(PluginError, match=r"BadParamsProcessor.Params must be a subclass of samplerkit.StepParams"):
        with temporary_plugin(BadParamsProcessor, "bad", load_entry_points=False):
            pass


def test_params_not_derived_from_step_params_is_rejected_by_the_contract():
    with pytest.raises(AssertionError, match=r"Params must be a subclass of samplerkit.StepParams"):
        check_step(BadParamsProcessor)


# -- check_plugin: hooks without @hookimpl, misspelled hooks -------------------------------------

class Shift(Processor):
    name = "shift_for_plugin_check"
    Params = _Bias

    @classmethod
    def contract_examples(cls):
        return [{"bias": 1.0}]

    def apply(self, logits, ctx):
        return logits.add_(self.p.bias.unsqueeze(-1))


def _module(**functions) -> types.ModuleType:
    module = types.ModuleType("checked_plugin")
    for name, fn in functions.items():
        fn.__name__ = name
        setattr(module, name, fn)
    return module


def test_check_plugin_reports_a_hook_without_hookimpl():
    module = _module(register_processors=lambda: [Shift])
    with pytest.raises(AssertionError, match=r"plugin checked_plugin: \(1\) register_processors\(\) is not decorated with "
                                             r"@samplerkit.hookimpl, so samplerkit never calls it"):
        check_plugin(module)
    # ... which is a real bug: the registry silently registers nothing from it.
    with temporary_plugin(module, "checked_plugin", load_entry_points=False) as registry:
        assert not registry.has("processor", "shift_for_plugin_check")


def test_check_plugin_reports_misspelled_hooks():
    with pytest.raises(AssertionError, match=r"register_processor\(\) is decorated with @samplerkit.hookimpl but "
                                             r"samplerkit has no such hook; did you mean 'register_processors'\?"):
        check_plugin(_module(register_processor=samplerkit.hookimpl(lambda: [Shift])))
    with pytest.raises(AssertionError, match=r"register_sampler\(\) looks like the hook 'register_samplers' misspelled"):
        check_plugin(_module(register_sampler=lambda: []))
    with pytest.raises(AssertionError, match="no hook implementations"):
        check_plugin(_module())


def test_check_plugin_accepts_a_good_plugin_and_runs_the_contract():
    check_plugin(_module(register_processors=samplerkit.hookimpl(lambda: [Shift])))
    with pytest.raises(AssertionError, match="rejected at registration: .*BadParamsProcessor.Params"):
        check_plugin(_module(register_processors=samplerkit.hookimpl(lambda: [BadParamsProcessor])))
    with pytest.raises(AssertionError, match="nothing to test"):
        check_plugin(_module(register_processors=samplerkit.hookimpl(lambda: [BoostsTokenZero])))


# -- the seeded sampler API -----------------------------------------------------------------------

def test_row_streams_follow_rows_through_compaction_and_fan_out():
    class Plain(SeededSampler):
        name = "plain_follow"

    pipe = Pipeline([], sampler=Plain.spec())                 # unseeded: seeds drawn per row
    bound = pipe.bind(3)
    seeds = bound.sampler.streams.seeds.clone()
    smaller = bound.select_rows([2, 0, 0])
    assert isinstance(smaller.sampler, Plain)
    assert smaller.sampler.streams.seeds.tolist() == seeds[[2, 0, 0]].tolist()
    # A row's draw is the same before and after compaction (same seed, same counter).
    logits = torch.randn(3, 40)
    ctx = StepContext(3, 40)
    before = bound.sample(logits, ctx)
    ctx.select_rows([2, 0, 0])
    after = smaller.sample(logits[[2, 0, 0]], ctx)
    assert after.tolist() == before[[2, 0, 0]].tolist()


def test_row_streams_seeds_and_streams():
    rows = [SeedParams(seed=5), SeedParams(), SeedParams(seed=5)]
    streams = RowStreams.for_rows(rows)
    assert streams.seeds[0] == streams.seeds[2] == 5
    ctx = StepContext(3, 10)
    u = streams.uniform(ctx, stream_id("test.coin"))
    assert u.dtype == torch.float64 and u[0] == u[2] and bool(((u >= 0) & (u < 1)).all())
    assert streams.uniform(ctx, stream_id("test.other"))[0] != u[0]          # streams are independent
    with pytest.raises(ValueError, match="reserved for the block stage"):
        streams.uniform(ctx, 3)
    assert set(RESERVED_STREAMS) >= {0, 3}
    with pytest.raises(ValueError, match="namespaced by your plugin"):
        stream_id("coin")
    assert streams.select([1, 1]).seeds.tolist() == [int(streams.seeds[1])] * 2
    g = streams.gumbel(ctx, torch.arange(10))
    assert g.shape == (3, 10) and torch.equal(g[0], g[2])
    with pytest.raises(ValueError, match=r"\[B\] int64 seeds"):
        RowStreams(torch.zeros(3))


def test_only_active_rows_draw_a_seed_from_the_global_generator():
    torch.manual_seed(0)
    RowStreams.for_rows([SeedParams(), SeedParams()], draw_for=[False, True])
    after_one = torch.randint(0, 10**9, ()).item()
    torch.manual_seed(0)
    torch.randint(0, 2**62, ())
    assert torch.randint(0, 10**9, ()).item() == after_one
