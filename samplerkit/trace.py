"""What each stage of a pipeline did to the distribution: :class:`Trace`, made by
:meth:`samplerkit.pipeline.BoundPipeline.trace` (and the one-shot :meth:`Pipeline.trace`).

A trace runs every processor's public :meth:`~samplerkit.steps.Processor.apply` densely, in
order, on a copy of the logits (the plugin contract makes the pipeline's fast paths equal to
``apply``, so this is the same distribution the pipeline samples from), and records after each
stage, per row, with ``p = softmax(input)`` and ``q = softmax(stage output)``:

* ``kept``: how many tokens are still finite (not ``-inf``);
* ``mass``: ``sum(p_i for i kept)``, the kept set's probability under the *input* distribution;
* ``entropy``: ``H(q) = -sum q_i ln q_i`` in nats (``exp(H)`` is the "effective" number of tokens);
* ``top``: the ``n`` most likely tokens under ``q`` with their probabilities;
* ``invalid``: at the first stage that made the row unusable, what it made (NaN, +inf, or no
  token left), as the pipeline's ``on_invalid`` check would report it.

The stages are ``input`` (the logits as given), each processor (neutral ones too, marked as
such: the pipeline skips them), and, for a sampler that declares ``picks_argmax`` (greedy), the
sampler's own truncation to the argmax. :attr:`Trace.removed_at` records, per row and token,
the stage that removed the token (``-1``: kept to the end), so "what did my top_p do to this
token?" is :meth:`Trace.removed_by`. Nothing here runs unless a trace is asked for.

Taps for the decode loop (``generation.logprobs: {top: 5, at: [...]}``) come from
:func:`logprob_taps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from samplerkit.config import STAGE_INPUT, STAGE_PROCESSED, StepSpec, check_stages, stage_names
from samplerkit.context import StepContext
from samplerkit.errors import ConfigError, PluginError, short_repr
from samplerkit.steps import Processor, Sampler

#: Top tokens recorded per stage and row unless asked otherwise.
DEFAULT_TOP = 5


@dataclass
class Stage:
    """One stage of a :class:`Trace`; every tensor has the batch as its first dimension."""

    #: The name taps and tables use: ``input``, a step name (``top_k#2`` for a repeat), or the sampler's.
    name: str
    #: Where the stage is in the config: ``input``, ``pipeline[1] top_k``, ``sampler greedy``.
    location: str
    #: The plugin that provides the step (``None`` for the input).
    plugin: str | None
    #: ``[B, V]`` float32: the logits after this stage.
    logits: torch.Tensor
    #: ``[B]`` bool: rows this stage changes (False on every row of a neutral step, which the pipeline skips).
    active: torch.Tensor
    #: ``[B]`` int64: tokens still finite after this stage.
    kept: torch.Tensor
    #: ``[B]`` float32: the kept set's probability mass under the input distribution.
    mass: torch.Tensor
    #: ``[B]`` float32: the entropy of this stage's distribution, in nats.
    entropy: torch.Tensor
    #: ``[B, n]`` int64 and float32: the ``n`` most likely tokens of this stage and their
    #: probabilities (slots past ``kept`` hold probability 0).
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    #: Per row: what this stage made wrong ("NaN", "+inf", "no token left (every logit is -inf)")
    #: when it is the first stage to make the row unusable, else ``None``.
    invalid: list[str | None]

    def probs(self) -> torch.Tensor:
        """``[B, V]``: ``softmax(logits)`` (zero on removed tokens)."""
        return torch.softmax(self.logits, dim=-1)


@dataclass
class Trace:
    """The stages of one pipeline step over a batch of logits (see the module docstring)."""

    stages: list[Stage]
    #: ``[B, V]`` int32: the index in :attr:`stages` of the stage that removed each token (its
    #: logit became ``-inf`` there and stayed so), ``-1`` for tokens kept to the end.
    removed_at: torch.Tensor
    #: How many top tokens each stage records.
    top: int
    #: Index in :attr:`stages` of the last processor (0, the input, when there is none).
    processed_index: int

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def batch_size(self) -> int:
        return int(self.removed_at.shape[0])

    def stage(self, name: str) -> Stage:
        """The stage called ``name`` (``processed``: the last processor's output)."""
        if name == STAGE_PROCESSED:
            return self.stages[self.processed_index]
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} in this trace; stages: {', '.join([*self.names, STAGE_PROCESSED])}")

    def removed_by(self, token: int, row: int = 0) -> Stage | None:
        """The stage that removed ``token`` from ``row``, or ``None`` when the token survives
        every stage (it can be drawn)."""
        vocab = self.removed_at.shape[1]
        if not 0 <= int(token) < vocab:
            raise ValueError(f"token {token} is outside the vocabulary [0, {vocab})")
        index = int(self.removed_at[row, int(token)])
        return None if index < 0 else self.stages[index]

    def invalid_stage(self, row: int = 0) -> Stage | None:
        """The first stage that made ``row`` unusable (NaN, +inf, nothing left), or ``None``."""
        return next((s for s in self.stages if s.invalid[row] is not None), None)

    def rows(self, row: int = 0, decode: Callable[[int], str] | None = None) -> list[dict[str, Any]]:
        """One JSON-ready dict per stage for ``row``: name, location, plugin, active, kept, mass,
        entropy, invalid, and ``top`` as ``[{"id", "text", "p"}]`` (``text`` when ``decode``
        turns an id into text). Probabilities of removed slots are left out."""
        out = []
        for s in self.stages:
            kept = int(s.kept[row])
            top = [{"id": int(t), **({"text": decode(int(t))} if decode else {}), "p": float(p)}
                   for t, p in zip(s.top_ids[row].tolist()[:kept], s.top_probs[row].tolist()[:kept])]
            out.append({"stage": s.name, "location": s.location, "plugin": s.plugin, "active": bool(s.active[row]),
                        "kept": kept, "mass": _number(s.mass[row]), "entropy": _number(s.entropy[row]),
                        "invalid": s.invalid[row], "top": top})
        return out

    def table(self, row: int = 0, decode: Callable[[int], str] | None = None, top: int | None = None) -> str:
        """A plain-text table of ``row``: one line per stage with kept, mass, entropy and the
        top tokens (``decode`` turns ids into text; shown with ``repr`` so spaces are visible)."""
        top = self.top if top is None else min(top, self.top)
        header = ["stage", "kept", "mass", "entropy", f"top {top} (probability)"]
        lines = []
        for entry in self.rows(row, decode):
            name = entry["stage"] + ("" if entry["active"] or entry["stage"] == STAGE_INPUT else " (neutral)")
            tokens = ", ".join(f"{_show(t, decode)} {t['p']:.3f}" for t in entry["top"][:top])
            if entry["invalid"] is not None:
                tokens = f"INVALID: {entry['invalid']}"
            lines.append([name, str(entry["kept"]), _fmt(entry["mass"]), _fmt(entry["entropy"]), tokens])
        widths = [max(len(r[i]) for r in [header, *lines]) for i in range(4)]
        text = [" ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r[:4], widths))) + "  " + r[4]
                for r in [header, *lines]]
        return "\n".join(line.rstrip() for line in text)


def _number(value: torch.Tensor) -> float | None:
    """A float for JSON (``None`` for NaN: a row without a distribution)."""
    x = float(value)
    return None if math.isnan(x) else x


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _show(entry: dict[str, Any], decode) -> str:
    return repr(entry["text"]) if decode else f"#{entry['id']}"


def trace_steps(logits: torch.Tensor, ctx: StepContext | None, processors: Sequence[StepSpec],
                active_steps: Sequence[tuple[StepSpec, Processor]], sampler_spec: StepSpec, sampler: Sampler,
                top: int = DEFAULT_TOP) -> Trace:
    """The trace of ``processors`` (the pipeline's specs, in order), whose step instances for this
    batch are ``active_steps`` (the ones the bound pipeline runs: a spec without one is neutral on
    every row), then ``sampler``. The caller's ``logits`` are never modified."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"trace: top must be an integer >= 1 (how many top tokens per stage), got {short_repr(top)}")
    batch, vocab = logits.shape
    ctx = ctx if ctx is not None else StepContext(batch, vocab, device=logits.device)
    by_spec = {id(spec): step for spec, step in active_steps}
    names = stage_names(processors, sampler_spec)
    x = logits.float().clone() if logits.dtype != torch.float32 else logits.clone()
    p_input = torch.softmax(x, dim=-1)
    removed_at = torch.full((batch, vocab), -1, dtype=torch.int32, device=x.device)
    removed_at[x == float("-inf")] = 0
    made_invalid = torch.zeros(batch, dtype=torch.bool, device=x.device)
    n = min(top, vocab)
    stages = [_stage(STAGE_INPUT, STAGE_INPUT, None, x, torch.zeros(batch, dtype=torch.bool, device=x.device),
                     p_input, n, made_invalid)]
    for index, spec in enumerate(processors, start=1):
        step = by_spec.get(id(spec))
        if step is None:                               # neutral on every row: the pipeline skips it
            y, active = x, torch.zeros(batch, dtype=torch.bool, device=x.device)
        else:
            y, active = _apply(spec, step, x, ctx), step.active
        _mark_removed(removed_at, x, y, index)
        stages.append(_stage(names[index], spec.location, spec.plugin, y, active, p_input, n, made_invalid))
        x = y
    processed_index = len(stages) - 1
    if type(sampler).picks_argmax:
        # The sampler's own truncation: only the argmax (lowest id among ties) can be drawn.
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(1, x.argmax(dim=-1, keepdim=True), True)
        y = x.masked_fill(~keep, float("-inf"))
        _mark_removed(removed_at, x, y, len(stages))
        stages.append(_stage(names[-1], sampler_spec.location, sampler_spec.plugin, y,
                             torch.ones(batch, dtype=torch.bool, device=x.device), p_input, n, made_invalid))
    return Trace(stages, removed_at, n, processed_index)


def _apply(spec: StepSpec, step: Processor, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """``step.apply`` on a copy of ``x`` (a step may write into its input), checked as the
    pipeline checks it; a failure names the step and its plugin."""
    try:
        y = step.apply(x.clone(), ctx)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"{spec.location} (plugin {spec.plugin or 'unknown'}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != torch.float32:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise PluginError(f"{spec.location} (plugin {spec.plugin or 'unknown'}) returned {got}; "
                          f"processors must return float32 logits of shape {tuple(x.shape)}")
    return y


def _mark_removed(removed_at: torch.Tensor, before: torch.Tensor, after: torch.Tensor, index: int) -> None:
    """Tokens that became ``-inf`` at stage ``index`` are removed there; a token a (plugin) step
    brings back is no longer removed."""
    gone_before, gone_after = before == float("-inf"), after == float("-inf")
    removed_at[gone_after & ~gone_before] = index
    removed_at[gone_before & ~gone_after] = -1


def _stage(name: str, location: str, plugin: str | None, y: torch.Tensor, active: torch.Tensor,
           p_input: torch.Tensor, n: int, made_invalid: torch.Tensor) -> Stage:
    finite = torch.isfinite(y)
    kept = (y > float("-inf")).sum(dim=-1)
    q = torch.softmax(y, dim=-1)
    mass = (p_input * (y > float("-inf"))).sum(dim=-1)
    entropy = torch.special.entr(q).sum(dim=-1)
    top_probs, top_ids = q.nan_to_num(nan=-1.0).topk(n, dim=-1)
    # What would make the pipeline refuse the row, named at the first stage that does it.
    what = [None] * y.shape[0]
    nan, posinf, empty = y.isnan().any(-1), (y == float("inf")).any(-1), ~finite.any(-1)
    for row in (nan | posinf | empty).nonzero().squeeze(-1).tolist():
        if not made_invalid[row]:
            what[row] = "NaN" if nan[row] else "+inf" if posinf[row] else "no token left (every logit is -inf)"
            made_invalid[row] = True
    invalid_rows = made_invalid.clone()
    mass = mass.masked_fill(invalid_rows, float("nan"))
    entropy = entropy.masked_fill(invalid_rows, float("nan"))
    return Stage(name, location, plugin, y, active, kept, mass, entropy, top_ids, top_probs.clamp(min=0.0), what)


@dataclass
class TapValue:
    """A stage's view of one chosen token (plain data; the decode loop adds token text)."""

    logprob: float | None
    top: list[tuple[int, float]]
    invalid: str | None = None


def logprob_taps(trace_fn: Callable[..., Trace], logits: torch.Tensor, ctx: StepContext, ids: torch.Tensor,
                 stages: Sequence[str], top: int) -> list[dict[str, TapValue]]:
    """Per row, for each stage in ``stages``: the chosen token's ``log q[id]`` under that stage's
    distribution ``q`` and the ``top`` most likely tokens as ``(id, log q)`` (removed tokens never
    listed). A row that some stage at or before a tapped one made unusable has ``logprob None``,
    no top, and ``invalid`` naming the stage that did it and what it made. ``trace_fn`` is the
    bound pipeline's :meth:`trace`, called on the logits and context the tokens were drawn with."""
    traced = trace_fn(logits, ctx, top=max(top, 1))
    chosen = ids.view(-1, 1)
    out: list[dict[str, TapValue]] = [{} for _ in range(traced.batch_size)]
    first_bad = {}
    for index, s in enumerate(traced.stages):
        for row, what in enumerate(s.invalid):
            if what is not None:
                first_bad[row] = (index, f"{s.location} made {what}" if s.name != STAGE_INPUT else f"the input logits have {what}")
    for name in stages:
        stage = traced.stage(name)
        index = traced.processed_index if name == STAGE_PROCESSED else traced.names.index(name)
        logq = torch.log_softmax(stage.logits, dim=-1)
        picked = logq.gather(1, chosen).squeeze(1).tolist()
        # NaN rows are reported invalid below; keep NaN out of topk's ranking (nan_to_num would
        # also turn -inf into the lowest float, so a removed token would look kept).
        ranked = logq.masked_fill(logq.isnan(), float("-inf"))
        values, tops = ranked.topk(min(top, logq.shape[-1]), dim=-1) if top else (None, None)
        values = values.tolist() if top else None
        tops = tops.tolist() if top else None
        for row in range(traced.batch_size):
            bad = first_bad.get(row)
            if bad is not None and bad[0] <= index:
                out[row][name] = TapValue(None, [], bad[1])
                continue
            row_top = [(t, v) for t, v in zip(tops[row], values[row]) if v != float("-inf")] if top else []
            out[row][name] = TapValue(picked[row], row_top)
    return out


def check_tap_stages(stages: Sequence[str], processors: Sequence[StepSpec], sampler: StepSpec) -> None:
    """A :class:`ConfigError` naming the stages available when ``stages`` names one the pipeline
    does not have (for taps given as a ``generate(logprobs=...)`` override, after the config)."""
    issues = check_stages(stages, processors, sampler)
    if issues:
        raise ConfigError(issues)


__all__ = ["DEFAULT_TOP", "Stage", "TapValue", "Trace", "check_tap_stages", "logprob_taps", "trace_steps"]
