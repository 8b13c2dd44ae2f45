"""``samplerkit verify``: prove statistically that a pipeline draws the distribution it claims.

For each case of a corpus of logits (peaked, flat, ties, ``-inf`` holes, a large vocabulary,
logits of the default model) :func:`verify`

1. runs the processors one by one on the row (their plain ``apply``); where a step declares a
   ``reference(logits, ctx)`` (a slow, obviously correct implementation of the same step) it
   checks that ``apply`` keeps the same tokens with the same values, and continues from the
   reference's output. The result is the *claimed* processed row ``z``; the pipeline's own
   ``process`` (its fast paths: candidate lists, deferred temperature, cuts) must equal it;
2. takes the distribution the sampler claims to draw from ``z``: its ``distribution(logits,
   ctx)`` when it has one, else ``softmax(z)`` (a deterministic sampler claims its pick);
3. draws at least ``draws`` tokens through the pipeline's real ``sample`` (the path generation
   takes), as ``[N, V]`` batches of identical rows with distinct seeds, so one call gives ``N``
   independent draws (every row at its first step: the claimed row is the same for all);
4. fails the case when any draw is a token of zero claimed probability (outside the kept set:
   a hard check, no statistics), or when Pearson's chi-square test of the counts against the
   claimed probabilities rejects at level ``alpha`` (``1e-6``: a correct pipeline fails a case
   once in a million runs).

A pipeline with a random processor (xtc's coin) claims a different ``z`` for each drawn row:
the expected counts are then the sum of each row's claimed probabilities (the chi-square test
stays valid for such sums of independent categorical draws).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from samplerkit.context import StepContext
from samplerkit.errors import SamplerkitError
from samplerkit.pipeline import Pipeline
from samplerkit.testing.contract import ALPHA, chi_square, claimed_distribution

#: Draws per case (at least; whole batches are drawn).
DRAWS = 50_000
#: Most logits in one ``[N, V]`` batch (64 MiB of float32): larger vocabularies take more calls.
BATCH_ELEMENTS = 1 << 24
#: Most rows in one batch (binding costs per row; more rows gain nothing).
MAX_ROWS = 8192
#: The prompt every case's context holds (history steps such as repetition_penalty read it).
PROMPT = (1, 2, 3, 5, 8)
#: Prompts whose next-token logits (default model) join the corpus: one confident, one open.
MODEL_PROMPTS = ("The capital of France is", "Once upon a time, there was a")


@dataclass(frozen=True)
class LogitsCase:
    """One row of logits ``[V]`` to verify a pipeline on."""

    name: str
    logits: torch.Tensor


@dataclass
class CaseResult:
    """The verdict on one case: ``draws`` drawn, ``outside`` of them outside the kept set,
    ``kept`` tokens of positive claimed probability, the chi-square ``statistic``, its degrees
    of freedom and ``pvalue`` (``None`` when nothing was tested), and what failed."""

    case: str
    vocab: int
    kept: int = 0
    draws: int = 0
    outside: int = 0
    statistic: float | None = None
    dof: int | None = None
    pvalue: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


@dataclass
class VerifyReport:
    """Every case's result for one pipeline; :attr:`passed` when all passed."""

    pipeline: str
    alpha: float
    results: list[CaseResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "alpha": self.alpha, "passed": self.passed,
                "cases": [r.as_dict() for r in self.results]}

    def __str__(self) -> str:
        rows = [("case", "vocab", "kept", "draws", "p-value", "verdict")]
        for r in self.results:
            p = "-" if r.pvalue is None else f"{r.pvalue:.3g}"
            rows.append((r.case, str(r.vocab), str(r.kept), f"{r.draws:,}", p, r.verdict))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"pipeline: {self.pipeline}", f"chi-square at alpha {self.alpha:g}; a draw outside the kept set fails"]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                  for row in rows]
        for r in self.results:
            lines += [f"{r.case}: {f}" for f in r.failures]
        failed = sum(not r.passed for r in self.results)
        lines.append(f"{len(self.results) - failed} of {len(self.results)} cases pass" +
                     ("" if not failed else f"; {failed} FAIL"))
        return "\n".join(lines)


# -- the corpus ---------------------------------------------------------------------------------

def synthetic_cases(seed: int = 0) -> list[LogitsCase]:
    """Peaked, flat, tied, holed and large-vocabulary rows (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    holes = torch.randn(256, generator=g) * 2.0
    holes[torch.randperm(256, generator=g)[:150]] = float("-inf")         # -inf holes: a truncated row
    ties = torch.randint(0, 4, (64,), generator=g).float() * 0.7           # four levels, many ties
    return [
        LogitsCase("peaked", torch.randn(64, generator=g) * 6.0),
        LogitsCase("flat", torch.zeros(64)),
        LogitsCase("ties", ties),
        LogitsCase("-inf holes", holes),
        LogitsCase("large vocab", torch.randn(32768, generator=g) * 2.5),
    ]


#: How the llama backend's defaults compute the model's logits; change it when they change, so
#: that logits cached by an earlier version are computed again.
def _logits_form() -> str:
    """How the llama backend's default (``weights: auto``) computes logits here: with samplerkit's
    compiled kernels (and which source) where they load, else packed layers + float16 output."""
    from samplerkit.builtins.backends.llama import native

    if native.kernels() is not None:
        return f"llama weights: auto = blocks (compiled kernels {native.source_digest()})"
    return "llama weights: auto = packed layers + float16 output matrix"


def model_cases(prompts: Sequence[str] = MODEL_PROMPTS) -> list[LogitsCase]:
    """The default model's next-token logits after each prompt, computed once and then read
    from the cache directory (``$SAMPLERKIT_CACHE``, keyed by the model file's size and mtime,
    torch's version and CPU capability, and :func:`_logits_form`)."""
    from samplerkit.builtins.backends.llama.default_model import cache_dir, find_default_model

    model = find_default_model()
    stat = model.stat()
    # The logits depend on the prompts, the file, and how the backend computes them: its
    # default weights form (_logits_form), torch's version and the kernels it picks for this CPU.
    form = f"{_logits_form()}\0{torch.__version__}\0{torch.backends.cpu.get_cpu_capability()}"
    digest = hashlib.sha256("\0".join([form, *prompts]).encode("utf-8")).hexdigest()[:16]  # stable across runs
    key = f"verify-logits-{stat.st_size}-{int(stat.st_mtime)}-{digest}.pt"
    path = cache_dir() / key
    logits = None
    if path.exists():
        try:
            saved = torch.load(path, weights_only=True)
            if saved.get("prompts") == list(prompts):
                logits = saved["logits"]
        except Exception:          # a damaged cache file: compute again
            logits = None
    if logits is None:
        logits = _model_logits(prompts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"prompts": list(prompts), "logits": logits}, tmp)
        tmp.replace(path)
    return [LogitsCase(f"model: {p!r}", row) for p, row in zip(prompts, logits)]


def _model_logits(prompts: Sequence[str]) -> torch.Tensor:
    from samplerkit.registry import default_registry

    cls = default_registry().entry("backend", "llama").cls
    backend = cls(cls.Params())
    return backend.prefill([backend.tokenize(p) for p in prompts]).last.float().clone()


def corpus(*, model: bool = True, seed: int = 0) -> list[LogitsCase]:
    """The default corpus: :func:`synthetic_cases`, plus :func:`model_cases` with ``model``."""
    return synthetic_cases(seed) + (model_cases() if model else [])


# -- verification ---------------------------------------------------------------------------------

def verify(pipeline: Pipeline, cases: Sequence[LogitsCase] | None = None, *, draws: int = DRAWS,
           alpha: float = ALPHA, model: bool = True, seed: int = 0) -> VerifyReport:
    """Verify ``pipeline`` on ``cases`` (default: :func:`corpus`, the model's logits included
    when ``model``); see the module docs. ``seed`` fixes every draw, so a report reproduces."""
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    cases = list(cases) if cases is not None else corpus(model=model, seed=seed)
    results = [_verify_case(pipeline, case, draws, alpha, seed) for case in cases]
    return VerifyReport(pipeline.describe(), alpha, results)


def _context(pipeline: Pipeline, rows: int, vocab: int) -> StepContext:
    """A context at the first step of every row, with the prompt :data:`PROMPT`."""
    return StepContext(rows, vocab, prompt_ids=[list(PROMPT)] * rows, uses=pipeline.uses, max_new_tokens=1)


def _same(label: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    """Why ``got`` differs from ``want`` (kept sets exactly, kept values to float32 rounding), or None."""
    kept_got, kept_want = torch.isfinite(got), torch.isfinite(want)
    if not torch.equal(kept_got, kept_want):
        extra = (kept_got & ~kept_want).nonzero().squeeze(-1).tolist()
        missing = (kept_want & ~kept_got).nonzero().squeeze(-1).tolist()
        return f"{label}: kept sets differ (kept only by the first: {extra[:8]}; only by the second: {missing[:8]})"
    if not torch.allclose(got[kept_got].double(), want[kept_want].double(), rtol=1e-5, atol=1e-5):
        worst = int(((got - want).abs().masked_fill(~kept_got, 0)).argmax())
        return f"{label}: values differ (token {worst}: {float(got[worst]):.6g} vs {float(want[worst]):.6g})"
    return None


def _claimed_row(pipeline: Pipeline, x: torch.Tensor, result: CaseResult) -> torch.Tensor:
    """The processed row ``[1, V]`` the pipeline claims: each step's ``apply``, or its
    ``reference`` where it declares one, after checking that ``apply`` agrees with it
    (disagreements go to ``result``)."""
    z = x.clone()
    for spec in pipeline.processors:
        step = spec.cls([spec.params], "cpu")
        out = step.apply(z.clone(), _context(pipeline, 1, x.shape[-1]))
        reference = getattr(step, "reference", None)
        if callable(reference):
            ref = reference(z.clone(), _context(pipeline, 1, x.shape[-1]))
            why = _same(f"{spec.location}: apply() vs its reference()", out[0], ref[0])
            if why:
                result.failures.append(why)
            out = ref
        z = out
    return z


def _verify_case(pipeline: Pipeline, case: LogitsCase, draws: int, alpha: float, seed: int) -> CaseResult:
    x = case.logits.to(torch.float32).reshape(1, -1)
    vocab = x.shape[-1]
    result = CaseResult(case.name, vocab)
    random_steps = any(getattr(s.cls, "stochastic", False) for s in pipeline.processors)
    sampler_cls = pipeline.sampler.cls
    claims = getattr(sampler_cls, "stochastic", False) or callable(getattr(sampler_cls, "distribution", None))
    try:
        z = _claimed_row(pipeline, x, result)
        if not random_steps:
            why = _same("the pipeline's process() (its fast paths) vs its steps one by one",
                        pipeline.bind(1).process(x, _context(pipeline, 1, vocab))[0], z[0])
            if why:
                result.failures.append(why)
        # A deterministic sampler under deterministic steps draws one token: a few draws check it.
        total = draws if claims or random_steps else min(draws, 64)
        counts, expected = _draw(pipeline, x, z, total, seed, random_steps)
    except (SamplerkitError, AssertionError) as exc:
        result.failures.append(f"{type(exc).__name__}: {exc}")
        return result
    result.draws = int(counts.sum())
    result.kept = int((expected > 0).sum())
    outside = counts.double() * (expected == 0)
    result.outside = int(outside.sum())
    if result.outside:
        token = int(outside.argmax())
        result.failures.append(f"{result.outside} of {result.draws:,} draws were tokens of claimed probability 0 "
                               f"(outside the kept set), e.g. token {token} ({int(counts[token])} times)")
    result.statistic, result.dof, result.pvalue = chi_square(counts, expected)
    if result.pvalue < alpha:
        dev = ((counts.double() - expected) ** 2 / expected.clamp(min=1e-12)).masked_fill(expected == 0, 0)
        token = int(dev.argmax())
        result.failures.append(
            f"the draws do not follow the claimed distribution: chi-square {result.statistic:.1f} with {result.dof} "
            f"degrees of freedom, p = {result.pvalue:.3g} < {alpha:g}; token {token} was drawn {int(counts[token])} "
            f"times, expected {float(expected[token]):.1f}")
    return result


def _draw(pipeline: Pipeline, x: torch.Tensor, z: torch.Tensor, total: int, seed: int,
          random_steps: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts [V], expected counts [V])`` of ``total`` draws (rounded up to equal batches)
    through the pipeline's ``sample`` on copies of ``x``, every row at its first step.

    Each batch is bound with fresh seeds, distinct for every row of every batch (a config's
    fixed seed would repeat one draw); a pipeline without a seeded step draws from torch's
    generator, seeded here. The expected counts come from the claimed row ``z``; with random
    processors, from each batch's own processed rows, under the same streams as its draws."""
    vocab = x.shape[-1]
    rows = max(1, min(total, BATCH_ELEMENTS // vocab, MAX_ROWS))
    rows = math.ceil(total / math.ceil(total / rows))          # equal batches, at most one extra draw each
    batch = x.expand(rows, vocab).contiguous()
    counts = torch.zeros(vocab, dtype=torch.int64)
    expected = torch.zeros(vocab, dtype=torch.float64)
    bound = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for b in range(math.ceil(total / rows)):
            if pipeline.takes_seed:
                seeds = [(seed * 0x9E3779B1 + b * rows + i) % 2**62 for i in range(rows)]
                bound = pipeline.bind(rows, seeds=seeds)
            elif bound is None:
                bound = pipeline.bind(rows)
            ids = bound.sample(batch, _context(pipeline, rows, vocab))
            counts += torch.bincount(ids, minlength=vocab)[:vocab]
            if random_steps:
                expected += _claimed(pipeline, bound.process(batch, _context(pipeline, rows, vocab))).sum(0)
    if not random_steps:
        expected = _claimed(pipeline, z)[0] * int(counts.sum())
    return counts, expected


def _claimed(pipeline: Pipeline, z: torch.Tensor) -> torch.Tensor:
    """``[R, V]`` float64: what the sampler claims to draw from processed rows ``z``: its
    ``distribution()`` or ``softmax(z)`` for a random sampler; a deterministic one (greedy)
    claims its own pick, probability 1."""
    cls, rows = pipeline.sampler.cls, z.shape[0]
    sampler = cls([pipeline.sampler.params] * rows, "cpu")
    ctx = _context(pipeline, rows, z.shape[-1])
    if getattr(cls, "stochastic", False) or callable(getattr(cls, "distribution", None)):
        return claimed_distribution(sampler, z, ctx)
    return torch.nn.functional.one_hot(sampler.sample(z.clone(), ctx), z.shape[-1]).double()


__all__ = ["BATCH_ELEMENTS", "DRAWS", "MODEL_PROMPTS", "CaseResult", "LogitsCase", "VerifyReport", "corpus",
           "model_cases", "synthetic_cases", "verify"]

