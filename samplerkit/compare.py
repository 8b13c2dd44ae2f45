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
  given the same prefix, ``prompt + a_0 .. a_{t-1}`` (the model's logits come from the decode
  loop's own path: a prefill of the prompts, then one backend step per token of A; each
  config's step context holds A's tokens as its history, so penalties see the same text), and
  each one's pipeline produces the distribution its sampler draws from
  (:func:`drawn_distribution`): ``p_t`` for A, ``q_t`` for B. Reported: the total-variation
  distance ``TV_t = 1/2 sum_i |p_t(i) - q_t(i)|``, both kept-set sizes, and the token each
  config draws there with the row's seed and counter ``t``. A's draw is A's own token
  (``replayed`` checks it); B's is what B would have drawn on A's text. Before the first
  divergence A's prefix *is* B's, so these are B's real tokens.

Teacher forcing along A (rather than along B) makes every step of A's text comparable; swap
the configs to go along B. ``replayed``, the fraction of positions where A's forced draw is
A's real token, is 1.0 whenever the backend gives the same logits for a row whatever the batch
(the shipped backends do; a backend that does not shows it here).

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
from typing import TYPE_CHECKING, Any

from samplerkit.errors import ConfigError, ConfigIssue, GenerationError

# torch and the decode loop load when a comparison runs, not when the CLI builds its parser.
if TYPE_CHECKING:
    import torch

    from samplerkit.backend import Backend
    from samplerkit.config import RunConfig
    from samplerkit.generate import Completion, Generator, Prompt
    from samplerkit.pipeline import Pipeline
    from samplerkit.registry import Registry

__all__ = ["Comparison", "ForcedStep", "RowComparison", "compare", "drawn_distribution", "race_coupling",
           "total_variation"]

ConfigLike = "str | Path | Mapping[str, Any] | RunConfig"


@dataclass
class ForcedStep:
    """One position ``t`` of A's text, both configs on the prefix ``prompt + a_0 .. a_{t-1}``."""

    position: int
    #: A's real token at ``t`` (its EOS at the last position when A stopped on one).
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

    @property
    def uncoupled(self) -> list[int]:
        """Positions where both configs claim the same distribution (``TV < 1e-9``) yet draw
        different tokens. Two samplers that draw by samplerkit's seeded race from the same
        distribution draw the same token, so this is empty for them; a position here means one
        sampler does not use the race (its own noise: correct but uncoupled) or does not draw
        the distribution its pipeline claims (``samplerkit verify`` tells which)."""
        return [s.position for s in self.steps if s.tv < 1e-9 and s.draw_a != s.draw_b]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(replayed=self.replayed, same_draw=self.same_draw, mean_tv=self.mean_tv, uncoupled=self.uncoupled)
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
    import torch

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
    import torch

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
    import torch

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
    ``seeds``). Without it, each prompt's base seed is A's sampler seed, else B's, else the
    prompt's index: both configs always get the same seeds, never one drawn at random. ``generation``
    overrides apply to both configs (``max_new_tokens=16``, ``chat=True``); ``n`` must agree.
    ``backend`` (loaded from A's config when omitted) serves both configs when their backend
    sections are equal; otherwise B's is loaded (or pass ``backend_b``), and the two must share a
    vocabulary and tokenizer.
    """
    from samplerkit.config import validate_generation
    from samplerkit.generate import Generator, load_backend, load_config, row_seeds

    conf_a, reg_a = load_config(config_a, registry)
    conf_b, reg_b = load_config(config_b, registry)
    for label, conf in (("A", conf_a), ("B", conf_b)):
        if conf.segments:          # the replay below scores every position with one pipeline
            raise ConfigError(ConfigIssue("segments", f"config {label} has segments; compare replays one pipeline per "
                                                      "config at every position: compare the segments' pipelines "
                                                      "as configs of their own"))
    if backend is None:
        backend = load_backend(conf_a)
    if backend_b is None:
        backend_b = backend if _same_backend(conf_a, conf_b) else load_backend(conf_b)
    gen_a = Generator(conf_a, backend=backend, registry=reg_a)
    gen_b = Generator(conf_b, backend=backend_b, registry=reg_b)
    if gen_a.backend.vocab_size != gen_b.backend.vocab_size:
        raise ConfigError(ConfigIssue("backend", f"A's model has {gen_a.backend.vocab_size} tokens and B's "
                                                 f"{gen_b.backend.vocab_size}; compare needs one vocabulary"))
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
    rows, plans = [], []
    for r, (a, b) in enumerate(zip(out_a, out_b)):
        if a.prompt_token_ids != b.prompt_token_ids:
            raise ConfigError(ConfigIssue("backend", f"prompt {a.prompt_index} tokenizes differently under A and B; "
                                                     "compare needs one tokenizer (the same model family)"))
        seed_a = per_row_a[r] if per_row_a else None
        seed_b = per_row_b[r] if per_row_b else None
        rows.append(_free_runs(a, b, seed_a if seed_a is not None else seed_b))
        plans.append((a, seed_a, seed_b, _forced_count(a, opts_a, gen_a.backend)))
    # The logits along A's tokens, through the decode loop's own path (prefill, then one step
    # per token): exactly the logits A's run saw (the backends here are batch-invariant).
    forced_a = _replay(gen_a.backend, plans)
    forced_b = forced_a if backend_b is backend else _replay(gen_b.backend, plans)   # one model: one replay
    for row, (a, seed_a, seed_b, count), la, lb in zip(rows, plans, forced_a, forced_b):
        row.steps = _forced_steps(a, count, (gen_a, opts_a, seed_a, la), (gen_b, opts_b, seed_b, lb))
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
    if seed_a is None and seed_b is None:
        return list(range(n_prompts))           # prompt i: seed i, so prompts do not share noise
    chosen = seed_a if seed_a is not None else seed_b
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


def _forced_count(a: Completion, opts, backend) -> int:
    """How many positions A drew a token at: each generated token, plus the EOS / stop token
    that ended the row when it is not among ``token_ids`` (a stop *string* ends on a token that is)."""
    tokens = a.token_ids
    ended_on_token = a.finish_reason == "stop" and not any(s in backend.detokenize(tokens) for s in opts.stop)
    return len(tokens) + (1 if ended_on_token else 0)


def _replay(backend, plans) -> list[torch.Tensor]:
    """Per row, ``[count, V]`` float32: the logits after ``prompt + a_0 .. a_{t-1}`` for each
    ``t < count``, from one batched prefill of the prompts and one step per token of A."""
    import torch

    rows = [r for r, plan in enumerate(plans) if plan[3] > 0]
    out: list[list[torch.Tensor]] = [[] for _ in plans]
    if not rows:
        return [torch.empty(0) for _ in plans]
    logits = backend.prefill([plans[r][0].prompt_token_ids for r in rows]).last
    t = 0
    while True:
        for slot, r in enumerate(rows):
            out[r].append(logits[slot].float().clone())
        t += 1
        keep = [slot for slot, r in enumerate(rows) if plans[r][3] > t]
        if not keep:
            break
        if len(keep) < len(rows):
            backend.select_rows(keep)
            rows = [rows[k] for k in keep]
        logits = backend.step(torch.tensor([plans[r][0].token_ids[t - 1] for r in rows], dtype=torch.int64,
                                           device=logits.device))
    return [torch.stack(x) if x else torch.empty(0) for x in out]


def _forced_steps(a: Completion, count: int, side_a, side_b) -> list[ForcedStep]:
    """Both pipelines along A's tokens (see the module docs); ``side`` = (generator, generation
    options, seed, ``[count, V]`` logits)."""
    import torch

    tokens = list(a.token_ids)
    runs = [_Forced(gen, opts, seed, list(a.prompt_token_ids), count) for gen, opts, seed, _ in (side_a, side_b)]
    detok = side_a[0].backend.detokenize
    out = []
    for t in range(count):
        draws, dists = [], []
        for run, side in zip(runs, (side_a, side_b)):
            ids, dist = run.step(side[3][t:t + 1])
            draws.append(int(ids[0]))
            dists.append(dist[0])
        token = tokens[t] if t < len(tokens) else draws[0]
        for run in runs:
            run.ctx.append(torch.tensor([token], device=run.ctx.device))
        out.append(ForcedStep(t, token, draws[0], draws[1], total_variation(dists[0], dists[1]),
                              int((dists[0] > 0).sum()), int((dists[1] > 0).sum()), detok([token]), detok([draws[1]])))
    return out


class _Forced:
    """One config's pipeline stepping along a given text with the decode loop's context."""

    def __init__(self, gen: Generator, opts, seed: int | None, prompt: list[int], count: int):
        from samplerkit.context import StepContext

        backend = gen.backend
        self.pipeline = gen.pipeline
        self.bound = gen.pipeline.bind(1, seeds=[seed] if seed is not None else None)
        self.ctx = StepContext(1, backend.vocab_size, prompt_ids=[prompt], uses=gen.pipeline.uses,
                               max_new_tokens=max(count, 1), eos_token_ids=[*backend.eos_token_ids, *opts.stop_token_ids],
                               tokenize=lambda text: backend.tokenize(text, add_special=False),
                               device=gen.pipeline.device)
        self.ctx.want_distribution = True

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # As the decode loop does when it reports logprobs: process once, sample from that.
        processed = self.bound.process(logits, self.ctx)
        ids, _valid = self.bound.sample_with_validity(logits, self.ctx, processed=processed)
        drawn = self.ctx.take_distribution()
        return ids, drawn_distribution(self.pipeline, processed, drawn, ids)


# -- the command line ----------------------------------------------------------------------

def add_arguments(parser) -> None:
    """``samplerkit compare A.yaml B.yaml PROMPT...``"""
    parser.add_argument("config_a", metavar="A.yaml", help="the first run config (the text the forced pass follows)")
    parser.add_argument("config_b", metavar="B.yaml", help="the second run config")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (several prompts run as one batch)")
    parser.add_argument("--seed", type=int, help="base seed of every prompt, for both configs (default: A's sampler "
                        "seed, else B's, else the prompt's index)")
    parser.add_argument("--max-new-tokens", type=int, help="sets generation.max_new_tokens of both configs")
    parser.add_argument("--model", help="path to a GGUF file or Hugging Face model directory (sets backend.model of both)")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    parser.add_argument("--steps", action="store_true", help="print the forced pass step by step")
    parser.add_argument("--json", action="store_true", help="print the whole comparison as one JSON object")
    parser.add_argument("--plot", metavar="OUT.png", help="draw TV per position along A's text (.png, .svg or .pdf; "
                        "needs samplerkit[plot])")


def _load_cli_config(path: str, model: str | None) -> dict[str, Any]:
    import json

    from samplerkit.config import apply_override, read_yaml
    from samplerkit.presets import PRESET_KEY, apply_preset, list_presets

    data = read_yaml(path)
    if data.get(PRESET_KEY) in list_presets():
        data = apply_preset(data)
    if model:
        data = apply_override(data, f"backend.model={json.dumps(model)}")
    return data


def run(args) -> int:
    """The ``compare`` verb: 0 when it ran (whatever the configs do), 2 for a usage error."""
    import json

    from samplerkit.config import resolve
    from samplerkit.registry import default_registry

    if args.plot:                    # before the runs: a bad name or no matplotlib fails fast
        _check_plot_path(args.plot)
        _pyplot()
    configs = []
    for path in (args.config_a, args.config_b):
        data = _load_cli_config(path, args.model)
        plugins = data.get("plugins") if isinstance(data.get("plugins"), dict) else {}
        block = plugins.get("block", []) if isinstance(plugins.get("block", []), list) else []
        configs.append(resolve(data, default_registry(block), path))
    generation: dict[str, Any] = {}
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    if args.chat:
        generation["chat"] = True
    seeds = None if args.seed is None else [args.seed] * len(args.prompts)
    result = compare(configs[0], configs[1], list(args.prompts), seeds=seeds, **generation)
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    print(format_comparison(result, steps=args.steps, labels=(args.config_a, args.config_b)))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def format_comparison(result: Comparison, *, steps: bool = False, labels: tuple[str, str] = ("A", "B")) -> str:
    """The human-readable report of :func:`compare` (what ``samplerkit compare`` prints)."""
    lines = [f"A: {labels[0]}: {result.config_a}", f"B: {labels[1]}: {result.config_b}"]
    lines += [f"note: {note}" for note in result.notes]
    for row in result.rows:
        name = f"prompt {row.prompt_index}" + (f", sample {row.sample_index}" if row.sample_index else "")
        longest = max(len(row.tokens_a), len(row.tokens_b))
        diverge = "identical tokens" if row.first_divergence is None else f"first divergence at token {row.first_divergence}"
        lines.append(f"--- {name} (seed {row.seed}): {diverge}; agreement "
                     f"{round(row.agreement * longest)}/{longest} ({row.agreement:.1%})")
        lines.append(f"  A ({row.finish_a}): {row.text_a!r}")
        lines.append(f"  B ({row.finish_b}): {row.text_b!r}")
        if row.steps:
            worst = max(row.steps, key=lambda s: s.tv)
            same = sum(s.draw_a == s.draw_b for s in row.steps)
            lines.append(f"  along A: mean TV {row.mean_tv:.3f}, max TV {worst.tv:.3f} at token {worst.position} "
                         f"({worst.text!r}); B draws A's token at {same}/{len(row.steps)} steps"
                         + ("" if row.replayed == 1.0 else f"; A's replay matched {row.replayed:.1%} of its tokens"))
        if row.uncoupled:
            lines.append(f"  warning: same distribution, different draw at {len(row.uncoupled)} step(s) "
                         f"({', '.join(map(str, row.uncoupled[:10]))}{', ...' if len(row.uncoupled) > 10 else ''}): "
                         "one sampler does not draw by the seeded race, or does not draw what its pipeline claims")
        if steps and row.steps:
            lines.append(f"  {'t':>4}  {'A token':<16} {'B draw':<16} {'TV':>6} {'kept A':>7} {'kept B':>7}")
            for s in row.steps:
                mark = "" if s.draw_a == s.draw_b else "  *"
                lines.append(f"  {s.position:>4}  {s.text!r:<16.16} {s.text_b!r:<16.16} {s.tv:>6.3f} {s.kept_a:>7} "
                             f"{s.kept_b:>7}{mark}")
    lines.append(f"overall: mean TV {result.mean_tv:.3f} along A; B draws A's token at {result.same_draw:.1%} of steps "
                 f"(1 - mean TV = {1 - result.mean_tv:.1%})")
    return "\n".join(lines)


# -- the picture ---------------------------------------------------------------------------

_PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _check_plot_path(path: str) -> None:
    if not str(path).lower().endswith(_PLOT_SUFFIXES):
        raise GenerationError(f"--plot {path}: give a file name ending in {', '.join(_PLOT_SUFFIXES)}")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise GenerationError("plotting needs matplotlib: pip install 'samplerkit[plot]'") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot(result: Comparison, path: str | Path):
    """Draw ``TV_t`` along A's text, one panel per row, and save it to ``path``; returns the
    figure (closed). Bars: ``TV_t`` per position; red bars mark positions where B draws another
    token than A; a dashed line marks the first divergence of the free runs. The x axis is
    labelled with A's tokens when they are few enough to read."""
    _check_plot_path(str(path))
    plt = _pyplot()
    rows = [r for r in result.rows] or []
    fig, axes = plt.subplots(max(len(rows), 1), 1, figsize=(10, 2.6 * max(len(rows), 1) + 0.6), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        xs = [s.position for s in row.steps]
        colors = ["#1f77b4" if s.draw_a == s.draw_b else "#d62728" for s in row.steps]
        ax.bar(xs, [s.tv for s in row.steps], color=colors, width=0.8)
        if row.first_divergence is not None:
            ax.axvline(row.first_divergence - 0.5, color="black", linestyle="--", linewidth=1,
                       label=f"first divergence (token {row.first_divergence})")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("TV(A, B)")
        prompt = row.prompt if len(row.prompt) <= 40 else row.prompt[:37] + "..."
        ax.set_title(f"prompt {row.prompt_index} {prompt!r}: mean TV {row.mean_tv:.3f}, "
                     f"B draws A's token at {row.same_draw:.0%} of steps", fontsize=9)
        if 0 < len(row.steps) <= 40:
            ax.set_xticks(xs)
            ax.set_xticklabels([repr(s.text)[1:-1] for s in row.steps], rotation=70, fontsize=7)
        ax.set_xlabel("position along A's text (red: B draws another token)")
    fig.suptitle(f"A: {result.config_a}\nB: {result.config_b}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig
