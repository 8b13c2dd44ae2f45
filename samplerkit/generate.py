"""The decode loop: the only module that talks to both a backend and a pipeline.

After meta-llama/llama's ``generate``: prefill every prompt once (different lengths in one
batch), keep the KV cache, then feed one token per row per step until EOS, a stop string or
``max_new_tokens``. Unlike the seed, rows that finish leave the batch (the backend drops their
cache rows and the pipeline re-packs its parameters), so they cost no further work.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samplerkit.backend import Backend, CheckedBackend, backend_label
from samplerkit.chat_template import check_messages
from samplerkit.config import RunConfig, read_yaml, resolve, validate_generation
from samplerkit.context import StepContext
from samplerkit.detokenize import IncrementalDetokenizer, StopMatcher, lone_surrogate
from samplerkit.errors import ConfigError, ConfigIssue, GenerationError, PluginError, SamplerkitError, short_repr
from samplerkit.pipeline import Pipeline, RowOverrides
from samplerkit.presets import list_presets, load_preset, unknown_preset_message
from samplerkit.registry import Registry, default_registry
from samplerkit.segments import SegmentState, closing_overrun
from samplerkit.trace import TapValue, check_tap_stages, logprob_taps


@dataclass
class StageLogprob:
    """The chosen token seen at one stage of the pipeline (``generation.logprobs: {at: [...]}``).

    ``logprob`` is ``log softmax(z)[token]`` with ``z`` the logits after that stage (``input``:
    the raw model logits; ``processed``: after the last processor); ``top`` the stage's ``top``
    most likely tokens as ``(token_id, text, logprob)``, removed tokens never listed. When a
    stage at or before this one made the row unusable (NaN, +inf, no token left; see
    ``on_invalid``), ``logprob`` is ``None``, ``top`` is empty and ``invalid`` names that stage
    and what it made.
    """

    logprob: float | None
    top: list[tuple[int, str, float]] = field(default_factory=list)
    invalid: str | None = None


@dataclass
class TokenLogprob:
    """Log-probabilities of one chosen token.

    ``logprob`` is ``log softmax(x)[token]`` under the raw model logits ``x``.
    ``processed_logprob`` is ``log softmax(z)[token]`` under the logits ``z`` the token was
    actually drawn from: the pipeline's processed logits, further truncated by the sampler
    where the sampler truncates itself (mirostat records its kept set through
    :meth:`StepContext.record_distribution`). Under ``greedy`` (a deterministic argmax) it is
    the processed distribution whose mode greedy picked. ``None`` for prompt tokens.
    ``top`` holds the ``k`` (``logprobs=k``) most likely tokens as ``(token_id, text, logprob)``,
    from the raw distribution or, with ``top_logprobs_from="processed"``, from the drawn one
    (removed tokens never appear there, so it may hold fewer than ``k``). Prompt tokens' ``top``
    is always from the raw distribution (no pipeline runs over the prompt).
    ``taps`` (with ``logprobs: {top: k, at: [stage, ...]}``): the token at each named stage,
    stage name -> :class:`StageLogprob`; ``None`` otherwise.
    ``forced``: the token was appended without sampling (a segment's closing string, see
    docs/segments.md); ``logprob`` and ``top`` are then still the raw model's, while
    ``processed_logprob`` is ``None`` and ``taps`` empty (no pipeline ran for it).
    """

    token_id: int
    text: str
    logprob: float
    processed_logprob: float | None = None
    top: list[tuple[int, str, float]] = field(default_factory=list)
    taps: dict[str, StageLogprob] | None = None
    forced: bool = False


@dataclass
class Completion:
    """One generated sample: ``prompt_index``-th prompt, ``sample_index``-th of its ``n``."""

    prompt_index: int
    sample_index: int
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str                       # "stop" (EOS or stop string), "length" or "invalid"
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    #: With ``echo``: the prompt as the model saw it (the detokenized prompt tokens; for a chat
    #: prompt, the rendered template without special tokens), else ``None``.
    prompt_text: str | None = None
    #: A chat prompt's messages as given; ``prompt`` then holds the rendered template.
    messages: list[dict[str, Any]] | None = None


@dataclass
class Delta:
    """A streaming event: new text of one row; ``finish_reason`` is set on its last event.

    ``token_ids`` are the tokens sampled since the row's previous event (a step whose token
    completes no character yields no event; its token comes with the next one), so a row's
    events' ``token_ids`` concatenated are its sampled tokens (with the EOS or stop token that
    ended it). With ``logprobs``, ``logprobs`` holds those tokens' :class:`TokenLogprob` entries
    (not the ending EOS/stop token's, as in :attr:`Completion.logprobs`), else ``None``.
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


def load_config(config: str | Path | Mapping[str, Any] | RunConfig | None, registry: Registry | None = None) -> tuple[RunConfig, Registry]:
    """Accept a YAML path, a mapping or a resolved config; return it resolved with its registry."""
    if isinstance(config, RunConfig):
        return config, registry or default_registry(config.plugins.block)
    source = None
    if config is None:
        data: Mapping[str, Any] = {}
    elif isinstance(config, (str, Path)):
        source = str(config)
        data = read_yaml(config)
    else:
        data = config
    if registry is None:
        block = (data.get("plugins") or {}).get("block", []) if isinstance(data.get("plugins"), dict) else []
        registry = default_registry(block if isinstance(block, list) else [])
    return resolve(data, registry, source), registry


def load_backend(config: RunConfig) -> Backend:
    """Instantiate the configured backend (loads the model).

    A backend that fails with anything but a :class:`SamplerkitError` is a plugin bug: the
    error is a :class:`PluginError` naming the backend and the distribution that provides it.
    """
    spec = config.backend
    try:
        return spec.cls(spec.params)
    except SamplerkitError:
        raise
    except Exception as exc:
        raise PluginError(f"{backend_label(spec.cls, spec.plugin)} failed to start: {type(exc).__name__}: {exc}") from exc


def row_seed(base: int, sample_index: int) -> int:
    """Seed of the ``sample_index``-th sample of a prompt seeded with ``base``.

    Sample 0 uses ``base`` itself, so ``n = 1`` with seed ``s`` reproduces a run with seed ``s``.
    """
    if sample_index == 0:
        return base
    digest = hashlib.blake2b(f"{base}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def segment_seed(seed: int, phase: int) -> int:
    """Seed of a row's random streams in segment ``phase`` > 0 (``segments:``), from the row's
    own seed only: the draws after a switch do not depend on the other rows of the batch."""
    digest = hashlib.blake2b(f"{seed}:segment:{phase}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_seeds(pipeline: Pipeline, prompts: int, n: int, seeds: Sequence[int | None] | None = None,
              rows: Sequence[RowOverrides | None] | None = None) -> list[int | None] | None:
    """One seed per output row (prompt-major, ``n`` samples each), as the decode loop uses them.

    A prompt's base seed is, in order: its entry in ``seeds``, the sampler seed of its ``rows``
    override, the config's sampler seed. Sample ``j`` uses :func:`row_seed` of it, so the ``n``
    samples of a prompt differ and sample 0 equals an ``n = 1`` run. ``None`` when no row is seeded.
    Integrations that drive their own loop (the transformers plugin) call this too.
    """
    sampler = pipeline.sampler
    if "seed" not in sampler.cls.Params.model_fields:
        # Only processors draw (xtc under greedy): the n samples of a prompt still differ.
        if seeds is None:
            return None
        per_row = [None if s is None else row_seed(s, j) for s in seeds for j in range(n)]
        return None if all(s is None for s in per_row) else per_row
    config_seed = sampler.params.seed

    def base(i: int) -> int | None:
        if seeds is not None and seeds[i] is not None:
            return seeds[i]
        override = (rows[i] or {}).get(sampler.name, {}) if rows else {}
        return override.get("seed", config_seed)

    per_row = [None if (b := base(i)) is None else row_seed(b, j) for i in range(prompts) for j in range(n)]
    return None if all(s is None for s in per_row) else per_row


#: A prompt: text, or (with ``chat``) a conversation, a list of ``{"role", "content"}`` messages.
Prompt = str | Sequence[Mapping[str, Any]]

#: A row's pipeline: None (the Generator's), a preset name, a :class:`Pipeline`, or a mapping in
#: YAML form (``{"pipeline": [...], "sampler": ..., "preset": ..., "on_invalid": ...}``).
PipelineEntry = None | str | Pipeline | Mapping[str, Any]

#: The keys a per-row pipeline mapping may have (the rest of a config is the Generator's).
PIPELINE_KEYS = ("pipeline", "sampler", "preset", "on_invalid")

#: Resolved per-row pipelines a Generator keeps (least recently used dropped first).
PIPELINE_CACHE_SIZE = 256


class Generator:
    """A loaded backend plus a pipeline: call :meth:`generate` or :meth:`stream` many times.

    Thread safety: a Generator may be shared between threads. Its backend holds one KV cache,
    so runs are serialised: each :meth:`generate` call holds the Generator's lock for the whole
    run, and a :meth:`stream` holds it from its first item until it is exhausted or closed
    (close an abandoned stream, e.g. with ``contextlib.closing``). Other threads wait; the
    same thread starting a second run while its own stream is open gets a
    :class:`GenerationError` instead of a deadlock. Each call's results are exactly those of
    the call made alone. For parallel throughput, give each thread its own Generator (or pass
    all prompts to one call: a batch shares each forward pass).
    """

    def __init__(self, config: str | Path | Mapping[str, Any] | RunConfig | None = None, *,
                 backend: Backend | None = None, registry: Registry | None = None):
        self.config, self.registry = load_config(config, registry)
        raw = backend if backend is not None else load_backend(self.config)
        self.backend = CheckedBackend(raw, plugin=self.config.backend.plugin if backend is None else None)
        device = getattr(raw.params, "device", "cpu")
        self.pipeline = Pipeline.from_config(self.config, device=device)
        # ``segments:``: one pipeline per segment; rows running this Generator's pipeline walk
        # through them (samplerkit/segments.py), then run self.pipeline.
        self.segment_pipelines = [Pipeline(seg.processors, seg.sampler, device=device, on_invalid=self.config.on_invalid)
                                  for seg in self.config.segments]
        self._overrun: dict[str, list[tuple[bytes, frozenset[int]]]] = {}
        # NaN from the model is the backend's fault unless the config tolerates invalid rows.
        self.backend.check_nan = self.pipeline.on_invalid == "raise"
        self._device = device
        self._lock = threading.Lock()
        self._owner: int | None = None
        # Per-row pipelines resolved from mappings or preset names, keyed by their canonical JSON
        # (the "config hash"): a server that sees the same pipeline again resolves it once.
        self._pipelines: OrderedDict[str, Pipeline] = OrderedDict()
        self._pipelines_lock = threading.Lock()

    def pipeline_for(self, entry: PipelineEntry, where: str = "pipeline") -> Pipeline:
        """The :class:`Pipeline` a row runs: ``entry`` is ``None`` (this Generator's pipeline), a
        preset name, a :class:`Pipeline`, or a mapping in YAML form with any of the keys
        ``pipeline`` (the processors, in order), ``sampler``, ``preset`` and ``on_invalid``,
        validated exactly as a config file with only those keys (omitted keys take the YAML
        defaults, not this Generator's). Errors are a :class:`ConfigError` whose locations start
        with ``where`` (e.g. ``pipelines[3] pipeline[1] top_p: must be in (0, 1]``). Resolved
        pipelines are cached by the mapping's canonical JSON (:data:`PIPELINE_CACHE_SIZE` of them).
        """
        if entry is None:
            return self.pipeline
        if isinstance(entry, Pipeline):
            return entry
        if isinstance(entry, str):
            if entry not in list_presets():
                raise ConfigError(ConfigIssue(where, unknown_preset_message(entry)))
            data: Mapping[str, Any] = {"preset": entry}
        elif isinstance(entry, Mapping):
            data = entry
            bad = [k for k in data if k not in PIPELINE_KEYS]
            if bad:
                raise ConfigError(ConfigIssue(where, f"{', '.join(short_repr(k) for k in bad)} cannot be set per row; "
                                                     f"a row's pipeline takes only {', '.join(PIPELINE_KEYS)} "
                                                     "(backend, generation and plugins are the Generator's)"))
        else:
            raise ConfigError(ConfigIssue(where, f"must be None, a preset name, a Pipeline or a mapping like "
                                                 f"{{'pipeline': [{{'top_k': {{'top_k': 40}}}}], 'sampler': 'categorical'}}, "
                                                 f"got {type(entry).__name__} {short_repr(entry)}"))
        try:
            key = json.dumps(data, sort_keys=True, allow_nan=True, default=repr)
        except (TypeError, ValueError) as e:              # keys that are not strings, cycles
            raise ConfigError(ConfigIssue(where, f"is not a plain YAML/JSON mapping ({e})")) from None
        with self._pipelines_lock:
            cached = self._pipelines.get(key)
            if cached is not None:
                self._pipelines.move_to_end(key)
                return cached
        if "preset" in data and isinstance(data["preset"], str) and data["preset"] in list_presets():
            load_preset(data["preset"])                   # a preset that cannot be read fails here, named
        try:
            config = resolve(data, self.registry)
        except ConfigError as e:
            raise ConfigError([ConfigIssue(f"{where} {i.location}".strip(), i.message) for i in e.issues]) from None
        pipeline = Pipeline.from_config(config, device=self._device)
        with self._pipelines_lock:
            self._pipelines[key] = pipeline
            while len(self._pipelines) > PIPELINE_CACHE_SIZE:
                self._pipelines.popitem(last=False)
        return pipeline

    def _acquire(self) -> None:
        if self._owner == threading.get_ident():
            raise GenerationError("this Generator is already running a stream in this thread; exhaust or close "
                                  "that stream first (or use a second Generator)")
        self._lock.acquire()
        self._owner = threading.get_ident()

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def generate(self, prompts: Prompt | Sequence[Prompt], *, seeds: Sequence[int | None] | None = None,
                 rows: Sequence[RowOverrides | None] | None = None,
                 pipelines: Sequence[PipelineEntry] | None = None, **generation: Any) -> list[Completion]:
        """Generate for every prompt; returns ``len(prompts) * n`` completions, prompt-major.

        A prompt is a string or, with ``chat=True``, a list of messages (``{"role": "system" |
        "user" | "assistant", "content": str}``) rendered through the model's chat template; a
        single conversation may be passed as ``prompts`` itself.

        ``pipelines`` gives each prompt its own pipeline (see :meth:`pipeline_for`; ``None``
        entries run this Generator's, through its ``segments:`` when the config has them:
        docs/segments.md). All rows share each forward pass; the rows of each
        distinct pipeline are sampled together by that pipeline, so a seeded row gets the same
        tokens whatever the other rows and their pipelines are. ``rows`` overrides then apply to
        the row's own pipeline.
        """
        run = _Run(self, prompts, seeds, rows, generation, pipelines)       # validates before taking the lock
        self._acquire()
        try:
            for _ in run.events():
                pass
        finally:
            self._release()
        return run.completions()

    def stream(self, prompts: Prompt | Sequence[Prompt], *, seeds: Sequence[int | None] | None = None,
               rows: Sequence[RowOverrides | None] | None = None,
               pipelines: Sequence[PipelineEntry] | None = None, **generation: Any) -> Iterator[Delta]:
        """Yield text deltas as tokens are generated (one :class:`Delta` per row and step)."""
        run = _Run(self, prompts, seeds, rows, generation, pipelines)
        return self._stream(run)

    def _stream(self, run: _Run) -> Iterator[Delta]:
        self._acquire()
        try:
            yield from run.events()
        finally:
            self._release()


def generate(prompts: Prompt | Sequence[Prompt], config: str | Path | Mapping[str, Any] | RunConfig | None = None, *,
             seeds: Sequence[int | None] | None = None, rows: Sequence[RowOverrides | None] | None = None,
             pipelines: Sequence[PipelineEntry] | None = None,
             backend: Backend | None = None, **generation: Any) -> list[Completion]:
    """Run prompts through the configured backend and pipeline; see :class:`Generator`."""
    return Generator(config, backend=backend).generate(prompts, seeds=seeds, rows=rows, pipelines=pipelines, **generation)


def _prompt_list(prompts: Any) -> list[Prompt]:
    """The prompts as a list, each a string or a list of messages; a clear error naming the
    index for anything else. A sequence of mappings is one conversation."""
    if isinstance(prompts, str):
        return [_check_text(prompts, "prompt 0")]
    if isinstance(prompts, (bytes, bytearray, Mapping)) or not isinstance(prompts, Sequence):
        raise GenerationError(f"prompts must be a string or a list of prompts, got {type(prompts).__name__}"
                              + ("; decode bytes to str first" if isinstance(prompts, (bytes, bytearray)) else ""))
    if prompts and all(isinstance(p, Mapping) for p in prompts):
        return [list(prompts)]                          # one conversation
    out: list[Prompt] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(_check_text(p, f"prompt {i}"))
        elif isinstance(p, Sequence) and not isinstance(p, (bytes, bytearray)):
            out.append(list(p))                        # a conversation, checked by check_messages
            for j, m in enumerate(p):
                if isinstance(m, Mapping) and isinstance(m.get("content"), str):
                    _check_text(m["content"], f"prompt {i} message {j}")
        else:
            hint = "; decode bytes to str first" if isinstance(p, (bytes, bytearray)) else ""
            raise GenerationError(f"prompt {i} must be a string or a list of chat messages, got "
                                  f"{type(p).__name__}{hint}")
    if not out:
        raise GenerationError("no prompts given")
    return out


def _check_text(text: str, where: str) -> str:
    """``text`` if it is valid Unicode; lone surrogates (``"\\ud800"``, e.g. from JSON) cannot be
    tokenized, so they are an error naming ``where`` and the position."""
    at = lone_surrogate(text)
    if at is not None:
        raise GenerationError(f"{where} contains a lone surrogate {text[at]!r} at character {at}, which is "
                              "not valid Unicode text; replace it (e.g. text.encode('utf-8', 'replace').decode())")
    return text


class _Row:
    """Book-keeping of one output row while it runs."""

    def __init__(self, prompt_index: int, sample_index: int, gen, detokenize, prompt_ids: Sequence[int] = ()):
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.tokens: list[int] = []
        # The prompt's last ids are the first token's context: a sentencepiece token's leading
        # space ("▁The") is kept where it continues the prompt.
        self.detok = IncrementalDetokenizer(detokenize, prompt_ids)
        self.stops = StopMatcher(gen.stop)
        self.logprobs: list[TokenLogprob] | None = [] if gen.logprobs is not None else None
        self.finish_reason: str | None = None
        # Tokens (and their logprobs) sampled since this row's last event.
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[TokenLogprob] | None = [] if gen.logprobs is not None else None
        #: ``segments:``: where the row is in the segment list (None: the row has no segments).
        self.seg: SegmentState | None = None
        #: The text the row's last token added (before stop-string hold-back).
        self.last_chars = ""

    def event(self, text: str, finish_reason: str | None = None) -> Delta:
        """The row's next :class:`Delta`, carrying the tokens sampled since its last one."""
        ids, self.pending_ids = self.pending_ids, []
        lps = self.pending_logprobs
        if lps is not None:
            self.pending_logprobs = []
        return Delta(self.prompt_index, self.sample_index, text, ids, finish_reason, lps)


def decode_step(groups: Sequence[_Group], logits: torch.Tensor) -> tuple[torch.Tensor, list[Delta], list[int]]:
    """One sampling step over a batch made of ``groups`` (their rows in this order in
    ``logits`` and the backend): each group's pipeline samples its slice of ``logits``.

    Returns the ``[B]`` ids, the events of this step (per group, in order), and the backend
    rows that keep running (the groups have already dropped their finished rows; the caller
    calls ``backend.select_rows(keep)`` when it is shorter than ``B``)."""
    all_ids: list[torch.Tensor] = []
    events: list[Delta] = []
    keep: list[int] = []
    start = 0
    for g in groups:
        size = len(g.members)
        part = logits if size == logits.shape[0] else logits[start:start + size]
        ids, evs, kept = g.step(part)
        all_ids.append(ids)
        events.extend(evs)
        keep.extend(start + k for k in kept)
        if len(kept) < size:
            g.select(kept)
        start += size
    return (all_ids[0] if len(all_ids) == 1 else torch.cat(all_ids)), events, keep


#: The target of a row whose closing string is being forced (see :class:`_ForcedGroup`).
FORCE = -1


def _overrides_for(pipeline: Pipeline, override: RowOverrides | None) -> RowOverrides | None:
    """A segmented row's ``rows=`` override restricted to the steps ``pipeline`` has (each
    segment takes the parameters of its own steps; every name was checked to be in some phase)."""
    if not override:
        return override
    names = {spec.name for spec in (*pipeline.processors, pipeline.sampler)}
    return {k: v for k, v in override.items() if k in names}


class _Group:
    """The rows of one run that share a pipeline, in backend order: that pipeline bound for
    them (one bind, so per-row parameters are packed once) and their :class:`StepContext`.

    ``phase``: ``None`` for rows without segments; else the segment index the rows are in (the
    rows' steps then see the text before the segment as prompt, and start fresh: a constraint
    from the segment's first token, seeded streams from :func:`segment_seed`)."""

    def __init__(self, run: _Run, pipeline: Pipeline, members: list[int], vocab: int, device: torch.device,
                 phase: int | None = None):
        self.run, self.pipeline, self.phase = run, pipeline, phase
        self.members = list(members)                 # indices into run.rows, in backend order
        #: Rows (run.rows indices) that leave this group after the step: row -> phase or FORCE.
        self.leaving: dict[int, int] = {}
        rows = [run.rows[r] for r in self.members]
        prompts = [row.prompt_index for row in rows]
        overrides = None if run.row_overrides is None else [
            run.row_overrides[p] if phase is None else _overrides_for(pipeline, run.row_overrides[p]) for p in prompts]
        seeds = run._row_seed_list(pipeline)
        if phase is not None and not pipeline.takes_seed:
            seeds = None                 # a segment that never draws (greedy): the row's seed is for the others
        seeds = None if seeds is None else [seeds[r] for r in self.members]
        if seeds is not None and phase:
            seeds = [None if s is None else segment_seed(s, phase) for s in seeds]
        self.bound = pipeline.bind(overrides if overrides is not None else len(rows), seeds=seeds)
        self.budget = [run._budget(run.prompt_ids[p]) for p in prompts]
        gen, backend = run.gen, run.backend
        # The history buffers grow with the text generated and never past the longest budget
        # (max_new_tokens, or the context left after the prompt): nothing is sized by a huge
        # max_new_tokens up front.
        self.ctx = StepContext(len(rows), vocab, prompt_ids=[run.prompt_ids[p] + row.tokens for p, row in zip(prompts, rows)],
                               uses=pipeline.uses, max_new_tokens=max(b for b, _ in self.budget),
                               eos_token_ids=[*backend.eos_token_ids, *gen.stop_token_ids],
                               tokenize=lambda text: backend.tokenize(text, add_special=False),
                               token_vocabulary=backend.token_vocabulary, device=device)
        self.want_logprobs = gen.logprobs is not None
        self.ctx.want_distribution = self.want_logprobs
        stop_ids = set() if gen.ignore_eos else set(backend.eos_token_ids)
        self.stop_ids = stop_ids | set(gen.stop_token_ids)
        segment = run.segments[phase] if phase is not None and phase < len(run.segments) else None
        #: A constrained segment with a closing string: its EOS (allowed only where the grammar
        #: is complete) closes the segment instead of ending the row.
        self.closes_on_stop = segment is not None and segment.constrained and segment.until is not None
        # ... whether or not EOS ends rows (ignore_eos): there it means the grammar is complete.
        self.end_ids = set(backend.eos_token_ids) | set(gen.stop_token_ids)
        #: Before a constrained segment, tokens that would write past the closing string are
        #: masked, so that the constrained text starts exactly after it.
        nxt = phase + 1 if phase is not None else None
        self.overrun = (run.overrun_ids(segment.until) if segment is not None and segment.until is not None
                        and nxt < len(run.segments) and run.segments[nxt].constrained else None)

    def _mask_overrun(self, logits: torch.Tensor) -> torch.Tensor:
        masked = None
        for slot, r in enumerate(self.members):
            tail = self.run.rows[r].seg.text.encode("utf-8")
            banned = [i for prefix, ids in self.overrun if tail.endswith(prefix) for i in ids]
            if banned:
                if masked is None:
                    masked = logits.clone()
                masked[slot, torch.as_tensor(banned, device=logits.device)] = float("-inf")
        return logits if masked is None else masked

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[Delta], list[int]]:
        """Sample one token per row from ``logits`` (this group's rows); returns the ids, the
        events, and the positions (in this group) of the rows that keep running."""
        run, bound, ctx = self.run, self.bound, self.ctx
        want_logprobs = self.want_logprobs
        source = logits if self.overrun is None else self._mask_overrun(logits)
        processed = bound.process(source, ctx) if want_logprobs else None
        ids, valid = bound.sample_with_validity(source, ctx, processed=processed)
        drawn = ctx.take_distribution() if want_logprobs else None
        gen = run.gen
        taps = logprob_taps(bound.trace, source, ctx, ids, gen.logprob_stages, gen.top_logprobs) \
            if gen.logprob_stages else None          # before ctx.append: the history the steps saw
        ctx.append(ids)
        id_list = ids.tolist()
        invalid = set() if self.pipeline.on_invalid != "mark_invalid" else {
            slot for slot, ok in enumerate(valid.tolist()) if not ok}
        lp = run._step_logprobs(logits, processed if drawn is None else drawn, ids, taps) if want_logprobs else None
        events, keep, replaced = self.advance(logits, id_list, invalid, lp)
        if replaced:
            ids = torch.as_tensor(id_list, dtype=ids.dtype, device=ids.device)
        return ids, events, keep

    def advance(self, logits: torch.Tensor, id_list: list[int], invalid: set[int], lp, offset: int = 0
                ) -> tuple[list[Delta], list[int], bool]:
        """The rows' book-keeping once each drew its token ``id_list[slot]`` (a forced closing
        token replaces it in place): stop checks, text, logprobs, segment switches. ``logits``
        and ``lp`` (from :meth:`_Run._step_logprobs`) cover a batch where this group's rows
        start at row ``offset`` (the engine samples several requests' rows in one call).
        Returns the events, the positions (in this group) of the rows that keep running, and
        whether a token was replaced."""
        run = self.run
        want_logprobs = self.want_logprobs
        events: list[Delta] = []
        keep: list[int] = []
        replaced = False
        for slot, (r, token) in enumerate(zip(self.members, id_list)):
            row = run.rows[r]
            if slot in invalid:            # on_invalid: mark_invalid ends the row here
                row.finish_reason = "invalid"
                events.append(row.event(row.stops.finish(), "invalid"))
                continue
            seg = row.seg if self.phase is not None else None
            forced = False
            if seg is not None and self.closes_on_stop and token in self.end_ids:
                # The constrained text is complete: instead of EOS, the closing string's first token.
                token = seg.start_forcing().pop(0)
                id_list[slot], forced, replaced = token, True, True
            delta, finished = run._advance(row, token, self.stop_ids, self.budget[slot])
            row.pending_ids.append(token)
            if want_logprobs and token not in self.stop_ids:
                entry = run._forced_logprob(logits[offset + slot], token) if forced else lp(offset + slot, token)
                row.logprobs.append(entry)
                row.pending_logprobs.append(entry)
            if not finished and seg is not None:
                action = seg.feed(row.last_chars, forced=forced)
                if action == "end":                  # a segment without `until` spent its budget
                    events.append(row.event(run._finish_length(row, delta), row.finish_reason))
                    continue
                if action == "switch":
                    self.leaving[r] = seg.phase
                elif action == "force" or seg.forcing:
                    self.leaving[r] = FORCE
            if finished:
                events.append(row.event(delta, row.finish_reason))
            else:
                keep.append(slot)
                if delta:
                    events.append(row.event(delta))
        return events, keep, replaced

    def select(self, keep: Sequence[int]) -> None:
        """Keep these rows of the group (positions in it, in order); none left empties it."""
        self.members = [self.members[k] for k in keep]
        self.budget = [self.budget[k] for k in keep]
        if keep:
            self.bound = self.bound.select_rows(keep)
            self.ctx.select_rows(keep)


class _ForcedGroup:
    """Rows appending a forced closing string (``segments:`` budgets): one queued token per row
    and step, nothing sampled. A row leaves for its next segment once its queue is empty."""

    phase = FORCE

    def __init__(self, run: _Run, members: list[int]):
        self.run = run
        self.members: list[int] = []
        self.budget: list[tuple[int, bool]] = []
        self.leaving: dict[int, int] = {}
        gen, backend = run.gen, run.backend
        self.stop_ids = (set() if gen.ignore_eos else set(backend.eos_token_ids)) | set(gen.stop_token_ids)
        self.want_logprobs = gen.logprobs is not None
        self.add(members)

    def add(self, members: Sequence[int]) -> None:
        self.members.extend(members)
        self.budget.extend(self.run._budget(self.run.prompt_ids[self.run.rows[r].prompt_index]) for r in members)

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[Delta], list[int]]:
        run = self.run
        events: list[Delta] = []
        keep: list[int] = []
        id_list = []
        for slot, r in enumerate(self.members):
            row = run.rows[r]
            token = row.seg.forcing.pop(0)
            id_list.append(token)
            delta, finished = run._advance(row, token, self.stop_ids, self.budget[slot])
            row.pending_ids.append(token)
            if self.want_logprobs and token not in self.stop_ids:
                entry = run._forced_logprob(logits[slot], token)
                row.logprobs.append(entry)
                row.pending_logprobs.append(entry)
            if not finished and row.seg.feed(row.last_chars, forced=True) == "switch":
                self.leaving[r] = row.seg.phase
            if finished:
                events.append(row.event(delta, row.finish_reason))
            else:
                keep.append(slot)
                if delta:
                    events.append(row.event(delta))
        return torch.as_tensor(id_list, dtype=torch.int64, device=logits.device), events, keep

    def select(self, keep: Sequence[int]) -> None:
        self.members = [self.members[k] for k in keep]
        self.budget = [self.budget[k] for k in keep]


def regroup(groups: Sequence[_Group | _ForcedGroup], vocab: int, device: torch.device) -> list[_Group | _ForcedGroup]:
    """The groups after their ``leaving`` rows moved (``segments:``): rows that switched to
    phase ``k`` of one run form a new group (a fresh bind of that phase's pipeline), rows whose
    closing string is forced join the run's :class:`_ForcedGroup`. Emptied groups are dropped;
    the caller reorders the backend's rows to the new members order."""
    moves: dict[tuple[int, int], tuple[_Run, list[int]]] = {}
    out: list[_Group | _ForcedGroup] = []
    for g in groups:
        if g.leaving:
            for r in g.members:
                if r in g.leaving:
                    moves.setdefault((id(g.run), g.leaving[r]), (g.run, []))[1].append(r)
            stay = [k for k, r in enumerate(g.members) if r not in g.leaving]
            g.leaving = {}
            g.select(stay)
        if g.members:
            out.append(g)
    for (_, target), (run, members) in moves.items():
        if target == FORCE:
            forced = next((g for g in out if isinstance(g, _ForcedGroup) and g.run is run), None)
            if forced is not None:
                forced.add(members)
            else:
                out.append(_ForcedGroup(run, members))
        else:
            out.append(_Group(run, run.phase_pipelines[target], members, vocab, device, phase=target))
    return out



class _Run:
    """One call's prompts, validated; :meth:`events` runs them (the engine drives the same
    pieces itself: :meth:`tokenize`, :meth:`start_rows`, :meth:`make_groups`)."""

    def __init__(self, owner: Generator, prompts, seeds, rows, overrides: Mapping[str, Any], pipelines=None):
        self.backend = owner.backend
        self.pipeline = owner.pipeline
        gen = owner.config.generation
        if overrides:
            gen = validate_generation(gen, overrides)
        self.gen = gen
        if overrides and gen.logprob_stages:       # the config's own taps were checked when it was resolved
            check_tap_stages(gen.logprob_stages, owner.pipeline.processors, owner.pipeline.sampler)
        self.inputs = _prompt_list(prompts)
        self.messages = [check_messages(p, f"prompt {i}") if not isinstance(p, str) else None
                         for i, p in enumerate(self.inputs)]
        if not gen.chat and (i := next((i for i, m in enumerate(self.messages) if m is not None), None)) is not None:
            raise GenerationError(f"prompt {i} is a list of chat messages; set chat=True (CLI: --chat) to render it "
                                  "through the model's chat template")
        self.prompts: list[str] = [p if m is None else "" for p, m in zip(self.inputs, self.messages)]
        for name, given in (("seeds", seeds), ("rows", rows), ("pipelines", pipelines)):
            if given is not None and (isinstance(given, (str, bytes, Mapping)) or not isinstance(given, Sequence)):
                raise GenerationError(f"{name} must be a list with one entry per prompt, got {type(given).__name__}")
            if given is not None and len(given) != len(self.inputs):
                raise GenerationError(f"{name} has {len(given)} entries for {len(self.inputs)} prompts; give one per prompt")
        if seeds is not None:
            for i, s in enumerate(seeds):
                if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63):
                    raise GenerationError(f"seeds[{i}] must be an integer in [0, 2**63) or None, got {s!r:.60}")
        if rows is not None:
            for i, r in enumerate(rows):
                if r is None:
                    continue
                if not isinstance(r, Mapping):
                    raise GenerationError(f"rows[{i}] must be a mapping of step name to parameters "
                                          f"(e.g. {{'top_p': {{'top_p': 0.5}}}}) or None, got {type(r).__name__} {r!r:.60}")
                for step, params in r.items():
                    if not isinstance(params, Mapping):
                        raise GenerationError(f"rows[{i}] {step!s:.40}: parameters must be a mapping (e.g. "
                                              f"{{'{step!s:.40}': {{...}}}}), got {type(params).__name__} {params!r:.60}")
        # Each prompt's pipeline (resolved and cached by the Generator); then the rows
        # overrides and seeds are checked against the prompt's own pipeline.
        self.row_pipelines: list[Pipeline] = (
            [owner.pipeline] * len(self.inputs) if pipelines is None
            else [owner.pipeline_for(p, f"pipelines[{i}]") for i, p in enumerate(pipelines)])
        if pipelines is not None and gen.logprob_stages:     # taps name stages of every prompt's pipeline
            for i, p in enumerate(self.row_pipelines):
                if p is not owner.pipeline:
                    try:
                        check_tap_stages(gen.logprob_stages, p.processors, p.sampler)
                    except ConfigError as exc:
                        raise GenerationError(f"pipelines[{i}]: generation.logprobs: {exc}") from None
        # segments: rows that run the Generator's own pipeline walk through the segment
        # pipelines first (phase k runs phase_pipelines[k]; the last phase is the top level).
        self.segments = owner.config.segments
        self.phase_pipelines: list[Pipeline] = [*owner.segment_pipelines, owner.pipeline]
        self.segmented = [bool(self.segments) and (pipelines is None or pipelines[i] is None)
                          for i in range(len(self.inputs))]
        self._overrun_cache = owner._overrun
        if overrides and gen.logprob_stages and self.segments:
            for seg, p in zip(self.segments, owner.segment_pipelines):
                try:
                    check_tap_stages(gen.logprob_stages, p.processors, p.sampler)
                except ConfigError as exc:
                    raise GenerationError(f"{seg.location}: generation.logprobs: {exc}") from None
        if rows is not None:
            for i, r in enumerate(rows):
                if r is None:
                    continue
                if not self.segmented[i]:
                    self.row_pipelines[i]._row_specs(r, i)     # unknown steps, bad values: named by prompt index
                    continue
                known = {sp.name for p in self.phase_pipelines for sp in (*p.processors, p.sampler)}
                unknown = [k for k in r if k not in known]
                if unknown:
                    raise ConfigError(ConfigIssue(f"rows[{i}]", f"overrides name steps in no segment nor the top-level "
                                                               f"pipeline: {', '.join(map(repr, unknown))}; steps: "
                                                               f"{', '.join(sorted(known))}"))
                for p in self.phase_pipelines:
                    p._row_specs(_overrides_for(p, r), i)
        if seeds is not None:
            for i, s in enumerate(seeds):
                if s is not None and self.segmented[i]:
                    if not any(p.takes_seed for p in self.phase_pipelines):
                        raise ConfigError(ConfigIssue(f"seeds[{i}]", "no step of any segment's pipeline nor the top-level "
                                                                     "one takes a seed; pass None for this prompt"))
                    continue
                if s is not None and not self.row_pipelines[i].takes_seed:
                    p = self.row_pipelines[i]
                    names = ", ".join(sp.name for sp in (*p.processors, p.sampler))
                    where = f"seeds[{i}]" if pipelines is None else f"seeds[{i}] (pipelines[{i}])"
                    raise ConfigError(ConfigIssue(where, f"no step of this pipeline takes a seed ({names}); pass None "
                                                         "for this prompt or add a random step (e.g. sampler: categorical)"))
        self.seeds = seeds
        self.row_overrides = rows
        self.rows: list[_Row] = []
        self.prompt_ids: list[list[int]] = []
        self.prompt_logprobs: list[list[TokenLogprob | None]] | None = None

    # -- set-up -------------------------------------------------------------------------
    def _tokenize_prompts(self) -> list[list[int]]:
        backend = self.backend
        out = []
        limit = backend.max_context
        for i, prompt in enumerate(self.inputs):
            text = self._render_chat(i, prompt) if self.gen.chat else prompt
            self.prompts[i] = text
            ids = backend.tokenize(text, add_special=True)
            if not ids:
                raise GenerationError(f"prompt {i} is empty and the model adds no BOS token; give at least one character")
            if limit is not None and len(ids) >= limit:
                raise GenerationError(f"prompt {i} has {len(ids)} tokens, but the model's context holds {limit} "
                                      f"(prompt plus at least one new token); shorten the prompt or raise max_context")
            out.append(ids)
        return out

    def _render_chat(self, i: int, prompt: Prompt) -> str:
        messages = self.messages[i]
        if messages is not None and len(messages) == 1 and messages[0]["role"] == "user" and len(messages[0]) == 2:
            messages = messages[0]["content"]      # one user turn: the form every backend has always taken
        try:
            text = self.backend.apply_chat_template(prompt if messages is None else messages)
        except NotImplementedError as e:
            raise GenerationError(f"prompt {i}: backend {self.backend.name!r} has no chat template ({e}); run without "
                                  "chat (--chat), or use a model that ships one") from None
        except GenerationError as e:
            raise GenerationError(f"prompt {i}: {e}") from None
        if not isinstance(text, str):
            raise PluginError(f"{self.backend.label}: apply_chat_template returned {type(text).__name__}, not str")
        _check_text(text, f"prompt {i} (rendered through the chat template)")
        return text

    def _row_seed_list(self, pipeline: Pipeline) -> list[int | None] | None:
        """Every output row's seed as ``pipeline`` would draw it (see :func:`row_seeds`)."""
        return row_seeds(pipeline, len(self.prompts), self.gen.n, self.seeds, self.row_overrides)

    # -- the loop -----------------------------------------------------------------------
    def tokenize(self) -> None:
        """Render and tokenize the prompts (errors name the prompt); idempotent."""
        if not self.prompt_ids:
            self.prompt_ids = self._tokenize_prompts()

    def start_rows(self) -> None:
        """Create the output rows, prompt-major (``n`` per prompt)."""
        n = self.gen.n
        self.tokenize()
        self.rows = [_Row(i, j, self.gen, self.backend.detokenize, self.prompt_ids[i])
                     for i in range(len(self.prompts)) for j in range(n)]
        if self.segments:
            backend = self.backend

            def tokenize(text: str) -> list[int]:
                return backend.tokenize(text, add_special=False)
            for row in self.rows:
                if self.segmented[row.prompt_index]:
                    row.seg = SegmentState(self.segments, tokenize)

    def make_groups(self, vocab: int, device: torch.device) -> list[_Group]:
        """The rows grouped by pipeline, each group's rows in row order; the backend's rows
        must be in the order of the groups' ``members`` concatenated."""
        by_pipeline: dict[int, list[int]] = {}
        for r, row in enumerate(self.rows):
            pipeline = self.phase_pipelines[0] if row.seg is not None else self.row_pipelines[row.prompt_index]
            by_pipeline.setdefault(id(pipeline), []).append(r)
        groups = []
        for members in by_pipeline.values():
            first = self.rows[members[0]]
            if first.seg is not None:
                groups.append(_Group(self, self.phase_pipelines[0], members, vocab, device, phase=0))
            else:
                groups.append(_Group(self, self.row_pipelines[first.prompt_index], members, vocab, device))
        return groups

    def overrun_ids(self, closing: str) -> list[tuple[bytes, frozenset[int]]]:
        """The tokens that would carry text past ``closing`` (see
        :func:`samplerkit.segments.closing_overrun`), computed once per Generator and string."""
        found = self._overrun_cache.get(closing)
        if found is None:
            vocab = self.backend.token_vocabulary()
            tokens = list(vocab.tokens) or [self.backend.detokenize([i]).encode("utf-8", "replace")
                                            for i in range(vocab.vocab_size)]
            found = self._overrun_cache[closing] = closing_overrun(tokens, closing)
        return found

    def events(self) -> Iterator[Delta]:
        gen, backend = self.gen, self.backend
        self.tokenize()
        self.start_rows()
        if gen.max_new_tokens == 0 and not gen.echo:      # nothing to compute at all
            yield from self._finish_all("length")
            return

        out = backend.prefill(self.prompt_ids, keep_all_logits=gen.echo)
        if gen.echo:
            self.prompt_logprobs = [self._prompt_logprobs(ids, all_logits) for ids, all_logits in zip(self.prompt_ids, out.all)]
        if gen.max_new_tokens == 0:                        # echo only
            yield from self._finish_all("length")
            return
        groups = self.make_groups(out.last.shape[-1], out.last.device)
        # Backend row b runs self.rows[order[b]]: the groups' rows, one group after another
        # (a single pipeline: prompt-major, as before).
        order = [r for g in groups for r in g.members]
        fan_out = [self.rows[r].prompt_index for r in order]
        logits = out.last
        if fan_out != list(range(len(self.prompts))):
            backend.select_rows(fan_out)
            logits = logits.index_select(0, torch.as_tensor(fan_out, device=logits.device))
        vocab, device = out.last.shape[-1], out.last.device
        while groups:
            before = [r for g in groups for r in g.members] if self.segments else None
            ids, events, keep = decode_step(groups, logits)
            yield from events
            if not keep:
                break
            if before is not None and any(g.leaving for g in groups):
                # Rows whose segment changed move to another group; the backend's rows follow
                # the new order of the groups' members.
                groups = regroup(groups, vocab, device)
                where = {r: b for b, r in enumerate(before)}
                keep = [where[r] for g in groups for r in g.members]
            if keep != list(range(ids.shape[0])):
                backend.select_rows(keep)
                ids = ids.index_select(0, torch.as_tensor(keep, device=ids.device))
            groups = [g for g in groups if g.members]
            logits = backend.step(ids)

    def _finish_all(self, reason: str) -> Iterator[Delta]:
        for row in self.rows:
            row.finish_reason = reason
            yield row.event("", reason)

    def _budget(self, prompt: list[int]) -> tuple[int, bool]:
        """Tokens this row may generate; True when the context (not max_new_tokens) limits it."""
        limit = self.backend.max_context
        room = None if limit is None else limit - len(prompt)
        if room is not None and room < self.gen.max_new_tokens:
            return room, True
        return self.gen.max_new_tokens, False

    def _advance(self, row: _Row, token: int, stop_ids: set[int], budget: tuple[int, bool]) -> tuple[str, bool]:
        if token in stop_ids:
            row.finish_reason = "stop"
            return row.stops.feed(row.detok.flush())[0] + row.stops.finish(), True
        row.tokens.append(token)
        row.last_chars = row.detok.push(token)
        emit, stopped = row.stops.feed(row.last_chars)
        if stopped:
            row.finish_reason = "stop"
            return emit, True
        if len(row.tokens) >= budget[0]:
            return self._finish_length(row, emit), True
        return emit, False

    @staticmethod
    def _finish_length(row: _Row, emit: str) -> str:
        """End ``row`` for its token budget; the text still held back comes out after ``emit``."""
        row.finish_reason = "length"
        tail, stopped = row.stops.feed(row.detok.flush())
        if stopped:
            row.finish_reason = "stop"
            return emit + tail
        return emit + tail + row.stops.finish()

    def _forced_logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        """The entry of a forced token (``logits``: its row's raw ``[V]``): the raw model's
        log-probability and top alternatives; no processed one, since nothing was sampled."""
        raw = torch.log_softmax(logits.float(), dim=-1)
        detok = self.backend.detokenize
        k = min(self.gen.top_logprobs, raw.shape[-1])
        top = []
        if k:
            values, indices = raw.topk(k)
            top = [(t, detok([t]), v) for t, v in zip(indices.tolist(), values.tolist())]
        return TokenLogprob(token, detok([token]), float(raw[token]), None, top, None, forced=True)

    def _step_logprobs(self, logits: torch.Tensor, drawn: torch.Tensor, ids: torch.Tensor,
                       taps: list[dict[str, TapValue]] | None = None):
        """Per-row log-probabilities of the chosen ``ids``: under the raw ``logits`` and under
        ``drawn``, the logits the sampler drew from (see :class:`TokenLogprob`); ``taps``, from
        :func:`samplerkit.trace.logprob_taps`, per stage."""
        raw = torch.log_softmax(logits.float(), dim=-1)
        proc = torch.log_softmax(drawn.float(), dim=-1)
        chosen_raw = raw.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()
        chosen_proc = proc.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()
        k = min(self.gen.top_logprobs, logits.shape[-1])
        source = proc if self.gen.top_logprobs_from == "processed" else raw
        top_vals = top_ids = None
        if k:
            values, indices = source.topk(k, dim=-1)
            top_vals, top_ids = values.tolist(), indices.tolist()
        detok = self.backend.detokenize

        def one(slot: int, token: int) -> TokenLogprob:
            top = [(t, detok([t]), v) for t, v in zip(top_ids[slot], top_vals[slot]) if v != float("-inf")] if k else []
            stages = None if taps is None else {
                name: StageLogprob(tap.logprob, [(t, detok([t]), v) for t, v in tap.top], tap.invalid)
                for name, tap in taps[slot].items()}
            return TokenLogprob(token, detok([token]), chosen_raw[slot], chosen_proc[slot], top, stages)
        return one

    def _prompt_logprobs(self, ids: list[int], all_logits: torch.Tensor) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability under the raw model given the tokens before it,
        with the ``k`` most likely alternatives (``None`` for the first token: nothing predicts it)."""
        if len(ids) < 2:
            return [None] * len(ids)
        raw = torch.log_softmax(all_logits[:-1].float(), dim=-1)
        target = torch.as_tensor(ids[1:], device=raw.device)
        chosen = raw.gather(-1, target.unsqueeze(-1)).squeeze(-1).tolist()
        k = min(self.gen.top_logprobs, raw.shape[-1])
        detok = self.backend.detokenize
        tops: list[list[tuple[int, str, float]]] = [[] for _ in chosen]
        if k:
            values, indices = raw.topk(k, dim=-1)
            tops = [[(t, detok([t]), v) for t, v in zip(ti, tv)] for ti, tv in zip(indices.tolist(), values.tolist())]
        return [None] + [TokenLogprob(t, detok([t]), v, None, top) for t, v, top in zip(ids[1:], chosen, tops)]

    def completions(self) -> list[Completion]:
        out = []
        for row in self.rows:
            out.append(Completion(
                prompt_index=row.prompt_index, sample_index=row.sample_index,
                prompt=self.prompts[row.prompt_index], text=row.stops.text, token_ids=list(row.tokens),
                finish_reason=row.finish_reason or "length", prompt_token_ids=list(self.prompt_ids[row.prompt_index]),
                logprobs=row.logprobs,
                prompt_logprobs=self.prompt_logprobs[row.prompt_index] if self.prompt_logprobs is not None else None,
                prompt_text=(self.backend.detokenize(self.prompt_ids[row.prompt_index]) if self.gen.echo else None),
                messages=self.messages[row.prompt_index]))
        return out


__all__ = ["Completion", "Delta", "Generator", "SamplerkitError", "StageLogprob", "TokenLogprob", "generate", "load_backend", "load_config",
           "row_seed", "row_seeds"]
