"""The server's one seam to the decode loop: a continuous-batching :class:`~samplerkit.engine.Engine`.

Every request's rows join the engine's running batch between two decode steps and leave it
when they finish; requests with different pipelines share each forward pass. The HTTP layer
sees :meth:`EngineRunner.submit` (validate, tokenize and queue, before any response is sent),
:meth:`EngineRunner.events` (an async iterator of :class:`TokenEvent`, then one :class:`Done`)
and :meth:`EngineRunner.cancel`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from samplerkit.engine import Engine, Request
from samplerkit.errors import ConfigError, ConfigIssue, SamplerkitError
from samplerkit.generate import Completion, Delta, TokenLogprob
from samplerkit.serve.translate import Job


@dataclass
class TokenEvent:
    """New text of one choice (``delta.prompt_index`` is the prompt's index in the request),
    with the log-probabilities of the tokens it covers when logprobs were asked for."""

    delta: Delta
    logprobs: list[TokenLogprob]


@dataclass
class Done:
    """Every choice finished: the completions, prompt-major, ``n`` per prompt."""

    completions: list[Completion]
    cancelled: bool = False


@dataclass
class Submitted:
    """A job's engine requests, one per prompt."""

    job: Job
    requests: list[Request]


class EngineRunner:
    """Jobs on one :class:`Engine`: :meth:`start` runs its loop thread, :meth:`close` ends it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.backend = engine.backend

    def start(self) -> None:
        self.engine.start()

    def close(self) -> None:
        self.engine.close(cancel=True, timeout=30)

    def submit(self, job: Job) -> Submitted:
        """Queue every prompt of ``job``; :class:`SamplerkitError` (nothing stays queued) when
        the engine refuses one (prompt too long for the context, a chat template error, ...)."""
        requests: list[Request] = []
        entry: Any = None if job.uses_server_pipeline else job.pipeline_spec
        try:
            for prompt in job.prompts:
                requests.append(self.engine.submit(prompt, pipeline=entry, seed=job.seed, **job.generation))
        except BaseException as exc:
            for request in requests:
                request.cancel()
            if isinstance(exc, ConfigError):
                raise ConfigError([ConfigIssue(_seed_location(i.location), i.message) for i in exc.issues]) from None
            if isinstance(exc, SamplerkitError) and len(job.prompts) > 1:
                raise type(exc)(f"prompt {len(requests)}: {exc}") from None
            raise
        return Submitted(job, requests)

    def cancel(self, submitted: Submitted) -> None:
        """Free the job's rows before the engine's next decode step."""
        for request in submitted.requests:
            request.cancel()

    async def events(self, submitted: Submitted) -> AsyncIterator[TokenEvent | Done]:
        """The job's events as they come, its prompts' rows interleaved, then :class:`Done`.
        Raises the error that ended a request (after cancelling the others)."""
        queue: asyncio.Queue = asyncio.Queue()
        want_logprobs = submitted.job.generation.get("logprobs") is not None
        end = object()

        async def pump(index: int, request: Request) -> None:
            try:
                async for delta in request.events_async():
                    # A delta carries the log-probabilities of exactly the tokens it covers.
                    new = list(delta.logprobs or []) if want_logprobs else []
                    queue.put_nowait(TokenEvent(dataclasses.replace(delta, prompt_index=index), new))
                queue.put_nowait(end)
            except BaseException as exc:          # handed to the consumer below
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(submitted.requests)]
        try:
            left = len(tasks)
            while left:
                item = await queue.get()
                if item is end:
                    left -= 1
                elif isinstance(item, BaseException):
                    self.cancel(submitted)
                    raise item
                else:
                    yield item
            completions = []
            for i, request in enumerate(submitted.requests):
                completions.extend(dataclasses.replace(c, prompt_index=i) for c in request.result(timeout=0))
            yield Done(completions, cancelled=any(r.cancelled for r in submitted.requests))
        finally:
            for task in tasks:
                task.cancel()

    def rows_running(self) -> int:
        return self.engine.running_rows


def _seed_location(location: str) -> str:
    """The engine names a request's seed ``seeds[0]``; the request calls it ``seed``."""
    return "seed" + location[len("seeds[0]"):] if location.startswith("seeds[0]") else location
