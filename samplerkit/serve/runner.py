"""The server's one seam to the decode loop: run a :class:`~samplerkit.serve.translate.Job`,
reporting its progress as events, cancellable between steps.

:class:`GeneratorRunner` runs jobs one after another on one loaded backend, each through a
:class:`~samplerkit.generate.Generator` built for its pipeline (cached by the pipeline's key;
they all share the backend, so the model is loaded once). The HTTP layer sees only
:meth:`prepare` (validate and tokenize, before any response is sent) and :meth:`run`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from samplerkit.backend import Backend
from samplerkit.generate import Completion, Delta, Generator, TokenLogprob, _Run
from samplerkit.serve.translate import Job

#: Generators kept for recently used pipelines (each holds a bound pipeline; the backend is shared).
MAX_CACHED_PIPELINES = 64


@dataclass
class TokenEvent:
    """New text of one choice, with the log-probabilities of the tokens it adds (when asked)."""

    delta: Delta
    logprobs: list[TokenLogprob]


@dataclass
class Done:
    """Every choice finished: the completions, prompt-major, ``n`` per prompt."""

    completions: list[Completion]


Event = TokenEvent | Done


class Cancelled(Exception):
    """The job was cancelled (client gone, timeout) before it finished."""


class GeneratorRunner:
    """Jobs run one at a time on one backend (a lock), each job's rows batched together."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._lock = threading.Lock()
        self._generators: OrderedDict[str, Generator] = OrderedDict()
        self._cache_lock = threading.Lock()

    def _generator(self, job: Job) -> Generator:
        with self._cache_lock:
            gen = self._generators.get(job.key)
            if gen is None:
                gen = Generator(job.config, backend=self.backend)
                self._generators[job.key] = gen
                while len(self._generators) > MAX_CACHED_PIPELINES:
                    self._generators.popitem(last=False)
            else:
                self._generators.move_to_end(job.key)
            return gen

    def prepare(self, job: Job) -> _Run:
        """Validate the job against the model (chat template, prompt length): raises
        :class:`~samplerkit.errors.SamplerkitError` before anything runs."""
        seeds = None if job.seed is None else [job.seed] * len(job.prompts)
        run = _Run(self._generator(job), job.prompts, seeds, None, job.generation)
        run._tokenize_prompts()
        return run

    def run(self, prepared: _Run, emit: Callable[[Event], None], cancelled: threading.Event) -> None:
        """Run to the end, calling ``emit`` for each event; stop at the next step once
        ``cancelled`` is set (raises :class:`Cancelled`)."""
        with self._lock:
            if cancelled.is_set():
                raise Cancelled()
            events = prepared.events()
            seen: dict[tuple[int, int], int] = {}
            n = prepared.gen.n
            try:
                for delta in events:
                    row = prepared.rows[delta.prompt_index * n + delta.sample_index]
                    key = (delta.prompt_index, delta.sample_index)
                    new: list[TokenLogprob] = []
                    if row.logprobs is not None:
                        start = seen.get(key, 0)
                        new = row.logprobs[start:]
                        seen[key] = len(row.logprobs)
                    emit(TokenEvent(delta, new))
                    if cancelled.is_set():
                        raise Cancelled()
            finally:
                events.close()
            emit(Done(prepared.completions()))

