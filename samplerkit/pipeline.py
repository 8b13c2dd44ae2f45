"""Pipelines: an ordered chain of processors and exactly one sampler.

A :class:`Pipeline` is the validated, batch-independent description. :meth:`Pipeline.bind`
packs per-row parameters for one batch composition into a :class:`BoundPipeline`, whose
``process``/``sample`` run on every token without per-row Python work. The pipeline knows
nothing about backends.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, get_args

import torch

from samplerkit.config import InvalidPolicy, RunConfig, StepSpec
from samplerkit.context import StepContext
from samplerkit.errors import ConfigError, ConfigIssue, InvalidLogitsError, PluginError, short_repr
from samplerkit.ops.sync import sync_free_scope
from samplerkit.runplan import Candidates, Dense, PendingCut, RunPlan, State, plugin_failure, run_steps
from samplerkit.seeded import RowStreams, Seeded
from samplerkit.steps import Processor, Sampler
from samplerkit.trace import Trace, trace_steps

INVALID_POLICIES: tuple[str, ...] = get_args(InvalidPolicy)

#: Per-row parameter overrides: step name -> {field: value}; applies to every step of that name.
RowOverrides = Mapping[str, Mapping[str, Any]]


class Pipeline:
    """Processors applied in the given order, then one sampler.

    Build one from a config (:func:`samplerkit.load_pipeline`) or from Python::

        Pipeline([Temperature.spec(temperature=0.7), TopP.spec(top_p=0.9)],
                 sampler=Categorical.spec(seed=1))
    """

    def __init__(self, processors: Sequence[StepSpec], sampler: StepSpec, *, device: torch.device | str = "cpu",
                 on_invalid: InvalidPolicy = "raise"):
        for i, spec in enumerate(processors):
            if not issubclass(spec.cls, Processor):
                raise ConfigError(ConfigIssue(f"pipeline[{i}]", f"{spec.cls.__name__} is not a Processor"))
        if not issubclass(sampler.cls, Sampler):
            raise ConfigError(ConfigIssue("sampler", f"{sampler.cls.__name__} is not a Sampler"))
        self.processors: tuple[StepSpec, ...] = tuple(
            spec if spec.location else StepSpec(spec.cls, spec.params, f"pipeline[{i}] {spec.name}", spec.plugin)
            for i, spec in enumerate(processors))
        self.sampler: StepSpec = sampler if sampler.location else StepSpec(sampler.cls, sampler.params, f"sampler {sampler.name}", sampler.plugin)
        self.device = torch.device(device)
        if on_invalid not in INVALID_POLICIES:
            raise ConfigError(ConfigIssue("on_invalid", f"must be one of {', '.join(INVALID_POLICIES)}, got {short_repr(on_invalid)}"))
        #: What happens to rows whose logits are unusable; see :data:`samplerkit.config.InvalidPolicy`.
        self.on_invalid = on_invalid

    @classmethod
    def from_config(cls, config: RunConfig, *, device: torch.device | str = "cpu") -> Pipeline:
        return cls(config.processors, config.sampler, device=device, on_invalid=config.on_invalid)

    @property
    def uses(self) -> frozenset[str]:
        """History the decode loop must keep for these steps."""
        out: set[str] = set()
        for spec in (*self.processors, self.sampler):
            out |= spec.cls.uses
        return frozenset(out)

    @property
    def takes_seed(self) -> bool:
        """Whether any step (the sampler or a random processor such as xtc) takes a per-row seed."""
        return any(_takes_seed(spec) for spec in (*self.processors, self.sampler))

    def describe(self) -> str:
        """``temperature(temperature=0.6) -> top_p(top_p=0.9) => categorical(seed=None)``"""
        def one(spec: StepSpec) -> str:
            args = ", ".join(f"{k}={v!r}" for k, v in spec.params.model_dump().items())
            return f"{spec.name}({args})"
        chain = " -> ".join(one(s) for s in self.processors)
        return f"{chain} => {one(self.sampler)}" if chain else one(self.sampler)

    # -- binding ----------------------------------------------------------------------
    def bind(self, rows: int | Sequence[RowOverrides | None], *, seeds: Sequence[int | None] | None = None) -> BoundPipeline:
        """Pack parameters for a batch: ``rows`` is a batch size, or one override mapping per row."""
        overrides = _check_rows(rows)
        if seeds is not None and len(seeds) != len(overrides):
            raise ValueError(f"seeds has {len(seeds)} entries for a batch of {len(overrides)} rows")
        row_specs = [self._row_specs(o, i) for i, o in enumerate(overrides)]
        if seeds is not None and any(s is not None for s in seeds):
            # A row's seed reaches every seeded step of the row (the sampler and any random
            # processor such as xtc); each step keys its own stream, so they stay independent.
            seeded = [j for j, spec in enumerate(self.processors) if _takes_seed(spec)]
            if not self.takes_seed:
                names = ", ".join(s.name for s in (*self.processors, self.sampler))
                raise ConfigError(ConfigIssue("seeds", f"no step of this pipeline takes a seed ({names}); "
                                                       "pass seeds=None or add a random step (e.g. sampler: categorical)"))

            def seeded_row(i: int, procs: list[StepSpec], samp: StepSpec, seed: int | None):
                if seed is None:
                    return procs, samp
                procs = [_with_seed(p, seed, i) if j in seeded else p for j, p in enumerate(procs)]
                return procs, (_with_seed(samp, seed, i) if _takes_seed(samp) else samp)

            row_specs = [seeded_row(i, procs, samp, seed)
                         for i, ((procs, samp), seed) in enumerate(zip(row_specs, seeds))]
        return BoundPipeline(self, [r[0] for r in row_specs], [r[1] for r in row_specs])

    def _row_specs(self, overrides: RowOverrides | None, row: int) -> tuple[list[StepSpec], StepSpec]:
        if not overrides:
            return list(self.processors), self.sampler
        known = {s.name for s in self.processors} | {self.sampler.name}
        unknown = [k for k in overrides if k not in known]
        if unknown:
            raise ConfigError(ConfigIssue(f"rows[{row}]", f"overrides name steps not in this pipeline: "
                                                         f"{', '.join(map(repr, unknown))}; steps: {', '.join(sorted(known))}"))
        for name, values in overrides.items():
            if not isinstance(values, Mapping):
                raise ConfigError(ConfigIssue(
                    f"rows[{row}] {name}", f"must map that step's parameters to values, e.g. "
                    f"{{{name!r}: {{{name!r}: {short_repr(values)}}}}} (a step name, then its parameters), got {short_repr(values)}"))
        procs = [s.with_params(overrides.get(s.name, {}), f"rows[{row}] {s.name}") for s in self.processors]
        samp = self.sampler.with_params(overrides.get(self.sampler.name, {}), f"rows[{row}] {self.sampler.name}")
        return procs, samp

    # -- one-shot library calls -------------------------------------------------------
    # Each call gives what a fresh bind gives (its own seeds, no state carried over from an
    # earlier call) at about a bound call's cost: the bound pipeline of this thread's previous
    # call at this batch size is reused when that is the same, else its [B, V] workspaces
    # (allocating them anew costs about as much as the step itself: page faults). See _one_shot.
    def process(self, logits: torch.Tensor, ctx: StepContext | None = None) -> torch.Tensor:
        """Processed logits ``[B, V]`` float32 (a new tensor; the input is never modified)."""
        with _one_shot(self, check_logits(logits, "process").shape[0]) as bound:
            return bound.process(logits, ctx)

    def sample(self, logits: torch.Tensor, seeds: Sequence[int | None] | None = None,
               ctx: StepContext | None = None) -> torch.Tensor:
        """Token ids ``[B]`` int64; ``seeds`` gives one optional seed per row. The same tokens as
        ``bind(B, seeds=seeds).sample(logits, ctx)``."""
        with _one_shot(self, check_logits(logits, "sample").shape[0], seeds) as bound:
            return bound.sample(logits, ctx)

    def trace(self, logits: torch.Tensor, ctx: StepContext | None = None, *, seeds: Sequence[int | None] | None = None,
              top: int = 5) -> Trace:
        """``bind(B, seeds=seeds).trace(logits, ctx, top=top)``: see :meth:`BoundPipeline.trace`."""
        return self.bind(check_logits(logits, "trace").shape[0], seeds=seeds).trace(logits, ctx, top=top)


class BoundPipeline:
    """A pipeline with step instances built for one batch composition.

    Binding decides everything that does not change from call to call (a
    :class:`~samplerkit.runplan.RunPlan`: which steps take the fast forms, where monotone steps
    are deferred or a truncation's threshold goes to the sampler, sync-free or checked, Triton
    or torch, from the device); every call then runs that plan.

    Thread safety: the bound pipeline and its steps reuse ``[B, V]`` workspaces from call to
    call, so calls on one bound pipeline from several threads are serialised by a lock (each
    gets exactly the result of a sequential call). Threads that should run in parallel each
    bind their own (:meth:`Pipeline.bind` is cheap; :class:`Pipeline` itself holds no state).
    """

    def __init__(self, pipeline: Pipeline, row_processors: Sequence[Sequence[StepSpec]], row_samplers: Sequence[StepSpec]):
        self.pipeline = pipeline
        # Serialises process/sample: the workspaces below are shared by every call.
        self._lock = threading.RLock()
        self._row_processors = [list(r) for r in row_processors]
        self._row_samplers = list(row_samplers)
        device = pipeline.device
        self.steps: list[tuple[StepSpec, Processor]] = []
        #: Every step built, active or not, in the order they were built (and drew the seeds of
        #: rows without one): what the one-shot call reseeds when it reuses them (_one_shot).
        self._built: list[Processor | Sampler] = []
        for j, spec in enumerate(pipeline.processors):
            step = spec.cls([row[j].params for row in self._row_processors], device)
            self._built.append(step)
            if step.any_active:                    # host flag: all-neutral steps are skipped
                self.steps.append((spec, step))
        self.sampler: Sampler = pipeline.sampler.cls([s.params for s in self._row_samplers], device)
        self._built.append(self.sampler)
        self._work: dict = {}           # the [B, V] workspaces of the run, reused from call to call
        self._plan = RunPlan.bind(self.steps, self.sampler, device)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def select_rows(self, keep: Sequence[int]) -> BoundPipeline:
        """The same per-row parameters for a subset (or fan-out) of the rows."""
        bound = BoundPipeline(self.pipeline, [self._row_processors[i] for i in keep], [self._row_samplers[i] for i in keep])
        # Per-row state follows its rows: a row without a seed keeps the random stream drawn for
        # it when the batch was formed (samplerkit.seeded), a constrained row its matcher. Any
        # step with follow_rows(previous, keep) takes over its predecessor's state this way.
        index = torch.as_tensor(list(keep), dtype=torch.int64)
        before = {id(spec): step for spec, step in self.steps}
        pairs = [(before.get(id(spec)), step) for spec, step in bound.steps] + [(self.sampler, bound.sampler)]
        for old, new in pairs:
            if old is not None and type(old) is type(new) and callable(getattr(new, "follow_rows", None)):
                new.follow_rows(old, index)
        return bound

    @staticmethod
    def can_concat(pipeline: Pipeline) -> bool:
        """Whether :meth:`concat` can join bound copies of ``pipeline``: every step keeps its
        per-row state (if any) in the step context or in seeded streams, not in a
        ``follow_rows`` of its own (a constraint's matchers)."""
        for spec in (*pipeline.processors, pipeline.sampler):
            follow = getattr(spec.cls, "follow_rows", None)
            if follow is not None and follow is not Seeded.follow_rows:
                return False
        return True

    @classmethod
    def concat(cls, parts: Sequence[BoundPipeline]) -> BoundPipeline:
        """One bound pipeline for the rows of ``parts`` (bound copies of one pipeline), in
        order, each row with its parameters and random stream: what the rows draw does not
        change (each row's stream is keyed by its seed and its own counter). Only for
        pipelines :meth:`can_concat` accepts."""
        first = parts[0]
        bound = cls(first.pipeline, [r for p in parts for r in p._row_processors],
                    [s for p in parts for s in p._row_samplers])

        def streams_of(part: BoundPipeline, spec, new_step, start: int, size: int) -> torch.Tensor:
            old = part.sampler if spec is None else next((st for sp, st in part.steps if sp is spec), None)
            if old is not None and isinstance(old, Seeded):
                return old.streams.seeds.to(new_step.streams.seeds.device)
            return new_step.streams.seeds[start:start + size]      # inactive there: as bound now

        pairs = [(spec, step) for spec, step in bound.steps] + [(None, bound.sampler)]
        for spec, step in pairs:
            if not isinstance(step, Seeded):
                continue
            seeds, start = [], 0
            for part in parts:
                size = part.batch_size
                seeds.append(streams_of(part, spec, step, start, size))
                start += size
            step.streams = RowStreams(torch.cat(seeds))
        return bound

    def process(self, logits: torch.Tensor, ctx: StepContext | None = None) -> torch.Tensor:
        """Run every active processor in order on a float32 copy of ``logits``."""
        logits = self._check_batch(logits, "process")
        ctx = _context(logits, ctx)
        with self._lock:
            state = run_steps(self._plan, logits, ctx, self._work, checks=None, sampling=False)
        return state.to_dense(logits.shape[-1]).values

    def sample(self, logits: torch.Tensor, ctx: StepContext | None = None,
               processed: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B]``; pass ``processed`` when :meth:`process` already ran this step."""
        return self.sample_with_validity(logits, ctx, processed)[0]

    def sample_with_validity(self, logits: torch.Tensor, ctx: StepContext | None = None,
                             processed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B]`` and a ``[B]`` bool flag: False where the row's logits were unusable
        (NaN, +inf, nothing left) and the pipeline's ``on_invalid`` policy substituted the argmax
        of the row's finite input logits. Under ``raise`` an invalid row raises instead. Other
        rows are never affected: invalid rows are neutralised before the sampler runs."""
        with self._lock:
            logits = self._check_batch(logits, "sample")
            if not self._plan.sync_free:
                return self._sample(logits, ctx, processed, sync_free=False)
            with sync_free_scope():
                ids, valid = self._sample(logits, ctx, processed, sync_free=True)
            if self.pipeline.on_invalid == "raise" and not bool(valid.all()):   # one sync, after the step
                raise InvalidLogitsError(self._diagnose(logits, _context(logits, ctx), valid))
            return ids, valid

    def sample_async(self, logits: torch.Tensor, ctx: StepContext | None = None,
                     processed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample_with_validity` without any host synchronisation on CUDA (and without
        raising): every branch is a host-side flag or a device-side select, so the step can be
        queued ahead of the GPU or captured in a CUDA graph (:meth:`capture`). Invalid rows get
        the argmax of their finite input logits unless the policy is ``raise``, in which case the
        caller checks the returned ``valid`` (their token is then meaningless). Rows never affect
        each other: every op is row-wise."""
        with self._lock, sync_free_scope():
            return self._sample(self._check_batch(logits, "sample_async"), ctx, processed, sync_free=True)

    def _sample(self, logits: torch.Tensor, ctx: StepContext | None, processed: torch.Tensor | None, *,
                sync_free: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The one sampling path: the processors' output in the form the sampler takes cheapest,
        the ``[B]`` row validity, the sampler's ids. ``sync_free``: no host synchronisation
        (invalid rows are replaced on the device and never raise here); else one host check
        of the validity, and invalid rows become uniform rows before the sampler sees them."""
        ctx = _context(logits, ctx)
        vocab = logits.shape[-1]
        state, valid = self._prepare(logits, ctx, processed)
        if sync_free:
            ids = self._draw(state, ctx, vocab, valid, checked=False)
            if self.pipeline.on_invalid != "raise":
                ids = torch.where(valid, ids, _finite_argmax(logits))
            return ids, valid
        all_valid = bool(valid.all())
        if not all_valid:
            if self.pipeline.on_invalid == "raise":
                raise InvalidLogitsError(self._diagnose(logits, ctx, valid))
            # A uniform row in place of each invalid one: the sampler never sees NaN.
            state = Dense(state.to_dense(vocab).values.masked_fill((~valid).unsqueeze(-1), 0.0), owned=True)
        ids = self._draw(state, ctx, vocab, valid, checked=True)
        if not all_valid:
            ids = torch.where(valid, ids, _finite_argmax(logits))
        return ids, valid

    def _prepare(self, logits: torch.Tensor, ctx: StepContext, processed: torch.Tensor | None) -> tuple[State, torch.Tensor]:
        """The processors' output as a :data:`~samplerkit.runplan.State` and the ``[B]`` row
        validity: the row's input, its output and every step's output that may add NaN or
        ``+inf`` (see :func:`~samplerkit.runplan.run_steps`) have a finite maximum."""
        if processed is None and (self._plan.skip_for_sampling or not self._plan.stages):
            state = Dense(logits if logits.dtype == torch.float32 else logits.float())
            return state, state.valid(self._plan)     # the input is what is sampled
        checks: list[torch.Tensor] = []
        if processed is not None:
            state: State = Dense(processed)
        else:
            state = run_steps(self._plan, logits, ctx, self._work, checks=checks, sampling=True)
        checks.append(_input_valid(logits, state, self._plan))     # the input is never modified
        valid = state.valid(self._plan)
        for check in checks:
            valid = valid & check
        return state, valid

    def _draw(self, state: State, ctx: StepContext, vocab: int, valid: torch.Tensor, *, checked: bool) -> torch.Tensor:
        """The sampler's tokens from whichever form the state has; a sampler without that fast
        form gets dense logits (the same draw, by contract). The ids are checked as processor
        output is (see :meth:`_check_ids`)."""
        try:
            if isinstance(state, PendingCut):       # only made for a sampler with sample_cut
                ids = self.sampler.sample_cut(state.logits, state.cut, ctx)
                if ids is not None:
                    return self._check_ids(ids, vocab, valid, state, checked)
                state = state.to_dense(vocab)
            if isinstance(state, Candidates):
                ids = self.sampler.sample_candidates(state.values, state.ids, ctx) if self._plan.sampler_fast else None
                if ids is not None:
                    return self._check_ids(ids, vocab, valid, state, checked)
                state = state.to_dense(vocab)
            ids = self.sampler.sample(state.values, ctx)
        except PluginError:
            raise
        except Exception as exc:
            raise plugin_failure(self.pipeline.sampler, exc) from exc
        return self._check_ids(ids, vocab, valid, state, checked)

    def _check_ids(self, ids: Any, vocab: int, valid: torch.Tensor, state: State, checked: bool) -> torch.Tensor:
        """``ids`` if they are what a sampler must return: an int64 ``[B]`` tensor of ids in
        ``[0, V)``, each a token ``state`` kept; else a PluginError naming the sampler and its
        plugin. One ``[B]`` check; without ``checked`` (the sync-free path) only the host-side
        checks run (type, dtype, shape). Rows marked invalid (``valid`` False) are not checked:
        their token is replaced or meaningless."""
        spec = self.pipeline.sampler
        where = f"{spec.location} (plugin {spec.plugin or 'unknown'})"
        batch = self.batch_size
        if not isinstance(ids, torch.Tensor):
            raise PluginError(f"{where} returned {type(ids).__name__}; samplers must return an int64 tensor of shape ({batch},)")
        if ids.dtype != torch.int64:
            raise PluginError(f"{where} returned {ids.dtype} ids; samplers must return int64 token ids (e.g. argmax(dim=-1))")
        if tuple(ids.shape) != (batch,):
            raise PluginError(f"{where} returned ids of shape {tuple(ids.shape)}; samplers must return one id per row, "
                              f"shape ({batch},)" + (" (squeeze the last dimension)" if ids.dim() == 2 else ""))
        if not checked:
            return ids
        outside = ((ids < 0) | (ids >= vocab)) & valid
        if bool(outside.any()):
            rows = outside.nonzero().squeeze(-1).tolist()
            raise PluginError(f"{where} returned ids outside [0, {vocab}): {ids[rows].tolist()} in rows {rows}")
        removed = ~state.kept(ids.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1) & valid
        if bool(removed.any()):
            rows = removed.nonzero().squeeze(-1).tolist()
            raise PluginError(f"{where} chose tokens the processed logits removed (-inf): {ids[rows].tolist()} "
                              f"in rows {rows}")
        return ids

    def capture(self, logits: torch.Tensor, ctx: StepContext) -> CapturedStep:
        """A CUDA graph of one :meth:`sample_async` step for this batch shape (see :class:`CapturedStep`)."""
        return CapturedStep(self, logits, ctx)

    def _diagnose(self, logits: torch.Tensor, ctx: StepContext, valid: torch.Tensor) -> str:
        """Re-run the steps densely to name the first stage that made each invalid row invalid."""
        bad_rows = (~valid).nonzero().squeeze(-1).tolist()
        x = logits.float().clone()
        found: dict[int, str] = {}
        for row in bad_rows:
            if (what := _what_is_wrong(x[row])) is not None:
                found[row] = f"the input logits (before any processor) have {what}"
        for spec, step in self.steps:
            if len(found) == len(bad_rows):
                break
            try:
                x = step.apply(x.clone(), ctx)
            except Exception:
                break
            for row in bad_rows:
                if row not in found and (what := _what_is_wrong(x[row])) is not None:
                    found[row] = f"{spec.location} (plugin {spec.plugin or 'unknown'}) produced {what}"
        details = "; ".join(f"row {row}: {found.get(row, 'the sampler input was invalid')}" for row in bad_rows)
        return (f"invalid logits in {len(bad_rows)} row(s) of {len(valid)}: {details}. Set `on_invalid: "
                f"mark_invalid` or `on_invalid: fallback_greedy` in the config to keep generating.")

    def _check_batch(self, logits: torch.Tensor, method: str) -> torch.Tensor:
        logits = check_logits(logits, method)
        if logits.shape[0] != self.batch_size:
            raise ValueError(f"{method}: logits have {logits.shape[0]} rows but the pipeline was bound for "
                             f"{self.batch_size}; bind it for this batch (pipeline.bind({logits.shape[0]}))")
        return logits

    def trace(self, logits: torch.Tensor, ctx: StepContext | None = None, *, top: int = 5) -> Trace:
        """What each stage does to these logits, per row: kept count, mass, entropy, top tokens,
        and which stage removed each token (:class:`samplerkit.trace.Trace`). Runs every step's
        ``apply`` densely; costs nothing unless called."""
        logits = self._check_batch(logits, "trace")
        with self._lock:
            return trace_steps(logits, ctx, self.pipeline.processors, self.steps, self.pipeline.sampler,
                               self.sampler, top)


class CapturedStep:
    """One sampling step of a bound pipeline recorded as a CUDA graph, replayed per token.

    Kernel launches dominate a sampling step on a GPU (tens of small kernels for
    ``[B, V]`` logits); a replay launches them all at once. Made by :meth:`BoundPipeline.capture`
    for fixed ``logits`` shape and dtype and one :class:`StepContext` (its ``num_generated``
    and history tensors are read in place, so the decode loop keeps updating that same context).
    Each call copies ``logits`` into the graph's input :attr:`logits`, replays, and returns
    ``(ids, valid)`` as :meth:`BoundPipeline.sample_async` would (the tensors are the graph's
    outputs, overwritten by the next call). A caller that writes the logits into
    :attr:`logits` itself passes that tensor and saves the copy (at B=64, V=128256 one copy
    moves 64 MB). The draws equal the eager ones: same ops, same noise.
    """

    def __init__(self, bound: BoundPipeline, logits: torch.Tensor, ctx: StepContext):
        if not logits.is_cuda:
            raise ValueError("CUDA graphs need CUDA logits")
        self.bound, self.ctx = bound, ctx
        self.logits = logits.clone()
        # Warm up on a side stream first (workspaces, Triton compilation, cuBLAS/cub handles).
        stream = torch.cuda.Stream(device=logits.device)
        stream.wait_stream(torch.cuda.current_stream(logits.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                bound.sample_async(self.logits, ctx)
        torch.cuda.current_stream(logits.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.ids, self.valid = bound.sample_async(self.logits, ctx)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits is not self.logits:
            self.logits.copy_(logits)
        self.graph.replay()
        return self.ids, self.valid


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_logits(logits: Any, method: str) -> torch.Tensor:
    """``logits`` if the pipeline can take them (a real floating-point ``[B, V]`` tensor with
    ``B, V >= 1``), else a ValueError saying what to pass. Sampling is not differentiable: a
    tensor that requires grad is sampled detached (the ids are the same); :meth:`process`
    refuses it rather than return logits silently cut from the graph."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{method}: logits must be a torch.Tensor of shape [batch, vocab], got {type(logits).__name__}; "
                         f"pass torch.tensor(...) of float logits")
    if logits.dim() != 2:
        hint = " (one row: logits.unsqueeze(0))" if logits.dim() == 1 else ""
        raise ValueError(f"{method}: logits must be [batch, vocab], got shape {tuple(logits.shape)}{hint}")
    if logits.shape[0] == 0:
        raise ValueError(f"{method}: logits have no rows (shape {tuple(logits.shape)}); pass at least one row")
    if logits.shape[1] == 0:
        raise ValueError(f"{method}: logits have an empty vocabulary (shape {tuple(logits.shape)}); "
                         f"pass one logit per token of the vocabulary")
    if logits.is_complex():
        raise ValueError(f"{method}: logits are complex ({logits.dtype}); pass real logits (logits.real, "
                         f"if the imaginary part is meaningless)")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{method}: logits must be floating point (float32, float16, bfloat16 or float64), got "
                         f"{logits.dtype} (integer and bool tensors are not logits); pass logits.float() if these are logit values")
    if logits.requires_grad:
        if method == "process":
            raise ValueError("process: logits require grad, but the processed logits cannot carry gradients "
                             "(truncation is not differentiable); pass logits.detach()")
        logits = logits.detach()
    return logits


def _check_rows(rows: Any) -> list[RowOverrides | None]:
    """``bind``'s ``rows`` as one override mapping (or None) per row."""
    if isinstance(rows, bool) or not isinstance(rows, (int, Sequence)) or isinstance(rows, (str, bytes)):
        raise ConfigError(ConfigIssue("rows", f"must be a batch size (an int >= 1) or a list with one override "
                                              f"mapping (or None) per row, got {short_repr(rows)}"))
    if isinstance(rows, int):
        if rows < 1:
            raise ConfigError(ConfigIssue("rows", f"the batch size must be at least 1, got {rows}"))
        return [None] * rows
    overrides = list(rows)
    if not overrides:
        raise ConfigError(ConfigIssue("rows", "is empty; pass one override mapping (or None) per row"))
    for i, row in enumerate(overrides):
        if row is not None and not isinstance(row, Mapping):
            raise ConfigError(ConfigIssue(f"rows[{i}]", f"must be a mapping of step name to parameters, e.g. "
                                                        f"{{'top_p': {{'top_p': 0.5}}}}, or None, got {short_repr(row)}"))
    return overrides



#: Per thread: pipeline -> {batch size: _Kept} of its last one-shot calls.
_ONE_SHOT = threading.local()
#: Batch sizes whose workspaces a pipeline keeps per thread (the least recently used goes).
ONE_SHOT_BATCH_SIZES = 2


@dataclass
class _Kept:
    """What a one-shot call leaves for the next one with the same batch size on its thread."""

    #: The classes owning the workspaces, in order, and their ``_work`` dicts.
    classes: list[type]
    works: list[dict]
    #: The bound pipeline's attributes but ``pipeline``, when a fresh bind would build the very
    #: same one for ``key``. Without ``pipeline``: the per-thread cache is keyed weakly by the
    #: pipeline, and a value that referred to its key would keep it alive for ever.
    parts: dict | None
    key: tuple


@contextmanager
def _one_shot(pipeline: Pipeline, batch: int, seeds: Sequence[int | None] | None = None) -> Iterator[BoundPipeline]:
    """What ``pipeline.bind(batch, seeds=seeds)`` gives, at a bound call's cost where possible.

    The previous one-shot call with this batch size on this thread left its bound pipeline's
    steps, plan and ``[B, V]`` workspaces and the key it was bound for: the seeds and the
    implementation the device asks for now (:meth:`RunPlan.implementation`). The same key
    reuses them when a fresh bind would build the same ones and nothing carries over from call
    to call: every step declares ``reusable`` (:mod:`samplerkit.fastpath`). Rows without a seed
    drew one from torch's global generator when the steps were built; a reused pipeline draws
    them again (:meth:`samplerkit.seeded.Seeded.reseed`, step by step in the order they were
    built: the same generator calls as a fresh bind, so two calls draw independently and
    ``torch.manual_seed`` reproduces a call). Otherwise the call binds afresh and takes over
    only the workspaces (the ``_work`` dicts of scratch buffers): the draws are always a fresh
    bind's. Threads never share these, and a nested call on the same thread gets its own (the
    entry is taken out while in use)."""
    cache = getattr(_ONE_SHOT, "work", None)
    if cache is None:
        cache = _ONE_SHOT.work = weakref.WeakKeyDictionary()
    sizes = cache.setdefault(pipeline, OrderedDict())
    kept = sizes.pop(batch, None)
    # Only plain ints and None make a key: anything else goes to bind, which explains it.
    plain = seeds is None or (isinstance(seeds, (list, tuple)) and all(s is None or type(s) is int for s in seeds))
    key = (tuple(seeds) if seeds is not None else None, RunPlan.implementation(pipeline.device)) if plain else None
    if kept is not None and kept.parts is not None and key is not None and kept.key == key:
        bound = object.__new__(BoundPipeline)       # the same steps, plan and workspaces
        bound.__dict__.update(kept.parts)
        bound.pipeline = pipeline
        for step in bound._built:                   # new seeds where a fresh bind draws them
            if isinstance(step, Seeded) and step.streams.drawn:
                step.reseed()
    else:
        bound = pipeline.bind(batch, seeds=seeds)
        owners = _work_owners(bound)
        classes = [type(o) for o in owners]
        if kept is not None and kept.classes == classes:
            for owner, work in zip(owners, kept.works):
                owner._work = work
        parts = {k: v for k, v in vars(bound).items() if k != "pipeline"}
        kept = _Kept(classes, [o._work for o in owners], parts if key is not None and _reusable(bound) else None, key)
    yield bound
    sizes[batch] = kept
    while len(sizes) > ONE_SHOT_BATCH_SIZES:
        sizes.popitem(last=False)


def _work_owners(bound: BoundPipeline) -> list:
    return [o for o in (bound, *(step for _, step in bound.steps), bound.sampler)
            if isinstance(getattr(o, "_work", None), dict)]


def _reusable(bound: BoundPipeline) -> bool:
    """Whether a fresh bind for the same rows and seeds would build this very pipeline, up to the
    seeds drawn for rows without one (which :meth:`~samplerkit.seeded.Seeded.reseed` draws
    again), and a call leaves nothing behind but workspaces (see :func:`_one_shot`)."""
    pipeline = bound.pipeline
    specs = [*pipeline.processors, pipeline.sampler]
    if not all(getattr(spec.cls, "reusable", False) for spec in specs):   # inactive steps are built too
        return False
    rows = [[*procs, samp] for procs, samp in zip(bound._row_processors, bound._row_samplers)]
    # A row without a seed draws one when the step is built: only a Seeded step draws it again.
    return all(isinstance(step, Seeded) or all(getattr(row[j].params, "seed", None) is not None for row in rows)
               for j, (spec, step) in enumerate(zip(specs, bound._built)) if _takes_seed(spec))


def _input_valid(logits: torch.Tensor, state: State, plan: RunPlan) -> torch.Tensor:
    """``[B]``: the input row has a finite maximum. Free when the run ends in a cut that compared
    the input itself and took its block maxima (``min_p`` first): their maximum is the row's
    (``amax`` propagates NaN either way); else one read pass."""
    if isinstance(state, PendingCut) and state.cut.block_max is not None:
        compared = state.cut.source if state.cut.source is not None else state.logits
        if compared is logits:
            return torch.isfinite(state.cut.block_max.amax(dim=-1))
    return Dense(logits).valid(plan)


def _finite_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax over its finite logits: the token an invalid row falls back to."""
    raw = logits.float()
    return raw.masked_fill(~torch.isfinite(raw), float("-inf")).argmax(dim=-1)


def _takes_seed(spec: StepSpec) -> bool:
    return "seed" in spec.cls.Params.model_fields


def _with_seed(spec: StepSpec, seed: int, row: int) -> StepSpec:
    """``spec`` with another seed; checked here and copied without re-validating the rest,
    since binding large batches row by row through pydantic is slow."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(ConfigIssue(f"seeds[{row}]", f"must be an integer or None, got {short_repr(seed)}"))
    if not 0 <= seed < 2**63:             # out of range: the validator's own message
        return spec.with_params({"seed": seed}, f"seeds[{row}]")
    return StepSpec(spec.cls, spec.params.model_copy(update={"seed": seed}), spec.location, spec.plugin)


def _context(logits: torch.Tensor, ctx: StepContext | None) -> StepContext:
    """``ctx``, or a fresh context for a call made outside a decode loop."""
    return ctx if ctx is not None else StepContext(logits.shape[0], logits.shape[-1], device=logits.device)


def _what_is_wrong(row: torch.Tensor) -> str | None:
    if bool(row.isnan().any()):
        return "NaN"
    if bool((row == float("inf")).any()):
        return "+inf"
    if not bool(torch.isfinite(row).any()):
        return "no token left (every logit is -inf)"
    return None
