"""The decode loop: the only module that talks to both a backend and a pipeline.

After meta-llama/llama's ``generate``: prefill every prompt once (different lengths in one
batch), keep the KV cache, then feed one token per row per step until EOS, a stop string or
``max_new_tokens``. Unlike the seed, rows that finish leave the batch (the backend drops their
cache rows and the pipeline re-packs its parameters), so they cost no further work.
"""

from __future__ import annotations

import hashlib
import threading
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
from samplerkit.errors import GenerationError, PluginError, SamplerkitError
from samplerkit.pipeline import Pipeline, RowOverrides
from samplerkit.registry import Registry, default_registry
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
    """

    token_id: int
    text: str
    logprob: float
    processed_logprob: float | None = None
    top: list[tuple[int, str, float]] = field(default_factory=list)
    taps: dict[str, StageLogprob] | None = None


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
    """A streaming event: new text of one row; ``finish_reason`` is set on its last event."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


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
        # NaN from the model is the backend's fault unless the config tolerates invalid rows.
        self.backend.check_nan = self.pipeline.on_invalid == "raise"
        self._lock = threading.Lock()
        self._owner: int | None = None

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
                 rows: Sequence[RowOverrides | None] | None = None, **generation: Any) -> list[Completion]:
        """Generate for every prompt; returns ``len(prompts) * n`` completions, prompt-major.

        A prompt is a string or, with ``chat=True``, a list of messages (``{"role": "system" |
        "user" | "assistant", "content": str}``) rendered through the model's chat template; a
        single conversation may be passed as ``prompts`` itself.
        """
        run = _Run(self, prompts, seeds, rows, generation)       # validates before taking the lock
        self._acquire()
        try:
            for _ in run.events():
                pass
        finally:
            self._release()
        return run.completions()

    def stream(self, prompts: Prompt | Sequence[Prompt], *, seeds: Sequence[int | None] | None = None,
               rows: Sequence[RowOverrides | None] | None = None, **generation: Any) -> Iterator[Delta]:
        """Yield text deltas as tokens are generated (one :class:`Delta` per row and step)."""
        run = _Run(self, prompts, seeds, rows, generation)
        return self._stream(run)

    def _stream(self, run: _Run) -> Iterator[Delta]:
        self._acquire()
        try:
            yield from run.events()
        finally:
            self._release()


def generate(prompts: Prompt | Sequence[Prompt], config: str | Path | Mapping[str, Any] | RunConfig | None = None, *,
             seeds: Sequence[int | None] | None = None, rows: Sequence[RowOverrides | None] | None = None,
             backend: Backend | None = None, **generation: Any) -> list[Completion]:
    """Run prompts through the configured backend and pipeline; see :class:`Generator`."""
    return Generator(config, backend=backend).generate(prompts, seeds=seeds, rows=rows, **generation)


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

    def __init__(self, prompt_index: int, sample_index: int, gen, detokenize):
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.tokens: list[int] = []
        self.detok = IncrementalDetokenizer(detokenize)
        self.stops = StopMatcher(gen.stop)
        self.logprobs: list[TokenLogprob] | None = [] if gen.logprobs is not None else None
        self.finish_reason: str | None = None


class _Run:
    def __init__(self, owner: Generator, prompts, seeds, rows, overrides: Mapping[str, Any]):
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
        for name, given in (("seeds", seeds), ("rows", rows)):
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
                owner.pipeline._row_specs(r, i)     # unknown steps, bad values: named by prompt index
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

    def _row_seed_list(self) -> list[int | None] | None:
        return row_seeds(self.pipeline, len(self.prompts), self.gen.n, self.seeds, self.row_overrides)

    # -- the loop -----------------------------------------------------------------------
    def events(self) -> Iterator[Delta]:
        gen, backend = self.gen, self.backend
        self.prompt_ids = self._tokenize_prompts()
        n = gen.n
        self.rows = [_Row(i, j, gen, backend.detokenize) for i in range(len(self.prompts)) for j in range(n)]
        if gen.max_new_tokens == 0 and not gen.echo:      # nothing to compute at all
            yield from self._finish_all("length")
            return

        out = backend.prefill(self.prompt_ids, keep_all_logits=gen.echo)
        if gen.echo:
            self.prompt_logprobs = [self._prompt_logprobs(ids, all_logits) for ids, all_logits in zip(self.prompt_ids, out.all)]
        if gen.max_new_tokens == 0:                        # echo only
            yield from self._finish_all("length")
            return
        logits = out.last
        fan_out = [i for i in range(len(self.prompts)) for _ in range(n)]
        if n > 1:
            backend.select_rows(fan_out)
            logits = logits.index_select(0, torch.as_tensor(fan_out, device=logits.device))

        overrides = None if self.row_overrides is None else [self.row_overrides[i] for i in fan_out]
        bound = self.pipeline.bind(overrides if overrides is not None else len(self.rows), seeds=self._row_seed_list())
        budget = [self._budget(self.prompt_ids[i]) for i in fan_out]
        # The history buffers grow with the text generated and never past the longest budget
        # (max_new_tokens, or the context left after the prompt): nothing is sized by a huge
        # max_new_tokens up front.
        ctx = StepContext(len(self.rows), logits.shape[-1], prompt_ids=[self.prompt_ids[i] for i in fan_out],
                          uses=self.pipeline.uses, max_new_tokens=max(b for b, _ in budget),
                          eos_token_ids=[*backend.eos_token_ids, *gen.stop_token_ids],
                          tokenize=lambda text: backend.tokenize(text, add_special=False),
                          token_vocabulary=backend.token_vocabulary, device=logits.device)
        stop_ids = set() if gen.ignore_eos else set(backend.eos_token_ids)
        stop_ids |= set(gen.stop_token_ids)
        running = list(range(len(self.rows)))           # backend row -> self.rows index
        want_logprobs = gen.logprobs is not None
        ctx.want_distribution = want_logprobs

        while running:
            processed = bound.process(logits, ctx) if want_logprobs else None
            ids, valid = bound.sample_with_validity(logits, ctx, processed=processed)
            drawn = ctx.take_distribution() if want_logprobs else None
            taps = logprob_taps(bound.trace, logits, ctx, ids, gen.logprob_stages, gen.top_logprobs) \
                if gen.logprob_stages else None          # before ctx.append: the history the steps saw
            ctx.append(ids)
            id_list = ids.tolist()
            invalid = set() if self.pipeline.on_invalid != "mark_invalid" else {
                slot for slot, ok in enumerate(valid.tolist()) if not ok}
            if want_logprobs:
                lp = self._step_logprobs(logits, processed if drawn is None else drawn, ids, taps)
            keep: list[int] = []
            for slot, (r, token) in enumerate(zip(running, id_list)):
                row = self.rows[r]
                if slot in invalid:            # on_invalid: mark_invalid ends the row here
                    row.finish_reason = "invalid"
                    yield Delta(row.prompt_index, row.sample_index, row.stops.finish(), [], "invalid")
                    continue
                delta, finished = self._advance(row, token, stop_ids, budget[r])
                if want_logprobs and token not in stop_ids:
                    row.logprobs.append(lp(slot, token))
                if finished:
                    yield Delta(row.prompt_index, row.sample_index, delta, [token], row.finish_reason)
                else:
                    keep.append(slot)
                    if delta:
                        yield Delta(row.prompt_index, row.sample_index, delta, [token])
            if not keep:
                break
            if len(keep) < len(running):
                backend.select_rows(keep)
                bound = bound.select_rows(keep)
                ctx.select_rows(keep)
                ids = ids.index_select(0, torch.as_tensor(keep, device=ids.device))
                running = [running[k] for k in keep]
            logits = backend.step(ids)

    def _finish_all(self, reason: str) -> Iterator[Delta]:
        for row in self.rows:
            row.finish_reason = reason
            yield Delta(row.prompt_index, row.sample_index, "", [], reason)

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
        emit, stopped = row.stops.feed(row.detok.push(token))
        if stopped:
            row.finish_reason = "stop"
            return emit, True
        if len(row.tokens) >= budget[0]:
            row.finish_reason = "length"
            tail, stopped = row.stops.feed(row.detok.flush())
            if stopped:
                row.finish_reason = "stop"
                return emit + tail, True
            return emit + tail + row.stops.finish(), True
        return emit, False

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
