"""The contract every processor and sampler must meet, as plain checks plugin authors run.

:func:`check_processor` and :func:`check_sampler` raise :class:`AssertionError` with a message
naming the class, the parameters and the row that broke the rule. The rules:

- shape and dtype: processors map ``[B, V]`` float32 to ``[B, V]`` float32; samplers map it
  to ``[B]`` int64 ids in ``[0, V)``, always of a finite logit;
- neutral parameters (every field at its default) are the identity, bitwise, also for the
  neutral rows of a batch whose other rows are active;
- rows are independent: a row's output is the same alone as in a batch with other logits and
  other parameters, at any position;
- the pipeline never modifies the caller's logits (samplers must not modify their input at
  all: without active processors they receive the caller's tensor);
- every row keeps at least one finite logit, and no NaN appears;
- seeded samplers are reproducible and batch-independent, and their streams advance with the
  row's step counter.

Example parameters: pass ``params_examples``; otherwise a class may define a classmethod
``contract_examples()`` returning a list of dicts; otherwise only the neutral parameters (and
for seeded samplers a few seeds) are checked. The built-ins' examples are in
:data:`BUILTIN_EXAMPLES`.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from samplerkit.context import StepContext
from samplerkit.fastpath import FastPathProcessor, FastPathSampler
from samplerkit.ops.truncation import Cut, cut_below
from samplerkit.params import StepParams
from samplerkit.steps import Processor, Sampler

_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")

#: Non-neutral example parameters of the built-in steps, keyed by ``module.qualname`` (so a
#: third-party class that reuses a built-in's ``name`` does not inherit them).
BUILTIN_EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "samplerkit.builtins.shaping.temperature.Temperature": [
        {"temperature": 0.5}, {"temperature": 2.0}, {"temperature": 0.0}, {"temperature": 1e-3}],
    "samplerkit.builtins.truncation.top_k.TopK": [
        {"top_k": 1}, {"top_k": 3}, {"top_k": 10}, {"top_k": 1000}],
    "samplerkit.builtins.truncation.top_p.TopP": [
        {"top_p": 0.05}, {"top_p": 0.5}, {"top_p": 0.9}, {"top_p": 0.999}],
    "samplerkit.builtins.truncation.min_p.MinP": [
        {"min_p": 0.05}, {"min_p": 0.5}, {"min_p": 1.0}],
    "samplerkit.builtins.penalties.repetition_penalty.RepetitionPenalty": [
        {"repetition_penalty": 1.3}, {"repetition_penalty": 0.7, "last_n": 2},
        {"repetition_penalty": 5.0, "include_prompt": False}],
    "samplerkit.builtins.penalties.frequency_presence.FrequencyPenalty": [
        {"frequency_penalty": 0.5}, {"frequency_penalty": -2.0}, {"frequency_penalty": 2.0}],
    "samplerkit.builtins.penalties.frequency_presence.PresencePenalty": [
        {"presence_penalty": 0.5}, {"presence_penalty": -2.0}, {"presence_penalty": 2.0}],
    "samplerkit.builtins.penalties.logit_bias.LogitBias": [
        {"bias": {0: 5.0, 31: -100.0}}, {"bias": {3: 0.5}}, {"bias": {10: 100.0, 11: -0.25}}],
    "samplerkit.builtins.penalties.bad_words.BadWords": [
        {"bad_words": [[0], [5, 6]]}, {"bad_words": [[1, 2, 3], [31], [10]]}, {"bad_words": [[7, 8], [14]]}],
    "samplerkit.builtins.penalties.allowed_tokens.AllowedTokens": [
        {"allowed_tokens": [0, 1, 2]}, {"allowed_tokens": [31]}, {"allowed_tokens": [10, 16]}],
    "samplerkit.builtins.penalties.min_tokens.MinTokens": [
        {"min_tokens": 5, "eos_token_ids": [0, 31]}, {"min_tokens": 1, "eos_token_ids": [10]},
        {"min_tokens": 100, "eos_token_ids": [10, 11]}],
    "samplerkit.builtins.penalties.no_repeat_ngram.NoRepeatNgram": [
        {"no_repeat_ngram": 1}, {"no_repeat_ngram": 2}, {"no_repeat_ngram": 3}],
    "samplerkit.builtins.penalties.dry.Dry": [
        {"multiplier": 0.8}, {"multiplier": 2.0, "base": 3.0, "allowed_length": 1, "sequence_breakers": [0]},
        {"multiplier": 1e30, "base": 100.0, "allowed_length": 1, "penalty_last_n": 4}],
    "samplerkit.builtins.samplers.categorical.Categorical": [
        {"seed": 0}, {"seed": 12345}, {"seed": 2**62 + 7}, {"seed": None}],
    "samplerkit.builtins.samplers.greedy.Greedy": [],
    "samplerkit.builtins.truncation.typical.TypicalP": [
        {"typical_p": 0.2}, {"typical_p": 0.9}, {"typical_p": 0.5, "min_tokens_to_keep": 3}],
    "samplerkit.builtins.truncation.cutoffs.EpsilonCutoff": [
        {"epsilon_cutoff": 3e-4}, {"epsilon_cutoff": 0.05}, {"epsilon_cutoff": 0.9, "min_tokens_to_keep": 2}],
    "samplerkit.builtins.truncation.cutoffs.EtaCutoff": [
        {"eta_cutoff": 2e-3}, {"eta_cutoff": 0.1}, {"eta_cutoff": 0.9, "min_tokens_to_keep": 3}],
    "samplerkit.builtins.truncation.top_a.TopA": [{"top_a": 0.2}, {"top_a": 1.0}],
    "samplerkit.builtins.truncation.tfs.TailFree": [{"tfs": 0.95}, {"tfs": 0.5}, {"tfs": 0.0, "min_keep": 2}],
    "samplerkit.builtins.truncation.top_n_sigma.TopNSigma": [{"top_n_sigma": 1.0}, {"top_n_sigma": 0.1}, {"top_n_sigma": 3.0}],
    "samplerkit.builtins.shaping.dynamic_temperature.DynamicTemperature": [
        {"low": 0.5, "high": 1.5}, {"low": 0.0, "high": 2.0, "exponent": 0.5}, {"low": 0.7, "high": 0.7}],
    "samplerkit.builtins.shaping.smoothing.Smoothing": [
        {"smoothing_factor": 0.3}, {"smoothing_factor": 2.0, "smoothing_curve": 2.5}],
    "samplerkit.builtins.truncation.xtc.Xtc": [
        {"threshold": 0.1, "probability": 1.0, "seed": 0}, {"threshold": 0.05, "probability": 0.5, "seed": 7}],
}

_DEFAULT_SEEDS = (0, 1, 987654321)


# -- examples and test data ---------------------------------------------------------------

def examples_for(cls: type, params_examples: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The example parameter dicts to check ``cls`` with (the neutral ``{}`` not included)."""
    if params_examples is not None:
        return [dict(e) for e in params_examples]
    own = getattr(cls, "contract_examples", None)
    if callable(own):
        return [dict(e) for e in own()]
    return [dict(e) for e in BUILTIN_EXAMPLES.get(f"{cls.__module__}.{cls.__qualname__}", [])]


def _logit_cases(vocab: int, seed: int) -> torch.Tensor:
    """Ordinary and adversarial rows ``[C, V]``: random, flat, ties, mostly ``-inf``, huge and tiny."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.randn(vocab, generator=g) * 3,
        torch.randn(vocab, generator=g),
        torch.zeros(vocab),                                            # flat
        torch.full((vocab,), -7.25),                                   # flat, negative
        torch.randint(0, 3, (vocab,), generator=g).float(),            # many ties
        torch.randn(vocab, generator=g) * 1e4,                         # huge magnitudes
        torch.randn(vocab, generator=g) * 1e-6,                        # tiny differences
    ]
    tied_top = torch.randn(vocab, generator=g)
    tied_top[[1, vocab // 2, vocab - 1]] = tied_top.max() + 2.0          # a 3-way tie at the top
    rows.append(tied_top)
    one_finite = torch.full((vocab,), float("-inf"))
    one_finite[vocab // 3] = 0.5
    rows.append(one_finite)
    two_finite = torch.full((vocab,), float("-inf"))
    two_finite[[0, vocab - 1]] = torch.tensor([1.0, 1.0])
    rows.append(two_finite)
    half_masked = torch.randn(vocab, generator=g) * 2
    half_masked[torch.randperm(vocab, generator=g)[: vocab // 2]] = float("-inf")
    rows.append(half_masked)
    return torch.stack(rows).to(torch.float32)


def _history(batch: int, vocab: int, steps: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (batch, steps), generator=g)


def _context(cls: type, history: torch.Tensor, vocab: int, prompts: list[list[int]]) -> StepContext:
    """A context with ``history`` already generated (so steps that use history see some)."""
    batch, steps = history.shape
    ctx = StepContext(batch, vocab, prompt_ids=prompts, uses=frozenset(getattr(cls, "uses", frozenset())),
                      max_new_tokens=steps + 8)
    for t in range(steps):
        ctx.append(history[:, t].contiguous())
    return ctx


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    return [[(7 * i + j) % vocab for j in range(1 + i % 4)] for i in range(batch)]


def _describe(params: StepParams) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.model_dump().items()) or "no parameters"


def _check_class(cls: Any, base: type) -> None:
    assert isinstance(cls, type) and issubclass(cls, base), f"{cls!r} is not a subclass of samplerkit.{base.__name__}"
    name = getattr(cls, "name", None)
    assert isinstance(name, str) and _SNAKE.match(name), \
        f"{cls.__qualname__}.name must be a snake_case string, got {name!r}"
    params_cls = getattr(cls, "Params", None)
    assert isinstance(params_cls, type) and issubclass(params_cls, StepParams), \
        f"{cls.__qualname__}.Params must be a subclass of samplerkit.StepParams"
    try:
        neutral = params_cls()
    except Exception as exc:  # pragma: no cover - message only
        raise AssertionError(f"{cls.__qualname__}.Params() must be valid with every default "
                             f"(the defaults are the neutral values): {exc}") from None
    # A step without parameters cannot be switched off: it always runs (is_neutral is False).
    assert neutral.is_neutral() or not params_cls.model_fields, f"{cls.__qualname__}.Params().is_neutral() must be True"
    for field_name, field in params_cls.model_fields.items():
        assert field.description, f"{cls.__qualname__}.Params.{field_name} needs a description (it is the documentation)"


def _validated(cls: type, examples: list[dict[str, Any]]) -> list[StepParams]:
    out = []
    for ex in examples:
        try:
            out.append(cls.Params(**ex))
        except Exception as exc:
            raise AssertionError(f"{cls.name}: example parameters {ex!r} do not validate: {exc}") from None
    return out


# -- processors ---------------------------------------------------------------------------

def _apply(cls: type, rows: Sequence[StepParams], logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    step = cls(list(rows), "cpu")
    out = step.apply(logits, ctx)
    where = f"{cls.name}.apply with [{'; '.join(_describe(r) for r in rows[:3])}{'; ...' if len(rows) > 3 else ''}]"
    assert isinstance(out, torch.Tensor), f"{where} returned {type(out).__name__}, not a tensor"
    assert out.shape == logits.shape, f"{where} returned shape {tuple(out.shape)}, expected {tuple(logits.shape)}"
    assert out.dtype == torch.float32, f"{where} returned {out.dtype}, expected torch.float32"
    return out


def _assert_rows_equal(actual: torch.Tensor, expected: torch.Tensor, what: str, *, exact: bool) -> None:
    kept_a, kept_e = torch.isfinite(actual), torch.isfinite(expected)
    assert torch.equal(kept_a, kept_e), (
        f"{what}: kept tokens differ: {kept_a.nonzero()[:, -1].tolist()} vs {kept_e.nonzero()[:, -1].tolist()}")
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    if exact:
        same = (actual == expected) | (actual.isnan() & expected.isnan())
        assert bool(same.all()), f"{what}: values differ (max abs diff {float((actual - expected)[kept_a].abs().max()):g})"
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_processor(cls: type, params_examples: Sequence[Mapping[str, Any]] | None = None, *,
                    vocab_size: int = 32, seed: int = 0, exact: bool = True) -> None:
    """Check that processor class ``cls`` meets the contract (raises AssertionError).

    ``params_examples``: non-neutral parameter dicts to try (see :func:`examples_for`).
    ``exact``: rows must be *bitwise* independent of their batch (turn off for processors
    whose float arithmetic depends on the batch shape; kept sets must still match exactly).
    """
    _check_class(cls, Processor)
    examples = examples_for(cls, params_examples)
    neutral = cls.Params()
    params = [neutral, *_validated(cls, examples)]
    _require_something_to_test(cls, params, "check_processor")
    logits = _logit_cases(vocab_size, seed)
    batch = logits.shape[0]
    prompts = _prompts(batch, vocab_size)
    history = _history(batch, vocab_size, 3, seed)

    def ctx_for(rows: Sequence[int] | None = None) -> StepContext:
        ctx = _context(cls, history, vocab_size, prompts)
        if rows is not None:
            ctx.select_rows(list(rows))
        return ctx

    # Neutral parameters: the identity, bitwise (a step without parameters has none).
    if neutral.is_neutral():
        out = _apply(cls, [neutral] * batch, logits.clone(), ctx_for())
        _assert_rows_equal(out, logits, f"{cls.name} with neutral parameters must be the identity", exact=True)

    # Each example on every kind of row: finite survivors, no NaN.
    for p in params:
        out = _apply(cls, [p] * batch, logits.clone(), ctx_for())
        for i in range(batch):
            what = f"{cls.name}({_describe(p)}) on test row {i}"
            assert not bool(out[i].isnan().any()), f"{what}: produced NaN"
            assert bool(torch.isfinite(out[i]).any()), f"{what}: removed every token (at least one must stay finite)"
        if cls.argmax_invariant:
            _assert_argmax_kept(cls, p, logits, out)
        _assert_declared_bounds(cls, p, logits, out, ctx_for)

    # Rows independent: a mixed batch vs each row alone, and the batch reversed.
    assignments = [[params[(i + shift) % len(params)] for i in range(batch)] for shift in range(min(len(params), 3))]
    for rows in assignments:
        mixed = _apply(cls, rows, logits.clone(), ctx_for())
        order = list(reversed(range(batch)))
        flipped = _apply(cls, [rows[i] for i in order], logits[order].clone(), ctx_for(order))
        for i in range(batch):
            alone = _apply(cls, [rows[i]], logits[i:i + 1].clone(), ctx_for([i]))
            what = f"{cls.name}({_describe(rows[i])}) row {i}"
            if rows[i].is_neutral():
                _assert_rows_equal(mixed[i:i + 1], logits[i:i + 1],
                                   f"{what}: a neutral row in a batch with active rows must be unchanged", exact=True)
            _assert_rows_equal(mixed[i:i + 1], alone, f"{what}: output in a mixed batch differs from the row alone",
                               exact=exact)
            j = order.index(i)
            _assert_rows_equal(flipped[j:j + 1], alone, f"{what}: output depends on the row's position", exact=exact)

    # Through the pipeline: the caller's tensor is never modified; process == apply.
    from samplerkit.builtins.samplers.greedy import Greedy
    from samplerkit.pipeline import Pipeline

    for p in params:
        pipe = Pipeline([cls.spec(**p.model_dump())], sampler=Greedy.spec())
        caller = logits.clone()
        ctx = ctx_for()
        processed = pipe.bind(batch).process(caller, ctx)
        assert torch.equal(caller, logits), f"{cls.name}({_describe(p)}): the pipeline modified the caller's logits"
        expected = _apply(cls, [p] * batch, logits.clone(), ctx_for())
        _assert_rows_equal(processed, expected, f"{cls.name}({_describe(p)}): pipeline.process differs from apply",
                           exact=exact)
        pipe.bind(batch).sample(caller, ctx_for())
        assert torch.equal(caller, logits), f"{cls.name}({_describe(p)}): pipeline.sample modified the caller's logits"

    _check_processor_candidates(cls, params, seed)


def _require_something_to_test(cls: type, params: list[StepParams], check: str) -> None:
    """A step with parameters but no non-neutral example would only be checked as the identity:
    fail instead of passing vacuously."""
    fields = list(cls.Params.model_fields)
    if issubclass(cls, Sampler) and cls.stochastic and "seed" in fields:
        fields.remove("seed")          # check_sampler tries a few seeds of its own
    if fields and all(p.is_neutral() for p in params):
        raise AssertionError(
            f"{cls.name}: nothing to test: {cls.__qualname__}.Params has fields {fields} but no example "
            f"parameters that change anything (every example is neutral). Pass non-neutral examples, "
            f"{check}({cls.__qualname__}, [{{{fields[0]!r}: ...}}]), or define a classmethod "
            f"contract_examples() on {cls.__qualname__} returning them.")


def _assert_argmax_kept(cls: type, p: StepParams, logits: torch.Tensor, out: torch.Tensor) -> None:
    """``argmax_invariant = True`` claims the step never changes which token has the highest
    logit: the output's top token must be one of the input's top tokens (ties allowed)."""
    top_out = out.argmax(dim=-1)
    row_max = logits.max(dim=-1).values
    moved = (logits.gather(1, top_out.unsqueeze(1)).squeeze(1) != row_max).nonzero().squeeze(-1).tolist()
    if moved:
        i = moved[0]
        was = (logits[i] == row_max[i]).nonzero().squeeze(-1).tolist()
        raise AssertionError(
            f"{cls.name}({_describe(p)}) declares argmax_invariant = True but changed the top token of "
            f"test row {i} (rows {moved} in all): input top token(s) {was}, output top token "
            f"{int(top_out[i])}. A greedy pipeline skips argmax-invariant steps, so this step would be "
            f"silently ignored there: set argmax_invariant = False on {cls.__qualname__}.")


def _assert_declared_bounds(cls: type, p: StepParams, logits: torch.Tensor, out: torch.Tensor, ctx_for) -> None:
    """The kept-set claims ``samplerkit lint`` reasons from: ``kept_at_most(p)`` bounds every
    row's kept count; a row with at most ``keeps_all_of(p)`` finite logits keeps all of them; a
    ``scale_invariant`` truncation keeps the same set of ``x / 2`` and ``x * 2`` (powers of two:
    float32 scales them exactly)."""
    what = f"{cls.name}({_describe(p)})"
    kept, had = torch.isfinite(out).sum(-1), torch.isfinite(logits).sum(-1)
    most = cls.kept_at_most(p)
    if most is not None:
        over = (kept > most).nonzero().squeeze(-1).tolist()
        assert not over, (f"{what} declares kept_at_most = {most} but test row {over[0]} kept {int(kept[over[0]])} "
                          f"tokens: fix {cls.__qualname__}.kept_at_most")
    whole = cls.keeps_all_of(p)
    for i in (had <= whole).nonzero().squeeze(-1).tolist():
        assert int(kept[i]) == int(had[i]), (
            f"{what} declares keeps_all_of = {whole} but removed tokens from test row {i}, which has {int(had[i])} "
            f"finite logits: fix {cls.__qualname__}.keeps_all_of")
    if getattr(cls, "scale_invariant", False) and not p.is_neutral():
        for factor in (0.5, 2.0):
            scaled = _apply(cls, [p] * logits.shape[0], logits * factor, ctx_for())
            moved = (torch.isfinite(scaled) != torch.isfinite(out)).any(-1).nonzero().squeeze(-1).tolist()
            assert not moved, (f"{what} declares scale_invariant = True but keeps other tokens of test row "
                               f"{moved[0]} once its logits are multiplied by {factor}: set scale_invariant = False")


def _overrides(cls: type, base: type, method: str) -> bool:
    return getattr(cls, method) is not getattr(base, method)


def _candidate_logits(seed: int, batch: int = 8, vocab: int = 1024) -> torch.Tensor:
    """Large-vocabulary rows from flat to peaked, so fast paths both engage and decline."""
    g = torch.Generator().manual_seed(seed + 2)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0])[:batch].unsqueeze(-1)
    x = torch.randn(batch, vocab, generator=g) * scales
    x[-1, 100:] = float("-inf")          # a row that is already truncated
    return x


def _candidate_list(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = x.topk(k, dim=-1)
    return values, ids


def _check_processor_candidates(cls: type, params: list[StepParams], seed: int) -> None:
    """``select_candidates`` / ``apply_candidates`` (optional fast paths) must equal ``apply`` exactly."""
    from samplerkit.ops.candidates import densify

    if not issubclass(cls, FastPathProcessor) or not (_overrides(cls, FastPathProcessor, "select_candidates")
                                                      or _overrides(cls, FastPathProcessor, "apply_candidates")):
        return
    logits = _candidate_logits(seed)
    batch, vocab = logits.shape
    active = [p for p in params if not p.is_neutral()]
    batches = [[p] * batch for p in params]
    if len(active) > 1:
        batches.append([active[i % len(active)] for i in range(batch)])
    if active:
        batches.append([params[i % len(params)] for i in range(batch)])      # neutral rows mixed in
    for rows in batches:
        label = f"{cls.name}([{'; '.join(_describe(r) for r in rows[:3])}{'; ...' if len(rows) > 3 else ''}])"
        ctx = lambda: StepContext(batch, vocab, uses=frozenset(getattr(cls, "uses", frozenset())), max_new_tokens=4)  # noqa: E731
        expected = cls(rows, "cpu").apply(logits.clone(), ctx())
        given = logits.clone()
        selected = cls(rows, "cpu").select_candidates(given, ctx())
        if isinstance(selected, Cut):         # decided densely: the pipeline applies the threshold
            _assert_rows_equal(cut_below(given, selected.threshold), expected,
                               f"{label}.select_candidates returned a Cut that differs from apply", exact=True)
        elif selected is not None:
            values, ids = selected
            assert values.shape == ids.shape and values.dim() == 2 and values.shape[0] == batch, \
                f"{label}.select_candidates returned shapes {tuple(values.shape)} and {tuple(ids.shape)}"
            assert values.dtype == torch.float32 and ids.dtype == torch.int64, \
                f"{label}.select_candidates returned {values.dtype}/{ids.dtype}, expected float32/int64"
            assert bool((values[:, :-1] >= values[:, 1:]).all()), f"{label}.select_candidates: values not sorted descending"
            _assert_rows_equal(densify(values, ids, vocab), expected,
                               f"{label}.select_candidates differs from apply", exact=True)
        for k in (1, 5, 64, 300):
            values, ids = _candidate_list(logits, k)
            dense = densify(values, ids, vocab)
            expected = cls(rows, "cpu").apply(dense.clone(), ctx())
            ids_in = ids.clone()
            got = cls(rows, "cpu").apply_candidates(values.clone(), ids_in, ctx())
            if got is None:
                continue
            assert got.shape == values.shape and got.dtype == torch.float32, \
                f"{label}.apply_candidates returned {tuple(got.shape)} {got.dtype}, expected {tuple(values.shape)} float32"
            finite = torch.isfinite(got)
            ordered = (got[:, :-1] >= got[:, 1:]) | ~finite[:, 1:]
            assert bool(ordered.all()), f"{label}.apply_candidates (K={k}): values not sorted descending"
            _assert_rows_equal(densify(got, ids_in, vocab), expected,
                               f"{label}.apply_candidates (K={k}) differs from apply on the dense row", exact=True)


# -- samplers -----------------------------------------------------------------------------

def _sample(cls: type, rows: Sequence[StepParams], logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    step = cls(list(rows), "cpu")
    before = logits.clone()
    ids = step.sample(logits, ctx)
    where = f"{cls.name}.sample with [{'; '.join(_describe(r) for r in rows[:3])}{'; ...' if len(rows) > 3 else ''}]"
    assert torch.equal(logits, before), f"{where} modified its input logits (it may be the caller's tensor)"
    assert isinstance(ids, torch.Tensor), f"{where} returned {type(ids).__name__}, not a tensor"
    assert ids.shape == (logits.shape[0],), f"{where} returned shape {tuple(ids.shape)}, expected ({logits.shape[0]},)"
    assert ids.dtype == torch.int64, f"{where} returned {ids.dtype}, expected torch.int64"
    assert bool(((ids >= 0) & (ids < logits.shape[1])).all()), f"{where} returned ids outside [0, {logits.shape[1]}): {ids.tolist()}"
    chosen = logits.gather(1, ids.unsqueeze(1)).squeeze(1)
    bad = (~torch.isfinite(chosen)).nonzero().squeeze(-1).tolist()
    assert not bad, f"{where} chose a -inf (removed) token in rows {bad}: ids {ids[bad].tolist()}"
    return ids


def check_sampler(cls: type, params_examples: Sequence[Mapping[str, Any]] | None = None, *,
                  vocab_size: int = 32, seed: int = 0, steps: int = 4, draws: int = 2000) -> None:
    """Check that sampler class ``cls`` meets the contract (raises AssertionError).

    A stochastic sampler's draws are tested against the distribution it claims (its
    ``distribution(logits, ctx)`` method, else ``softmax(logits)``) by a chi-square test at
    level ``1e-6``, ``draws`` draws per test row (see :func:`check_distribution`). 2,000 draws
    catch a sampler drawing ``softmax(2x)`` instead of ``softmax(x)``; raise ``draws`` to detect
    subtler biases.
    """
    _check_class(cls, Sampler)
    examples = examples_for(cls, params_examples)
    params = [cls.Params(), *_validated(cls, examples)]
    _require_something_to_test(cls, params, "check_sampler")
    logits = _logit_cases(vocab_size, seed)
    batch = logits.shape[0]
    prompts = _prompts(batch, vocab_size)
    history = _history(batch, vocab_size, steps, seed)
    seeded = "seed" in cls.Params.model_fields

    def ctx_at(t: int, rows: Sequence[int] | None = None) -> StepContext:
        ctx = _context(cls, history[:, :t], vocab_size, prompts)
        if rows is not None:
            ctx.select_rows(list(rows))
        return ctx

    # Shape, dtype, range, finite choice, input untouched; a single finite token is chosen.
    for p in params:
        for t in range(steps):
            ids = _sample(cls, [p] * batch, logits.clone(), ctx_at(t))
            assert int(ids[8]) == vocab_size // 3, \
                f"{cls.name}({_describe(p)}): the only finite token of a row is {vocab_size // 3}, got {int(ids[8])}"

    def reproducible(p: StepParams) -> bool:
        return not cls.stochastic or (seeded and getattr(p, "seed", None) is not None)

    # Rows independent (deterministic samplers and seeded rows): alone, in a batch, reversed.
    fixed = [p for p in params if reproducible(p)]
    if seeded and cls.stochastic:
        fixed += [cls.Params(seed=s) for s in _DEFAULT_SEEDS]
    if fixed:
        rows = [fixed[i % len(fixed)] for i in range(batch)]
        order = list(reversed(range(batch)))
        for t in range(steps):
            mixed = _sample(cls, rows, logits.clone(), ctx_at(t))
            again = _sample(cls, rows, logits.clone(), ctx_at(t))
            assert torch.equal(mixed, again), f"{cls.name}: the same parameters and seeds drew {mixed.tolist()} then {again.tolist()}"
            flipped = _sample(cls, [rows[i] for i in order], logits[order].clone(), ctx_at(t, order))
            for i in range(batch):
                alone = _sample(cls, [rows[i]], logits[i:i + 1].clone(), ctx_at(t, [i]))
                what = f"{cls.name}({_describe(rows[i])}) row {i} at step {t}"
                assert int(mixed[i]) == int(alone[0]), f"{what}: drew {int(mixed[i])} in a batch but {int(alone[0])} alone"
                assert int(flipped[order.index(i)]) == int(alone[0]), f"{what}: the draw depends on the row's position"

    if cls.stochastic and seeded:
        flat = torch.zeros(1, vocab_size)
        # The stream advances with the row's step counter ...
        seen = set()
        for t in range(16):
            ctx = StepContext(1, vocab_size, uses=frozenset(getattr(cls, "uses", frozenset())), max_new_tokens=16)
            ctx.num_generated.fill_(t)
            seen.add(int(_sample(cls, [cls.Params(seed=_DEFAULT_SEEDS[0])], flat.clone(), ctx)[0]))
        assert len(seen) > 1, f"{cls.name}: a seeded row drew {seen} at 16 consecutive steps of a flat distribution"
        # ... and different seeds give different streams.
        many = _sample(cls, [cls.Params(seed=s) for s in range(16)], flat.expand(16, -1).clone(),
                       StepContext(16, vocab_size, uses=frozenset(getattr(cls, "uses", frozenset())), max_new_tokens=1))
        assert len(set(many.tolist())) > 1, f"{cls.name}: seeds 0..15 all drew {many.tolist()} on a flat distribution"

    # The optional candidate fast path draws what sample() draws on the dense row.
    if issubclass(cls, FastPathSampler) and _overrides(cls, FastPathSampler, "sample_candidates"):
        from samplerkit.ops.candidates import densify

        big = _candidate_logits(seed)
        batch_big, vocab_big = big.shape
        for p in fixed:               # reproducible rows only
            for k in (1, 7, 64, 65, 300):
                values, ids = _candidate_list(big, k)
                for t in (0, 3):
                    ctx = StepContext(batch_big, vocab_big, uses=frozenset(getattr(cls, "uses", frozenset())), max_new_tokens=4)
                    ctx.num_generated.fill_(t)
                    got = cls([p] * batch_big, "cpu").sample_candidates(values.clone(), ids.clone(), ctx)
                    if got is None:
                        continue
                    dense = _sample(cls, [p] * batch_big, densify(values, ids, vocab_big), ctx)
                    assert torch.equal(got, dense), (f"{cls.name}({_describe(p)}).sample_candidates (K={k}, step {t}) "
                                                     f"drew {got.tolist()} but sample() on the dense rows drew {dense.tolist()}")

    # The draws follow the claimed distribution.
    if cls.stochastic or callable(getattr(cls, "distribution", None)):
        for p in _distinct_distributions(params):
            check_distribution(cls, p, logits, prompts, draws=draws)

    # Through the pipeline: the caller's tensor is never modified.
    from samplerkit.pipeline import Pipeline

    for p in params:
        pipe = Pipeline([], sampler=cls.spec(**p.model_dump()))
        caller = logits.clone()
        pipe.bind(batch).sample(caller, ctx_at(steps - 1))      # the history the sampler declared in `uses`
        assert torch.equal(caller, logits), f"{cls.name}({_describe(p)}): pipeline.sample modified the caller's logits"


#: Significance level of the distribution test: a correct sampler fails it once in a million runs.
ALPHA = 1e-6


def claimed_distribution(step: Sampler, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """The probabilities ``[B, V]`` (float64) a sampler instance claims to draw from: its
    ``distribution(logits, ctx)`` method when it has one, else ``softmax(logits)``."""
    own = getattr(step, "distribution", None)
    if callable(own):
        probs = own(logits.clone(), ctx)
        where = f"{type(step).__qualname__}.distribution"
        assert isinstance(probs, torch.Tensor) and probs.shape == logits.shape, \
            f"{where} must return [B, V] probabilities shaped like the logits {tuple(logits.shape)}, got {probs!r:.80}"
        probs = probs.to(torch.float64)
        assert bool((probs >= 0).all()) and torch.allclose(probs.sum(-1), torch.ones(probs.shape[0], dtype=torch.float64), atol=1e-4), \
            f"{where} must return nonnegative rows that sum to 1, got row sums {probs.sum(-1).tolist()[:4]}"
        return probs
    return torch.softmax(logits.to(torch.float64), dim=-1)


def chi_square(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's chi-square goodness of fit: ``(statistic, degrees of freedom, p-value)``.

    ``X^2 = sum_j (O_j - E_j)^2 / E_j`` over bins with ``E_j >= 5``; the tokens with smaller
    expected counts are pooled into one bin (the usual validity rule of the test). With ``k``
    bins, ``X^2`` is asymptotically chi-square with ``k - 1`` degrees of freedom, and the
    p-value is ``Q((k - 1) / 2, X^2 / 2)``, the regularised upper incomplete gamma function.
    Returns p-value 1.0 when fewer than two bins remain (nothing to compare).
    """
    observed = observed.to(torch.float64)
    expected = expected.to(torch.float64)
    big = expected >= 5.0
    obs = observed[big]
    exp = expected[big]
    rest_e = expected[~big].sum()
    if rest_e > 0:
        obs = torch.cat([obs, observed[~big].sum().reshape(1)])
        exp = torch.cat([exp, rest_e.reshape(1)])
    if obs.numel() < 2:
        return 0.0, 0, 1.0
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    pvalue = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                           torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, dof, pvalue


def _distinct_distributions(params: list[StepParams]) -> list[StepParams]:
    """One example per distinct set of parameters other than ``seed``, plus one with a fixed seed
    (its draws run along one row's stream) and one without: the seed changes the draws, not the
    distribution, and each test costs thousands of draws."""
    chosen: dict[tuple, StepParams] = {}
    for p in params:
        rest = tuple(sorted((k, repr(v)) for k, v in p.model_dump().items() if k != "seed"))
        chosen.setdefault((rest, getattr(p, "seed", None) is None), p)
    return list(chosen.values())


def check_distribution(cls: type, params: StepParams, logits: torch.Tensor, prompts: list[list[int]] | None = None,
                       *, draws: int = 2000, alpha: float = ALPHA) -> None:
    """Draw ``draws`` tokens per row of ``logits`` (``[C, V]``) with sampler ``cls`` and test
    their frequencies against the distribution the sampler claims (:func:`claimed_distribution`)
    by :func:`chi_square` at level ``alpha``.

    The draws of one row are ``draws`` rows of one batch: unseeded rows each get their own
    random seed; a fixed seed is drawn at ``draws`` different step counters
    (``ctx.num_generated = 0, 1, ...``), i.e. along the row's own stream.
    """
    vocab = logits.shape[1]
    uses = frozenset(getattr(cls, "uses", frozenset()))
    for i in range(logits.shape[0]):
        x = logits[i:i + 1].expand(draws, vocab).contiguous()
        row_prompts = None if prompts is None else [prompts[i]] * draws

        def ctx(row_prompts=row_prompts) -> StepContext:
            # num_generated says which step of the stream this is; a history buffer that long
            # keeps it consistent for steps that read ctx.generated (all -1: nothing recorded).
            c = StepContext(draws, vocab, prompt_ids=row_prompts, uses=uses, max_new_tokens=draws if uses else 1)
            c.num_generated.copy_(torch.arange(draws))
            return c

        step = cls([params] * draws, "cpu")
        expected = claimed_distribution(step, x, ctx())[0] * draws
        if int((expected >= 5.0).sum()) < 2:
            continue            # (nearly) one possible token: nothing to compare, and the draw was checked above
        ids = step.sample(x.clone(), ctx())
        observed = torch.bincount(ids, minlength=vocab)[:vocab]
        stat, dof, pvalue = chi_square(observed, expected)
        if pvalue < alpha:
            worst = int(((observed - expected) ** 2 / expected.clamp(min=1e-12)).argmax())
            claim = "its distribution()" if callable(getattr(cls, "distribution", None)) else "softmax(logits)"
            raise AssertionError(
                f"{cls.name}({_describe(params)}) on test row {i}: the drawn tokens do not follow {claim} "
                f"(chi-square {stat:.1f} with {dof} degrees of freedom over {draws} draws, p = {pvalue:.2g} < "
                f"{alpha:g}); token {worst} was drawn {int(observed[worst])} times, expected {float(expected[worst]):.1f}. "
                f"A sampler that draws from another distribution than softmax of its input logits must say "
                f"which: define distribution(self, logits, ctx) returning the [B, V] probabilities it draws from.")


def check_step(cls: type, params_examples: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> None:
    """:func:`check_processor` or :func:`check_sampler`, whichever ``cls`` is."""
    if isinstance(cls, type) and issubclass(cls, Sampler):
        check_sampler(cls, params_examples, **kwargs)
    elif isinstance(cls, type) and issubclass(cls, Processor):
        check_processor(cls, params_examples, **kwargs)
    else:
        from samplerkit.backend import Backend

        hint = " (for a backend use check_backend(instance))" if isinstance(cls, type) and issubclass(cls, Backend) else ""
        raise AssertionError(f"check_step needs a samplerkit.Processor or samplerkit.Sampler subclass, got {cls!r}{hint}")


# -- registries and temporary plugins -------------------------------------------------------

def registered_classes(kind: str, registry: Any = None) -> list[type]:
    """Every class of ``kind`` (``"processor"``, ``"sampler"``, ``"backend"``) in ``registry``
    (default: the default registry, installed plugins included)."""
    if registry is None:
        from samplerkit.registry import default_registry
        registry = default_registry()
    return [entry.cls for entry in registry.entries(kind)]


def parametrize_registered(kind: str, registry: Any = None, argname: str = "cls"):
    """``@parametrize_registered("processor")``: a pytest parametrization over the registry's classes."""
    import pytest

    classes = registered_classes(kind, registry)
    return pytest.mark.parametrize(argname, classes, ids=[c.name for c in classes])


def _plugin_from_classes(classes: Iterable[type], name: str) -> types.ModuleType:
    from samplerkit.backend import Backend
    from samplerkit.hookspecs import hookimpl

    groups: dict[str, list[type]] = {"register_processors": [], "register_samplers": [], "register_backends": []}
    for cls in classes:
        if issubclass(cls, Processor):
            groups["register_processors"].append(cls)
        elif issubclass(cls, Sampler):
            groups["register_samplers"].append(cls)
        elif issubclass(cls, Backend):
            groups["register_backends"].append(cls)
        else:
            raise TypeError(f"{cls!r} is not a Processor, Sampler or Backend subclass")
    module = types.ModuleType(name)
    for hook, found in groups.items():
        if found:
            def impl(found=tuple(found)):
                return list(found)
            impl.__name__ = hook
            setattr(module, hook, hookimpl(impl))
    return module


@contextmanager
def temporary_plugin(plugin: Any, name: str | None = None, *, block: Iterable[str] = (),
                     load_entry_points: bool = True) -> Iterator[Any]:
    """A registry built with ``plugin`` registered as an extra plugin named ``name``.

    ``plugin`` is a module (or any object) with ``@hookimpl`` functions, or a step/backend
    class, or a list of them. Registries are immutable snapshots built from a fresh plugin
    manager, so no global state changes; the manager still unregisters the plugin on exit::

        with temporary_plugin(MyProcessor) as registry:
            pipe = samplerkit.load_pipeline({"pipeline": ["my_processor"]}, registry=registry)
    """
    from samplerkit.plugins import make_plugin_manager
    from samplerkit.registry import build_registry

    if isinstance(plugin, type) or (isinstance(plugin, (list, tuple)) and all(isinstance(c, type) for c in plugin)):
        classes = [plugin] if isinstance(plugin, type) else list(plugin)
        name = name or f"temporary_{classes[0].name}"
        plugin = _plugin_from_classes(classes, name)
    name = name or getattr(plugin, "__name__", None) or f"temporary_plugin_{id(plugin)}"
    loaded = make_plugin_manager(block=block, load_entry_points=load_entry_points, extra=[(name, plugin)])
    try:
        yield build_registry(loaded)
    finally:
        if loaded.manager.is_registered(plugin):
            loaded.manager.unregister(plugin)


# -- whole plugin modules -------------------------------------------------------------------

def check_plugin(plugin: Any, name: str | None = None, *, check_steps: bool = True) -> None:
    """Check a plugin module as samplerkit will load it (raises AssertionError listing every problem).

    - every function named after a hook is decorated with ``@samplerkit.hookimpl`` (pluggy
      silently ignores an undecorated one, so the plugin would register nothing);
    - every ``@hookimpl`` function is a real hook (no misspelling) and at least one exists;
    - the hooks return classes that registration accepts (the right base class, a snake_case
      ``name``, ``Params`` deriving from :class:`~samplerkit.StepParams`); backends implement
      every abstract method;
    - with ``check_steps``, each processor and sampler passes :func:`check_step` with its own
      ``contract_examples()``. Backends need a constructed instance: run
      :func:`samplerkit.testing.check_backend` on one yourself.
    """
    import inspect

    from samplerkit import hookspecs
    from samplerkit.backend import Backend
    from samplerkit.errors import PluginError, closest, did_you_mean

    hooks = sorted(n for n in dir(hookspecs) if n.startswith("register_"))
    label = name or getattr(plugin, "__name__", repr(plugin))
    problems: list[str] = []
    marked = []
    for attr in dir(plugin):
        obj = getattr(plugin, attr, None)
        if not callable(obj) or isinstance(obj, type):
            continue
        is_impl = hasattr(obj, f"{hookspecs.hookimpl.project_name}_impl")
        close = closest(attr, hooks, cutoff=0.8)
        if is_impl:
            marked.append(attr)
            if attr not in hooks:
                problems.append(f"{attr}() is decorated with @samplerkit.hookimpl but samplerkit has no such "
                                f"hook{did_you_mean(attr, hooks)} "
                                f"Hooks: {', '.join(hooks)}.")
        elif attr in hooks:
            problems.append(f"{attr}() is not decorated with @samplerkit.hookimpl, so samplerkit never calls it: "
                            f"put @samplerkit.hookimpl on the line above `def {attr}():`.")
        elif close is not None and attr.startswith("register"):
            problems.append(f"{attr}() looks like the hook {close!r} misspelled (and is not decorated with "
                            f"@samplerkit.hookimpl): rename it to {close} and decorate it.")
    if not marked and not problems:
        problems.append(f"no hook implementations: decorate one of {', '.join(hooks)} with @samplerkit.hookimpl.")
    if problems:
        raise AssertionError(f"plugin {label}: " + " ".join(f"({i + 1}) {p}" for i, p in enumerate(problems)))

    plugin_name = name or f"check_plugin_{id(plugin)}"
    try:
        with temporary_plugin(plugin, plugin_name, load_entry_points=False) as registry:
            entries = [e for kind in ("processor", "sampler", "backend") for e in registry.entries(kind)
                       if e.plugin.name == plugin_name]
    except PluginError as exc:
        raise AssertionError(f"plugin {label} is rejected at registration: {exc}") from None
    if not entries:
        raise AssertionError(f"plugin {label}: its hooks returned no classes (return a list of classes).")
    for entry in entries:
        if entry.kind == "backend":
            params_cls = getattr(entry.cls, "Params", None)
            assert isinstance(params_cls, type) and issubclass(params_cls, StepParams), \
                f"backend {entry.name!r}: {entry.cls.__qualname__}.Params must be a subclass of samplerkit.StepParams"
            missing = sorted(getattr(entry.cls, "__abstractmethods__", ()))
            assert not inspect.isabstract(entry.cls), \
                f"backend {entry.name!r}: {entry.cls.__qualname__} does not implement {missing} (see samplerkit.Backend)"
            assert issubclass(entry.cls, Backend)
        elif check_steps:
            check_step(entry.cls)
