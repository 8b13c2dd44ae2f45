"""How a bound pipeline runs its processors: a plan decided once, and one typed state.

:class:`RunPlan` is computed when a pipeline is bound (:class:`samplerkit.pipeline.BoundPipeline`)
from what the steps declare (:mod:`samplerkit.steps`, :mod:`samplerkit.fastpath`) and from the
device: which steps have the internal fast forms, which are monotone and may be deferred past a
rank-based selection, the monotone tail (temperature last, llama.cpp's order), which step hands
its threshold to the sampler instead of writing truncated logits, which forms the sampler takes,
and the implementation (sync-free or host-checked, Triton kernels or torch ops). Nothing of this
is looked up again per call.

Between two steps the logits are in exactly one of three forms, the :data:`State`:

- :class:`Dense`: ``[B, V]`` float32 logits, ``owned`` when the pipeline may write into them
  (a copy or a workspace, never the caller's tensor);
- :class:`Candidates`: a short sorted candidate list ``(values, ids)`` ``[B, K]`` after a
  truncation; every other token is ``-inf``;
- :class:`PendingCut`: dense logits and a truncation's threshold not yet written
  (:class:`~samplerkit.ops.truncation.Cut`), made only while sampling, for a sampler that can
  draw from it directly (``sample_cut``).

:func:`run_steps` takes the logits through the plan's steps top-down; each form converts to the
dense one (:meth:`Dense.to_dense` and friends), which is what a step without a fast form gets.
Every fast form gives exactly what the dense form gives (``tests/test_sampling_paths.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from samplerkit.context import StepContext
from samplerkit.errors import PluginError
from samplerkit.fastpath import FastPathProcessor, FastPathSampler
from samplerkit.ops import _triton
from samplerkit.ops.candidates import NEG_INF, densify
from samplerkit.ops.histogram import scratch
from samplerkit.ops.sync import sync_free
from samplerkit.ops.truncation import Cut, cut_below
from samplerkit.spec import StepSpec
from samplerkit.steps import Processor, Sampler

# -- the state between two steps ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dense:
    """``[B, V]`` logits; ``owned``: the pipeline's own tensor, which steps may write into."""

    values: torch.Tensor
    owned: bool = False

    def to_dense(self, vocab: int) -> Dense:
        return self

    def valid(self, plan: RunPlan) -> torch.Tensor:
        """``[B]`` bool: the row has a finite maximum (no NaN, no ``+inf``, something left):
        one read pass (``amax`` propagates NaN)."""
        return torch.isfinite(self.values.amax(dim=-1))

    def kept(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, 1]`` bool: whether token ``ids`` ``[B, 1]`` was kept (is not ``-inf``)."""
        return self.values.gather(1, ids) > NEG_INF


@dataclass(frozen=True, slots=True)
class Candidates:
    """A candidate list: ``values`` ``[B, K]`` sorted descending (``-inf`` in unused slots) at
    token ids ``ids``; every other token is ``-inf``."""

    values: torch.Tensor
    ids: torch.Tensor

    def to_dense(self, vocab: int) -> Dense:
        return Dense(densify(self.values, self.ids, vocab), owned=True)

    def valid(self, plan: RunPlan) -> torch.Tensor:
        """Free on a candidate list: ``topk`` ranks NaN and ``+inf`` first."""
        if plan.triton and self.values.shape[-1] <= _triton.CANDIDATES_MAX:    # one kernel instead of five
            return _triton.candidates_valid(self.values)
        return torch.isfinite(self.values[:, 0]) & ~self.values.isnan().any(dim=-1)

    def kept(self, ids: torch.Tensor) -> torch.Tensor:
        return ((self.ids == ids) & (self.values > NEG_INF)).any(-1, keepdim=True)


@dataclass(frozen=True, slots=True)
class PendingCut:
    """``logits`` truncated by ``cut`` (keep ``x >= cut.threshold``, comparing ``cut.source``
    when set), not yet written."""

    logits: torch.Tensor
    cut: Cut

    def to_dense(self, vocab: int) -> Dense:
        return Dense(cut_below(self.logits, self.cut.threshold, source=self.cut.source), owned=True)

    def valid(self, plan: RunPlan) -> torch.Tensor:
        """Free: the row maximum is always kept."""
        return torch.isfinite(self.cut.row_max).squeeze(-1)

    def kept(self, ids: torch.Tensor) -> torch.Tensor:
        compared = self.logits if self.cut.source is None else self.cut.source
        return compared.gather(1, ids) >= self.cut.threshold


State = Dense | Candidates | PendingCut


# -- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stage:
    """One active processor as the run sees it, with everything decided at bind time."""

    spec: StepSpec
    step: Processor
    #: A :class:`~samplerkit.fastpath.FastPathProcessor`: may be asked for the fast forms. A
    #: plain :class:`~samplerkit.steps.Processor` is only ever asked for ``apply``.
    fast: bool
    #: Fast and monotone for this batch: may be deferred past a rank-based selection.
    monotone: bool
    #: ``apply`` may write into its input (always assumed of a plain Processor).
    inplace: bool
    #: Its output's validity is checked (it does not declare ``keeps_finite``).
    checked: bool
    #: While sampling, for a sampler with ``sample_cut``: ``"last"`` hands this step's threshold
    #: to the sampler (the last step), ``"before_tail"`` too, with the monotone tail after it
    #: applied to all logits (the sampler honours ``Cut.source``); ``None`` otherwise.
    cut: str | None


@dataclass(frozen=True, slots=True)
class RunPlan:
    """What a bound pipeline does on every call, decided once when it is bound."""

    stages: tuple[Stage, ...]
    #: The monotone steps at the end (temperature last): the suffix of :attr:`stages`.
    tail: tuple[Stage, ...]
    #: The sampler is a :class:`~samplerkit.fastpath.FastPathSampler` (takes candidate lists).
    sampler_fast: bool
    #: The sampler draws from a :class:`PendingCut` (it overrides ``sample_cut``).
    sampler_cuts: bool
    #: A sampler that picks the argmax after argmax-invariant processors needs none of them.
    skip_for_sampling: bool
    #: No host synchronisation while sampling (CUDA, ``SAMPLERKIT_SYNC_FREE=1``): the sampler's
    #: ids get only the host-side checks, and invalid rows are flagged on the device.
    sync_free: bool
    #: Triton kernels replace torch ops where the pipeline has one (CUDA with Triton installed).
    triton: bool

    @classmethod
    def bind(cls, steps: list[tuple[StepSpec, Processor]], sampler: Sampler, device: torch.device) -> RunPlan:
        implementation = cls.implementation(device)
        fast = [isinstance(step, FastPathProcessor) for _, step in steps]
        monotone = [f and bool(step.monotone) for f, (_, step) in zip(fast, steps)]
        tail_from = len(steps)
        while tail_from > 0 and monotone[tail_from - 1]:
            tail_from -= 1
        sampler_fast = isinstance(sampler, FastPathSampler)
        sampler_cuts = sampler_fast and type(sampler).sample_cut is not FastPathSampler.sample_cut
        # A sampler that honours Cut.source takes the truncation before the monotone tail as a
        # threshold on the values it saw; any other takes only the last step's.
        cut_before_tail = tail_from - 1 if sampler_fast and type(sampler).cut_source and tail_from < len(steps) else None

        def cut_role(i: int) -> str | None:
            if not sampler_cuts:
                return None
            return "last" if i == len(steps) - 1 else "before_tail" if i == cut_before_tail else None

        stages = tuple(
            Stage(spec, step, fast[i], monotone[i], inplace=not fast[i] or step.inplace,
                  checked=not step.keeps_finite, cut=cut_role(i))
            for i, (spec, step) in enumerate(steps))
        return cls(
            stages=stages, tail=stages[tail_from:], sampler_fast=sampler_fast, sampler_cuts=sampler_cuts,
            skip_for_sampling=type(sampler).picks_argmax and all(step.argmax_invariant for _, step in steps),
            sync_free=implementation[0], triton=implementation[1])

    @staticmethod
    def implementation(device: torch.device) -> tuple[bool, bool]:
        """``(sync_free, triton)`` for steps on ``device`` as things stand now (the environment,
        :data:`samplerkit.ops.sync.FORCE`): what a plan bound now takes."""
        # _triton.available looks at a tensor's device; an empty one stands for the device.
        return sync_free(device), _triton.available(torch.empty(0, device=device))


# -- the run ---------------------------------------------------------------------------------------


def run_steps(plan: RunPlan, logits: torch.Tensor, ctx: StepContext, work: dict, *,
              checks: list[torch.Tensor] | None, sampling: bool) -> State:
    """The plan's processors in order on ``logits`` (never modified).

    Once a truncation leaves a short candidate list, later steps that can work on it do so
    (``[B, K]`` instead of ``[B, V]``); a step that cannot gets dense logits back. Monotone steps
    wait while a rank-based selection (top_k) may follow: it then transforms only its ``k + 1``
    values. While ``sampling``, the ``[B, V]`` workspaces in ``work`` are reused, and a
    truncation the plan marks (:attr:`Stage.cut`) ends the run as a :class:`PendingCut`; else
    (``process``) the result is :class:`Dense` or :class:`Candidates`, never the caller's tensor.

    ``checks``, when given, receives a ``[B]`` validity flag of the output of every step that
    does not declare :attr:`~samplerkit.steps.Processor.keeps_finite`: a NaN or ``+inf`` such a
    step writes makes the row invalid even if a later step removes that token.
    """
    return _Run(plan, ctx, logits.shape[-1], work, checks, sampling).through(logits)


class _Run:
    """One call's run: the context, workspaces and checks that every transition needs."""

    def __init__(self, plan: RunPlan, ctx: StepContext, vocab: int, work: dict,
                 checks: list[torch.Tensor] | None, sampling: bool):
        self.plan, self.ctx, self.vocab, self.checks, self.sampling = plan, ctx, vocab, checks, sampling
        self.work = work
        # process() returns its result, so it never hands out a reused workspace.
        self.buffers = work if sampling else None

    def through(self, logits: torch.Tensor) -> State:
        first = logits.float()
        state: State = Dense(first, owned=first is not logits)    # a float32 copy is ours to modify
        deferred: list[Stage] = []             # monotone steps not yet applied
        for stage in self.plan.stages:
            if isinstance(state, Candidates):
                values = _call(stage.spec, stage.step.apply_candidates, state.values, state.ids, self.ctx) \
                    if stage.fast else None
                if values is not None:
                    state = self._checked(Candidates(values, state.ids), stage.checked)
                    continue
                state = state.to_dense(self.vocab)
            assert isinstance(state, Dense)
            if stage.monotone:
                deferred.append(stage)
                continue
            if deferred and stage.fast:
                selected = self._select_after(stage, state, deferred)
                if selected is not None:
                    state, deferred = selected, []
                    continue
            for waiting in deferred:
                state = self._apply(waiting, state)
            deferred = []
            if not stage.fast:
                state = self._apply(stage, state)
                continue
            selected = _call(stage.spec, stage.step.select_candidates, state.values, self.ctx)
            if isinstance(selected, Cut):
                # The step decided densely and hands back its threshold: the sampler applies it
                # (the plan's cut step, while sampling) or it is applied here, as apply would.
                if self.sampling and stage.cut:
                    return self._pending(stage, state.values, selected)
                state = self._cut(state, selected)
                continue
            if selected is not None:
                state = self._checked(Candidates(*selected), stage.checked)
                continue
            if self.sampling and stage.cut:
                cut = _call(stage.spec, stage.step.select_cut, state.values, self.ctx)
                if cut is not None:
                    return self._pending(stage, state.values, cut)
            state = self._apply(stage, state)
        return self._finish(state, deferred)

    def _checked(self, state: State, checked: bool) -> State:
        if self.checks is not None and checked:
            self.checks.append(state.valid(self.plan))
        return state

    def _apply(self, stage: Stage, state: Dense) -> Dense:
        """``stage``'s dense form; a step that writes in place gets a workspace copy of logits
        the pipeline does not own (a fast step writes into it with ``apply_into``)."""
        if stage.inplace and not state.owned:
            out = _run_step(stage.spec, stage.step, state.values, self.ctx, fast=stage.fast,
                            out=scratch(self.buffers, "dense", state.values, state.values.dtype))
            state = Dense(out, owned=True)
        else:
            out = _run_step(stage.spec, stage.step, state.values, self.ctx, fast=stage.fast)
            state = Dense(out, owned=state.owned or out is not state.values)
        return self._checked(state, stage.checked)

    def _select_after(self, stage: Stage, state: Dense, deferred: list[Stage]) -> Candidates | None:
        """``stage``'s selection on logits the deferred monotone steps have not transformed yet;
        one deferred division (temperature) can be fused into the selection's kernel."""
        divisor = deferred[0].step.fused_divisor() if len(deferred) == 1 else None
        selected = _call(stage.spec, stage.step.select_candidates_after, state.values, self.ctx,
                         partial(self._transform, deferred), divisor)
        if selected is None:
            return None
        return self._checked(Candidates(*selected), any(s.checked for s in (*deferred, stage)))

    def _transform(self, deferred: list[Stage], values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        for stage in deferred:
            values = _call(stage.spec, stage.step.apply_candidates, values, ids, self.ctx)
        return values

    def _cut(self, state: Dense, cut: Cut) -> Dense:
        """The threshold written, in place when the logits are ours."""
        out = state.values if state.owned else scratch(self.buffers, "dense", state.values, state.values.dtype)
        return Dense(cut_below(state.values, cut.threshold, out=out, work=self.work), owned=True)

    def _pending(self, stage: Stage, source: torch.Tensor, cut: Cut) -> PendingCut:
        """The run's end at the plan's cut step: the threshold handed to the sampler.

        Before a monotone tail ``f`` (``"before_tail"``): ``y = f(source)`` with the cut still
        comparing ``source``. The kept values equal the dense order's (cut, then ``f``) since
        ``f`` is elementwise and ``f(-inf) = -inf``, and ``f`` runs on logits without ``-inf``
        (temperature's cheap overflow check). ``source`` is left unchanged."""
        if stage.cut == "last":
            return PendingCut(source, cut)
        y, row_max, block_max = source, cut.row_max, cut.block_max
        zeros = torch.zeros_like(row_max, dtype=torch.int64)
        for tail in self.plan.tail:
            if y is source and tail.inplace:
                y = _run_step(tail.spec, tail.step, source, self.ctx, fast=True,
                              out=scratch(self.work, "monotone", source, source.dtype))
            else:
                y = _run_step(tail.spec, tail.step, y, self.ctx, fast=True)
            self._checked(Dense(y), tail.checked)
            # f is an elementwise map that never reverses an order (Stage.monotone), so it maps
            # the row maximum (always kept) to y's maximum, and a block's maximum to the block's
            # maximum of y: f of a few values per row, not a pass over y. (Elementwise: its
            # value does not depend on the token ids.)
            if row_max is not None:
                row_max = _call(tail.spec, tail.step.apply_candidates, row_max.clone(), zeros, self.ctx)
            if block_max is not None:
                block_max = _call(tail.spec, tail.step.apply_candidates, block_max.clone(),
                                  zeros.expand_as(block_max), self.ctx)
        if row_max is None:
            row_max = y.amax(dim=-1, keepdim=True)
        return PendingCut(y, cut._replace(row_max=row_max, weights=None, source=source,
                                          value_block_max=block_max))

    def _finish(self, state: State, deferred: list[Stage]) -> State:
        """Monotone steps at the end stay dense; process() never returns the caller's tensor."""
        for stage in deferred:
            assert isinstance(state, Dense)
            if state.owned and stage.inplace:     # into another buffer: the step can compare with its input
                out = _run_step(stage.spec, stage.step, state.values, self.ctx, fast=True,
                                out=scratch(self.buffers, "monotone", state.values, state.values.dtype))
                state = self._checked(Dense(out, owned=True), stage.checked)
            else:
                state = self._apply(stage, state)
        if not self.sampling and isinstance(state, Dense) and not state.owned:
            state = Dense(state.values.clone(), owned=True)
        return state


# -- calling a step --------------------------------------------------------------------------------


def _run_step(spec: StepSpec, step: Processor, x: torch.Tensor, ctx: StepContext, *,
              fast: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """``step.apply(x)``, or with ``out`` the result written into that buffer: through
    ``apply_into`` for a fast-path step (``fast``), else ``apply`` on a copy in ``out``."""
    shape = x.shape
    try:
        if out is None:
            out = step.apply(x, ctx)
        elif fast:
            out = step.apply_into(x, out, ctx)
        else:
            out = step.apply(out.copy_(x), ctx)
    except PluginError:
        raise
    except Exception as exc:
        raise plugin_failure(spec, exc) from exc
    if not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != torch.float32:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise PluginError(f"{spec.location} (plugin {spec.plugin or 'unknown'}) returned {got}; "
                          f"processors must return float32 logits of shape {tuple(shape)}")
    return out


def _call(spec: StepSpec, method, *args):
    try:
        return method(*args)
    except PluginError:
        raise                    # already names its step (a deferred step run inside this one)
    except Exception as exc:
        raise plugin_failure(spec, exc) from exc


def plugin_failure(spec: StepSpec, exc: Exception) -> PluginError:
    return PluginError(f"{spec.location} (plugin {spec.plugin or 'unknown'}) failed: {type(exc).__name__}: {exc}")
