"""Compare two configs on the same prompts with common random numbers (``samplerkit compare``).

Both configs run on the same prompts with the same seeds. A seeded step's random numbers are
a pure function of ``(row seed, step counter, token id or stream)`` (:mod:`samplerkit.seeded`),
so at the same position with the same seed both configs race with *the same noise per token*:
a difference in output is caused by the configs, not by the noise.

What is reported, per prompt (and per sample when ``generation.n > 1``):

- the two free runs (each config generating on its own, exactly as ``samplerkit generate``):
  their tokens, the **first divergence** (the first position ``i`` where ``a_i != b_i``, or where
  one run ended and the other did not; ``None`` when the token lists are equal) and the
  **token agreement** ``#{i < min(|a|, |b|): a_i = b_i} / max(|a|, |b|)``;
- **along A's tokens** (teacher forcing): at each position ``t`` of A's run, both configs are
  given the same prefix, ``prompt + a_0 .. a_{t-1}`` (the model's logits come from one prefill
  of that text per config's backend; each config's step context holds A's tokens as its
  history, so penalties see the same text), and each one's pipeline produces the distribution
  its sampler draws from (:func:`drawn_distribution`): ``p_t`` for A, ``q_t`` for B. Reported:
  the total-variation distance ``TV_t = 1/2 sum_i |p_t(i) - q_t(i)|``, both kept-set sizes,
  and the token each config draws there with the row's seed and counter ``t``. A's draw is
  A's own token (``replayed`` says whether it is, see below); B's is what B would have drawn
  on A's text. Before the first divergence A's prefix *is* B's, so these are B's real tokens.

Teacher forcing along A (rather than along B) makes every step of A's text comparable; swap
the configs to go along B. The logits of the forced pass come from a prefill of the whole
text, which can differ from the decode loop's step-by-step logits in the last float bits;
``replayed`` is the fraction of positions where A's forced draw equals A's real token (1.0 on
the backends shipped here; below 1 it says the two logit paths disagree somewhere).

How strongly the race couples draws when the kept sets differ is measured in docs/compare.md
(``benchmarks/compare_coupling.py``): :func:`race_coupling` is its closed form.

>>> import torch
>>> p = torch.tensor([0.5, 0.5, 0.0]); q = torch.tensor([0.5, 0.25, 0.25])
>>> round(total_variation(p, q), 6)
0.25
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from samplerkit.backend import Backend
from samplerkit.config import RunConfig
from samplerkit.context import StepContext
from samplerkit.errors import ConfigError, ConfigIssue, GenerationError
from samplerkit.generate import Completion, Generator, Prompt, load_backend, load_config, row_seeds
from samplerkit.pipeline import BoundPipeline, Pipeline
from samplerkit.registry import Registry

__all__ = ["Comparison", "ForcedStep", "RowComparison", "compare", "drawn_distribution", "race_coupling",
           "total_variation"]

ConfigLike = str | Path | Mapping[str, Any] | RunConfig


@dataclass
class ForcedStep:
    """One position ``t`` of A's text, both configs on the prefix ``prompt + a_0 .. a_{t-1}``."""

    position: int
    #: A's real token at ``t`` (``None`` past A's last drawn token never happens: see ``RowComparison``).
    token: int
    #: The token A's pipeline draws on this prefix with the row's seed (equals ``token`` when replayed).
    draw_a: int
    #: The token B's pipeline draws on the same prefix with the same seed and counter.
    draw_b: int
    #: Total-variation distance between the two drawn-from distributions.
    tv: float
    #: How many tokens each distribution keeps (probability > 0).
    kept_a: int
    kept_b: int
    #: The decoded text of ``token`` and ``draw_b``.
    text: str = ""
    text_b: str = ""


@dataclass
class RowComparison:
    """One prompt (and sample) run under both configs."""

    prompt_index: int
    sample_index: int
    prompt: str
    #: The row's seed in both runs (``None`` when neither config draws at random).
    seed: int | None
    tokens_a: list[int]
    tokens_b: list[int]
    text_a: str
    text_b: str
    finish_a: str
    finish_b: str
    #: First position where the free runs differ; ``None`` when their tokens are equal.
    first_divergence: int | None
    #: ``#{i < min(|a|, |b|): a_i = b_i} / max(|a|, |b|)`` (1.0 when both are empty).
    agreement: float
    #: Along A's tokens (see the module docs), one entry per position A drew a token at
    #: (including the token that ended it, EOS, when it stopped on one).
    steps: list[ForcedStep] = field(default_factory=list)

    @property
    def replayed(self) -> float:
        """Fraction of positions where A's forced draw is A's real token (1.0 expected)."""
        return sum(s.draw_a == s.token for s in self.steps) / len(self.steps) if self.steps else 1.0

    @property
    def same_draw(self) -> float:
        """Fraction of positions along A where B's draw equals A's draw (common random numbers)."""
        return sum(s.draw_a == s.draw_b for s in self.steps) / len(self.steps) if self.steps else 1.0

    @property
    def mean_tv(self) -> float:
        return sum(s.tv for s in self.steps) / len(self.steps) if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(replayed=self.replayed, same_draw=self.same_draw, mean_tv=self.mean_tv)
        return out


@dataclass
class Comparison:
    """The result of :func:`compare`: both configs described, the seeds, one entry per row."""

    config_a: str
    config_b: str
    rows: list[RowComparison]
    notes: list[str] = field(default_factory=list)

    @property
    def mean_tv(self) -> float:
        """Mean of ``TV_t`` over every forced step of every row."""
        steps = [s for r in self.rows for s in r.steps]
        return sum(s.tv for s in steps) / len(steps) if steps else 0.0

    @property
    def same_draw(self) -> float:
        """Fraction of forced steps (all rows) where both configs draw the same token."""
        steps = [s for r in self.rows for s in r.steps]
        return sum(s.draw_a == s.draw_b for s in steps) / len(steps) if steps else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"config_a": self.config_a, "config_b": self.config_b, "notes": list(self.notes),
                "mean_tv": self.mean_tv, "same_draw": self.same_draw, "rows": [r.to_dict() for r in self.rows]}


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """``TV(p, q) = 1/2 sum_i |p_i - q_i|`` of two probability vectors ``[V]``."""
    return float(0.5 * (p.double() - q.double()).abs().sum())


def drawn_distribution(pipeline: Pipeline, processed: torch.Tensor, drawn: torch.Tensor | None,
                       ids: torch.Tensor) -> torch.Tensor:
    """The distribution ``[B, V]`` float64 a pipeline's tokens ``ids`` were drawn from.

    ``softmax(z)`` of the logits ``z`` the sampler drew from: the pipeline's processed logits, or
    those the sampler recorded when it truncates itself (:meth:`StepContext.record_distribution`,
    e.g. mirostat). A sampler that declares ``picks_argmax`` (greedy) draws deterministically:
    its distribution is the point mass on the token it picked, so greedy against sampling from
    the same logits has ``TV = 1 - p(argmax)``, not 0.
    """
    if pipeline.sampler.cls.picks_argmax:
        return torch.nn.functional.one_hot(ids, processed.shape[-1]).double()
    z = (processed if drawn is None else drawn).double()
    return torch.softmax(z, dim=-1).nan_to_num(0.0)


def race_coupling(p: torch.Tensor, q: torch.Tensor, block: int | None = None) -> float:
    """``P(X = Y)`` when ``X ~ p`` and ``Y ~ q`` are drawn by the exponential race with the
    same noise per token (one row, the same seed and counter), in closed form.

    One race over every token: with ``E_i ~ Exp(1)`` shared, ``X = argmin E_i / p_i`` and
    ``Y = argmin E_i / q_i``; both pick ``i`` iff ``E_j > E_i max(p_j / p_i, q_j / q_i)`` for
    every ``j != i``, which has probability ``1 / sum_j max(p_j / p_i, q_j / q_i)``. Hence

        ``P(X = Y) = sum_{i: p_i q_i > 0} 1 / sum_j max(p_j / p_i, q_j / q_i)``.

    It is at least ``(1 - TV) / (1 + TV)`` and at most ``1 - TV`` (the maximal coupling).
    samplerkit's race (:func:`samplerkit.ops.random.race_sample`) has two stages: a race among
    blocks of ``block`` consecutive ids (256) by their mass, with its own noise, then a race
    among the tokens of the winning block. Pass ``block`` for that: the formula applies to the
    block masses, then, within each block both picked, to the conditional distributions
    (the stages' noises are independent). ``block=None`` or ``V <= block``: one race.
    """
    p, q = p.double().flatten(), q.double().flatten()
    if block is None or p.numel() <= block:
        return _one_race_coupling(p, q)
    n = (p.numel() + block - 1) // block
    pad = n * block - p.numel()
    pb = torch.nn.functional.pad(p, (0, pad)).view(n, block)
    qb = torch.nn.functional.pad(q, (0, pad)).view(n, block)
    mp, mq = pb.sum(-1), qb.sum(-1)
    both = ((mp > 0) & (mq > 0)).nonzero().flatten().tolist()
    total = 0.0
    for b in both:
        # P(both pick block b) = 1 / sum_c max(P_c / P_b, Q_c / Q_b); then the race inside b.
        same_block = 1.0 / float(torch.maximum(mp / mp[b], mq / mq[b]).sum())
        total += same_block * _one_race_coupling(pb[b] / mp[b], qb[b] / mq[b])
    return total


def _one_race_coupling(p: torch.Tensor, q: torch.Tensor) -> float:
    keep = ((p > 0) & (q > 0)).nonzero().flatten()
    if keep.numel() == 0:
        return 0.0
    # [K, V] ratios, K = the common support; chunks bound the memory on a large vocabulary.
    total = 0.0
    for chunk in keep.split(256):
        ratios = torch.maximum(p.unsqueeze(0) / p[chunk].unsqueeze(1), q.unsqueeze(0) / q[chunk].unsqueeze(1))
        total += float((1.0 / ratios.sum(-1)).sum())
    return total


# -- running both configs ------------------------------------------------------------------

def compare(config_a: ConfigLike, config_b: ConfigLike, prompts: Prompt | Sequence[Prompt], *,
            seeds: Sequence[int | None] | None = None, backend: Backend | None = None,
            backend_b: Backend | None = None, registry: Registry | None = None,
            **generation: Any) -> Comparison:
    """Run ``config_a`` and ``config_b`` on ``prompts`` with common random numbers.

    ``seeds``: one base seed per prompt, used by both configs (as :meth:`Generator.generate`'s
    ``seeds``). Without it, each prompt's base seed is A's sampler seed, else B's, else 0:
    both configs always get the same seeds, never one drawn at random. ``generation``
    overrides apply to both configs (``max_new_tokens=16``, ``chat=True``); ``n`` must agree.
    ``backend`` (loaded from A's config when omitted) serves both configs when their backend
    sections are equal; otherwise B's is loaded (or pass ``backend_b``), and the two must share a
    vocabulary and tokenizer.
    """
    conf_a, reg_a = load_config(config_a, registry)
    conf_b, reg_b = load_config(config_b, registry)
    if backend is None:
        backend = load_backend(conf_a)
    if backend_b is None:
        backend_b = backend if _same_backend(conf_a, conf_b) else load_backend(conf_b)
    gen_a = Generator(conf_a, backend=backend, registry=reg_a)
    gen_b = Generator(conf_b, backend=backend_b, registry=reg_b)
    if gen_a.backend.vocab_size != gen_b.backend.vocab_size:
        raise ConfigError(ConfigIssue("backend", f"A's model has {gen_a.backend.vocab_size} tokens and B's "
                                                 f"{gen_b.backend.vocab_size}; compare needs one vocabulary"))
    from samplerkit.config import validate_generation

    opts_a = validate_generation(conf_a.generation, generation) if generation else conf_a.generation
    opts_b = validate_generation(conf_b.generation, generation) if generation else conf_b.generation
    if opts_a.n != opts_b.n:
        raise ConfigError(ConfigIssue("generation.n", f"A asks for {opts_a.n} samples per prompt and B for "
                                                      f"{opts_b.n}; set the same n in both (or pass n=...)"))
    n_prompts = 1 if isinstance(prompts, str) or (
        isinstance(prompts, Sequence) and prompts and all(isinstance(p, Mapping) for p in prompts)) else len(prompts)
    notes: list[str] = []
    base = _base_seeds(conf_a, conf_b, n_prompts, seeds, notes)
    out_a = gen_a.generate(prompts, seeds=base if gen_a.pipeline.takes_seed else None, **generation)
    out_b = gen_b.generate(prompts, seeds=base if gen_b.pipeline.takes_seed else None, **generation)
    per_row_a = row_seeds(gen_a.pipeline, n_prompts, opts_a.n, base) if gen_a.pipeline.takes_seed else None
    per_row_b = row_seeds(gen_b.pipeline, n_prompts, opts_b.n, base) if gen_b.pipeline.takes_seed else None
    rows = []
    for r, (a, b) in enumerate(zip(out_a, out_b)):
        if a.prompt_token_ids != b.prompt_token_ids:
            raise ConfigError(ConfigIssue("backend", f"prompt {a.prompt_index} tokenizes differently under A and B; "
                                                     "compare needs one tokenizer (the same model family)"))
        seed_a = per_row_a[r] if per_row_a else None
        seed_b = per_row_b[r] if per_row_b else None
        row = _free_runs(a, b, seed_a if seed_a is not None else seed_b)
        row.steps = _forced_steps(a, (gen_a, opts_a, seed_a), (gen_b, opts_b, seed_b))
        rows.append(row)
    return Comparison(gen_a.pipeline.describe(), gen_b.pipeline.describe(), rows, notes)


def _same_backend(a: RunConfig, b: RunConfig) -> bool:
    return a.backend.cls is b.backend.cls and a.backend.params.model_dump() == b.backend.params.model_dump()


def _base_seeds(a: RunConfig, b: RunConfig, n_prompts: int, seeds: Sequence[int | None] | None,
                notes: list[str]) -> list[int]:
    """One base seed per prompt shared by both configs (see :func:`compare`)."""
    if seeds is not None:
        if isinstance(seeds, (str, bytes, Mapping)) or not isinstance(seeds, Sequence) or len(seeds) != n_prompts:
            raise GenerationError(f"seeds must be a list with one entry per prompt ({n_prompts}), got {seeds!r:.60}")
        if any(s is None for s in seeds):
            raise GenerationError("compare needs a seed for every prompt (None would draw different noise for A "
                                  "and B); give integers")
        return list(seeds)
    seed_a = getattr(a.sampler.params, "seed", None)
    seed_b = getattr(b.sampler.params, "seed", None)
    chosen = seed_a if seed_a is not None else seed_b if seed_b is not None else 0
    if seed_a is not None and seed_b is not None and seed_a != seed_b:
        notes.append(f"A's sampler seed is {seed_a} and B's {seed_b}: both runs use {chosen} (common random numbers)")
    return [chosen] * n_prompts


def _free_runs(a: Completion, b: Completion, seed: int | None) -> RowComparison:
    ta, tb = a.token_ids, b.token_ids
    shared = min(len(ta), len(tb))
    first = next((i for i in range(shared) if ta[i] != tb[i]), None)
    if first is None and (len(ta) != len(tb) or a.finish_reason != b.finish_reason):
        first = shared
    agree = sum(x == y for x, y in zip(ta, tb))
    longest = max(len(ta), len(tb))
    return RowComparison(a.prompt_index, a.sample_index, a.prompt, seed, list(ta), list(tb), a.text, b.text,
                         a.finish_reason, b.finish_reason, first, agree / longest if longest else 1.0)


def _forced_steps(a: Completion, side_a, side_b) -> list[ForcedStep]:
    """Both pipelines along A's tokens (see the module docs)."""
    prompt = list(a.prompt_token_ids)
    tokens = list(a.token_ids)
    gen_a = side_a[0]
    # The positions A drew a token at: each generated token, plus the EOS / stop token that ended
    # the row when it is not among token_ids (a stop *string* ends on a token that is).
    detok = gen_a.backend.detokenize
    ended_on_token = a.finish_reason == "stop" and not any(s in detok(tokens) for s in side_a[1].stop)
    count = len(tokens) + (1 if ended_on_token else 0)
    if count == 0:
        return []
    text = prompt + tokens
    logits = {id(side[0]): _prefix_logits(side[0], text, len(prompt), count) for side in (side_a, side_b)}
    runs = [_Forced(gen, opts, seed, prompt, count) for gen, opts, seed in (side_a, side_b)]
    out = []
    for t in range(count):
        draws, dists = [], []
        for run, (gen, _, _) in zip(runs, (side_a, side_b)):
            ids, dist = run.step(logits[id(gen)][t:t + 1])
            draws.append(int(ids[0]))
            dists.append(dist[0])
        token = tokens[t] if t < len(tokens) else draws[0]
        for run in runs:
            run.ctx.append(torch.tensor([token], device=run.ctx.device))
        out.append(ForcedStep(t, token, draws[0], draws[1], total_variation(dists[0], dists[1]),
                              int((dists[0] > 0).sum()), int((dists[1] > 0).sum()), detok([token]), detok([draws[1]])))
    return out


def _prefix_logits(gen: Generator, text: list[int], prompt_len: int, count: int) -> torch.Tensor:
    """``[count, V]`` float32: the logits after ``text[:prompt_len + t]`` for ``t < count``, from
    one prefill of the text (row ``t`` of the backend's ``all`` predicts token ``t + 1``)."""
    out = gen.backend.prefill([text[:prompt_len + count - 1]], keep_all_logits=True)
    every = out.all[0]
    return every[prompt_len - 1:prompt_len - 1 + count].float()


class _Forced:
    """One config's pipeline stepping along a given text with the decode loop's context."""

    def __init__(self, gen: Generator, opts, seed: int | None, prompt: list[int], count: int):
        backend = gen.backend
        self.pipeline = gen.pipeline
        self.bound: BoundPipeline = gen.pipeline.bind(1, seeds=[seed] if seed is not None else None)
        self.ctx = StepContext(1, backend.vocab_size, prompt_ids=[prompt], uses=gen.pipeline.uses,
                               max_new_tokens=max(count, 1), eos_token_ids=[*backend.eos_token_ids, *opts.stop_token_ids],
                               tokenize=lambda text: backend.tokenize(text, add_special=False))
        self.ctx.want_distribution = True

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # As the decode loop does when it reports logprobs: process once, sample from that.
        processed = self.bound.process(logits, self.ctx)
        ids, _valid = self.bound.sample_with_validity(logits, self.ctx, processed=processed)
        drawn = self.ctx.take_distribution()
        return ids, drawn_distribution(self.pipeline, processed, drawn, ids)
