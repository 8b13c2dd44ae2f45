"""The decode loop: the only module that talks to both a backend and a pipeline.

After meta-llama/llama's ``generate``: prefill every prompt once (different lengths in one
batch), keep the KV cache, then feed one token per row per step until EOS, a stop string or
``max_new_tokens``. Unlike the seed, rows that finish leave the batch (the backend drops their
cache rows and the pipeline re-packs its parameters), so they cost no further work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samplerkit.backend import Backend
from samplerkit.config import RunConfig, read_yaml, resolve, validate_generation
from samplerkit.context import StepContext
from samplerkit.detokenize import IncrementalDetokenizer, StopMatcher
from samplerkit.errors import GenerationError, SamplerkitError
from samplerkit.pipeline import Pipeline, RowOverrides
from samplerkit.registry import Registry, default_registry


@dataclass
class TokenLogprob:
    """Log-probabilities of one chosen token.

    ``logprob`` is under the raw model distribution, ``processed_logprob`` under the
    pipeline's processed one (``-inf`` can't occur: the chosen token was kept). ``top`` holds
    the ``n`` most likely tokens of the raw distribution as ``(token_id, text, logprob)``.
    """

    token_id: int
    text: str
    logprob: float
    processed_logprob: float | None = None
    top: list[tuple[int, str, float]] = field(default_factory=list)


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
    """Instantiate the configured backend (loads the model)."""
    return config.backend.cls(config.backend.params)


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
        return seeds and [s for s in seeds for _ in range(n)]
    config_seed = sampler.params.seed

    def base(i: int) -> int | None:
        if seeds is not None and seeds[i] is not None:
            return seeds[i]
        override = (rows[i] or {}).get(sampler.name, {}) if rows else {}
        return override.get("seed", config_seed)

    per_row = [None if (b := base(i)) is None else row_seed(b, j) for i in range(prompts) for j in range(n)]
    return None if all(s is None for s in per_row) else per_row


class Generator:
    """A loaded backend plus a pipeline: call :meth:`generate` or :meth:`stream` many times."""

    def __init__(self, config: str | Path | Mapping[str, Any] | RunConfig | None = None, *,
                 backend: Backend | None = None, registry: Registry | None = None):
        self.config, self.registry = load_config(config, registry)
        self.backend = backend if backend is not None else load_backend(self.config)
        device = getattr(self.backend.params, "device", "cpu")
        self.pipeline = Pipeline.from_config(self.config, device=device)

    def generate(self, prompts: str | Sequence[str], *, seeds: Sequence[int | None] | None = None,
                 rows: Sequence[RowOverrides | None] | None = None, **generation: Any) -> list[Completion]:
        """Generate for every prompt; returns ``len(prompts) * n`` completions, prompt-major."""
        run = _Run(self, prompts, seeds, rows, generation)
        for _ in run.events():
            pass
        return run.completions()

    def stream(self, prompts: str | Sequence[str], *, seeds: Sequence[int | None] | None = None,
               rows: Sequence[RowOverrides | None] | None = None, **generation: Any) -> Iterator[Delta]:
        """Yield text deltas as tokens are generated (one :class:`Delta` per row and step)."""
        yield from _Run(self, prompts, seeds, rows, generation).events()


def generate(prompts: str | Sequence[str], config: str | Path | Mapping[str, Any] | RunConfig | None = None, *,
             seeds: Sequence[int | None] | None = None, rows: Sequence[RowOverrides | None] | None = None,
             backend: Backend | None = None, **generation: Any) -> list[Completion]:
    """Run prompts through the configured backend and pipeline; see :class:`Generator`."""
    return Generator(config, backend=backend).generate(prompts, seeds=seeds, rows=rows, **generation)


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
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.prompts:
            raise GenerationError("no prompts given")
        for name, given in (("seeds", seeds), ("rows", rows)):
            if given is not None and len(given) != len(self.prompts):
                raise GenerationError(f"{name} has {len(given)} entries for {len(self.prompts)} prompts; give one per prompt")
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
        for i, prompt in enumerate(self.prompts):
            text = backend.apply_chat_template(prompt) if self.gen.chat else prompt
            ids = backend.tokenize(text, add_special=True)
            if not ids:
                raise GenerationError(f"prompt {i} is empty and the model adds no BOS token; give at least one character")
            if limit is not None and len(ids) >= limit:
                raise GenerationError(f"prompt {i} has {len(ids)} tokens, but the model's context holds {limit} "
                                      f"(prompt plus at least one new token); shorten the prompt or raise max_context")
            out.append(ids)
        return out

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
        ctx = StepContext(len(self.rows), logits.shape[-1], prompt_ids=[self.prompt_ids[i] for i in fan_out],
                          uses=self.pipeline.uses, max_new_tokens=gen.max_new_tokens,
                          eos_token_ids=[*backend.eos_token_ids, *gen.stop_token_ids],
                          tokenize=lambda text: backend.tokenize(text, add_special=False), device=logits.device)
        stop_ids = set() if gen.ignore_eos else set(backend.eos_token_ids)
        stop_ids |= set(gen.stop_token_ids)
        budget = [self._budget(self.prompt_ids[i]) for i in fan_out]
        running = list(range(len(self.rows)))           # backend row -> self.rows index
        want_logprobs = gen.logprobs is not None

        while running:
            processed = bound.process(logits, ctx) if want_logprobs else None
            ids, valid = bound.sample_with_validity(logits, ctx, processed=processed)
            ctx.append(ids)
            id_list = ids.tolist()
            invalid = set() if self.pipeline.on_invalid != "mark_invalid" else {
                slot for slot, ok in enumerate(valid.tolist()) if not ok}
            if want_logprobs:
                lp = self._step_logprobs(logits, processed, ids)
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

    def _step_logprobs(self, logits: torch.Tensor, processed: torch.Tensor, ids: torch.Tensor):
        raw = torch.log_softmax(logits.float(), dim=-1)
        proc = torch.log_softmax(processed, dim=-1)
        chosen_raw = raw.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()
        chosen_proc = proc.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()
        k = self.gen.logprobs or 0
        top_vals, top_ids = (raw.topk(k, dim=-1) if k else (None, None))
        top_vals = top_vals.tolist() if k else None
        top_ids = top_ids.tolist() if k else None
        detok = self.backend.detokenize

        def one(slot: int, token: int) -> TokenLogprob:
            top = [(t, detok([t]), v) for t, v in zip(top_ids[slot], top_vals[slot])] if k else []
            return TokenLogprob(token, detok([token]), chosen_raw[slot], chosen_proc[slot], top)
        return one

    def _prompt_logprobs(self, ids: list[int], all_logits: torch.Tensor) -> list[TokenLogprob | None]:
        if len(ids) < 2:
            return [None] * len(ids)
        raw = torch.log_softmax(all_logits[:-1].float(), dim=-1)
        target = torch.as_tensor(ids[1:], device=raw.device)
        chosen = raw.gather(-1, target.unsqueeze(-1)).squeeze(-1).tolist()
        detok = self.backend.detokenize
        return [None] + [TokenLogprob(t, detok([t]), v) for t, v in zip(ids[1:], chosen)]

    def completions(self) -> list[Completion]:
        out = []
        for row in self.rows:
            out.append(Completion(
                prompt_index=row.prompt_index, sample_index=row.sample_index,
                prompt=self.prompts[row.prompt_index], text=row.stops.text, token_ids=list(row.tokens),
                finish_reason=row.finish_reason or "length", prompt_token_ids=list(self.prompt_ids[row.prompt_index]),
                logprobs=row.logprobs,
                prompt_logprobs=self.prompt_logprobs[row.prompt_index] if self.prompt_logprobs is not None else None))
        return out


__all__ = ["Completion", "Delta", "Generator", "SamplerkitError", "TokenLogprob", "generate", "load_backend", "load_config",
           "row_seed", "row_seeds"]
