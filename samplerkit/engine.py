"""Continuous batching: one running batch that requests join and leave between decode steps.

An :class:`Engine` owns a :class:`~samplerkit.generate.Generator` (its backend and KV cache).
Each :meth:`Engine.submit` makes a :class:`Request`, a handle whose events (:class:`Delta`)
arrive while it runs. Between two decode steps the engine

1. frees the rows of cancelled requests (``backend.select_rows``),
2. admits waiting requests while their rows fit in ``max_rows`` (first come, first served):
   their prompts are prefilled and appended to the running batch with ``backend.join``
   (backends without it: every running row's sequence is prefilled again together with the
   new prompts, see :attr:`samplerkit.backend.Backend.can_join`), fanned out to ``n`` rows,
3. samples one token for every row: the rows of all requests that share one pipeline object
   (the Generator's, a preset, or a mapping resolved once and cached by its canonical JSON)
   and the same logprob and stop-token settings are sampled by one bound call (a
   :class:`_Bundle`), the others (segments, constraints) request by request, and
4. drops finished rows, then runs one forward pass (``backend.step``) for all rows left.

A request's rows are sampled exactly as :meth:`Generator.generate` samples them (the same
per-row seeds, the same step context), and with a batch-invariant backend (the ``llama``
backend's default) a row's logits do not depend on the other rows: a seeded request gives the
tokens ``samplerkit generate`` gives with that seed, whatever else runs beside it.

Threading: :meth:`Engine.start` runs the loop in a background thread (``close`` stops it; the
engine is a context manager); without it, :meth:`Engine.run_until_idle` or :meth:`Engine.step`
run it in the caller's thread. ``submit``, ``Request.cancel`` and reading events are safe from
any thread; :meth:`Request.events_async` waits without blocking an asyncio event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from samplerkit.config import RunConfig
from samplerkit.context import StepContext
from samplerkit.errors import GenerationError
from samplerkit.generate import Completion, Delta, Generator, PipelineEntry, Prompt, _Group, _Run, regroup
from samplerkit.pipeline import BoundPipeline, RowOverrides
from samplerkit.trace import logprob_taps

#: ``Completion.finish_reason`` / ``Delta.finish_reason`` of a row ended by :meth:`Request.cancel`.
CANCELLED = "cancelled"


class EngineClosedError(GenerationError):
    """The engine was closed: no new requests; requests it did not finish end with this."""


class Request:
    """A submitted request: iterate it for :class:`~samplerkit.generate.Delta` events (every
    iterator sees every event from the first one), or wait for :meth:`result`.

    Events are those of :meth:`Generator.stream` for one prompt (``prompt_index`` 0,
    ``sample_index`` ``0..n-1``); each row's last event has its ``finish_reason`` (``"stop"``,
    ``"length"``, ``"invalid"`` or ``"cancelled"``). When the request fails (a plugin error in
    its pipeline, a backend failure, the engine closed), iteration and :meth:`result` raise
    that error after the events that came before it.
    """

    def __init__(self, engine: Engine, run: _Run, request_id: int):
        self.id = request_id
        self.engine = engine
        self._run = run
        self.n = run.gen.n
        self._cond = threading.Condition()
        self._events: list[Delta] = []
        self._done = False
        self._error: BaseException | None = None
        self._completions: list[Completion] | None = None
        self._cancel = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def __repr__(self) -> str:
        state = "done" if self._done else ("cancelling" if self._cancel else "pending")
        return f"<Request {self.id} n={self.n} {state}>"

    @property
    def prompt(self) -> str:
        """The prompt as the model sees it (a chat prompt rendered through the template)."""
        return self._run.prompts[0]

    @property
    def prompt_token_ids(self) -> list[int]:
        return list(self._run.prompt_ids[0])

    @property
    def done(self) -> bool:
        """Whether every row has finished (or the request failed or was cancelled)."""
        return self._done

    @property
    def cancelled(self) -> bool:
        return self._cancel

    def cancel(self) -> None:
        """Stop this request. A waiting request ends at once; a running one's rows are freed
        before the engine's next decode step (so at most one more token is computed for them).
        Each unfinished row ends with finish reason ``"cancelled"``. No effect once done."""
        self.engine._cancel(self)

    # -- events ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Delta]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and not self._done:
                    self._cond.wait()
                batch = self._events[i:]
                done = self._done
            yield from batch
            i += len(batch)
            if done and i >= len(self._events):
                if self._error is not None:
                    raise self._error
                return

    async def events_async(self) -> AsyncIterator[Delta]:
        """The events as an async iterator: waits on the running event loop, never blocking it
        (the engine thread wakes it with ``loop.call_soon_threadsafe``)."""
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            wake = asyncio.Event()
            with self._cond:
                batch = self._events[i:]
                done = self._done
                if not batch and not done:
                    self._waiters.append((loop, wake))
            for event in batch:
                yield event
            i += len(batch)
            if batch:
                continue
            if done:
                if self._error is not None:
                    raise self._error
                return
            await wake.wait()

    def result(self, timeout: float | None = None) -> list[Completion]:
        """The completions (``n`` of them, by ``sample_index``), waiting until done; raises the
        request's error, or :class:`TimeoutError` after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.id} not done after {timeout} s")
        if self._error is not None:
            raise self._error
        return list(self._completions or [])

    async def result_async(self) -> list[Completion]:
        """:meth:`result` for asyncio code."""
        async for _ in self.events_async():
            pass
        return self.result()

    # -- engine side ------------------------------------------------------------------------
    def _push(self, events: Sequence[Delta], *, completions: list[Completion] | None = None,
              error: BaseException | None = None, done: bool = False) -> None:
        with self._cond:
            if self._done:
                return
            self._events.extend(events)
            if done:
                self._done = True
                self._completions = completions
                self._error = error
            waiters, self._waiters = self._waiters, []
            self._cond.notify_all()
        for loop, wake in waiters:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:          # that event loop is closed: nobody is waiting there
                pass


class _Bundle:
    """Rows of several requests that share one pipeline object and run settings: one bound
    call samples them all each step (instead of one call per request).

    Its rows are its ``parts``' members, part after part (not necessarily contiguous in the
    backend: the engine gathers their logits). It owns the bound pipeline and step context
    of those rows (the parts' own are dropped when they join), built with
    :meth:`BoundPipeline.concat` and :meth:`StepContext.concat`, so every row keeps its
    parameters, random stream and history: a seeded row draws exactly what it draws alone."""

    def __init__(self, key: tuple, group: _Group):
        self.key = key
        self.parts: list[_Group] = [group]
        self.bound: BoundPipeline = group.bound
        self.ctx: StepContext = group.ctx
        group.bound = group.ctx = None      # the bundle's now
        group.bundle = self

    @staticmethod
    def key_of(group: Any) -> tuple | None:
        """What rows must share to be sampled together; ``None``: never bundled."""
        if not isinstance(group, _Group) or group.phase is not None or group.overrun is not None:
            return None
        if not BoundPipeline.can_concat(group.pipeline):
            return None
        gen = group.run.gen
        return (id(group.pipeline), group.want_logprobs, gen.top_logprobs, gen.top_logprobs_from,
                repr(gen.logprob_stages), group.ctx.eos_token_ids)

    @property
    def size(self) -> int:
        return sum(len(p.members) for p in self.parts)

    def can_absorb(self, other: _Bundle) -> bool:
        return other.key == self.key and set(other.ctx.state) == set(self.ctx.state)

    def absorb(self, other: _Bundle) -> None:
        """Take ``other``'s rows after this bundle's."""
        self.bound = BoundPipeline.concat([self.bound, other.bound])
        self.ctx = StepContext.concat([self.ctx, other.ctx])
        for part in other.parts:
            part.bundle = self
        self.parts.extend(other.parts)
        other.parts = []

    def split(self) -> list[_Bundle]:
        """One bundle per part (the rows keep their state)."""
        out, start = [], 0
        for part in self.parts:
            rows = list(range(start, start + len(part.members)))
            start += len(rows)
            b = _Bundle.__new__(_Bundle)
            b.key, b.parts = self.key, [part]
            b.bound = self.bound.select_rows(rows)
            b.ctx = self.ctx.rows_copy(rows)
            part.bundle = b
            out.append(b)
        self.parts = []
        return out

    def step(self, logits: torch.Tensor
             ) -> tuple[torch.Tensor, list[tuple[_Group, list[Delta], list[int], BaseException | None]]]:
        """Sample one token for every row (``logits``: the bundle's rows, in its order) with
        one call, then each part's book-keeping (:meth:`_Group.advance`). A failure of the
        call raises before any row's history changed; one of a part's book-keeping is
        returned with that part (its rows then keep nothing)."""
        bound, ctx = self.bound, self.ctx
        first = self.parts[0]
        gen, want_logprobs = first.run.gen, first.want_logprobs
        processed = bound.process(logits, ctx) if want_logprobs else None
        ids, valid = bound.sample_with_validity(logits, ctx, processed=processed)
        drawn = ctx.take_distribution() if want_logprobs else None
        taps = logprob_taps(bound.trace, logits, ctx, ids, gen.logprob_stages, gen.top_logprobs) \
            if gen.logprob_stages else None
        ctx.append(ids)
        id_list = ids.tolist()
        invalid = set() if first.pipeline.on_invalid != "mark_invalid" else {
            slot for slot, ok in enumerate(valid.tolist()) if not ok}
        lp = first.run._step_logprobs(logits, processed if drawn is None else drawn, ids, taps) \
            if want_logprobs else None
        out, start = [], 0
        for part in self.parts:
            size = len(part.members)
            mine = {k - start for k in invalid if start <= k < start + size}
            try:
                events, kept, _ = part.advance(logits, id_list[start:start + size], mine, lp, offset=start)
                out.append((part, events, kept, None))
            except Exception as exc:        # noqa: BLE001 - e.g. a detokenizer failing on this request's token
                out.append((part, [], [], exc))
            start += size
        return ids, out

    def select(self, kept: dict[int, list[int]]) -> None:
        """Keep, of each part (by ``id``), the rows at these positions in it; parts not in
        ``kept`` leave whole. Empty parts leave the bundle."""
        rows, start = [], 0
        for part in self.parts:
            size = len(part.members)
            keep = kept.get(id(part), [])
            rows.extend(start + k for k in keep)
            if len(keep) < size:
                part.members = [part.members[k] for k in keep]
                part.budget = [part.budget[k] for k in keep]
            start += size
        self.parts = [p for p in self.parts if p.members]
        if rows and len(rows) < start:
            self.bound = self.bound.select_rows(rows)
            self.ctx.select_rows(rows)


class Engine:
    """Continuous batching over one backend; see the module docstring.

    ``generator`` is a :class:`Generator` (shared: while the engine has running rows, the
    Generator's own ``generate``/``stream`` calls wait) or what :class:`Generator` takes (a
    YAML path, a mapping, a :class:`RunConfig` or ``None`` for the defaults). At most
    ``max_rows`` rows run at once (a request takes ``n`` rows); more requests wait, first come,
    first served, and ``max_waiting`` (``None``: unbounded) bounds that queue. Requests that
    share a pipeline are sampled by one call per step; ``share_calls=False`` gives each
    request its own call (the same tokens; for measuring what sharing saves).
    """

    def __init__(self, generator: Generator | str | Path | Mapping[str, Any] | RunConfig | None = None, *,
                 max_rows: int = 64, max_waiting: int | None = None, share_calls: bool = True,
                 backend=None, registry=None):
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise GenerationError(f"max_rows must be an int >= 1, got {max_rows!r:.60}")
        if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int)
                                        or max_waiting < 0):
            raise GenerationError(f"max_waiting must be an int >= 0 or None, got {max_waiting!r:.60}")
        self.generator = generator if isinstance(generator, Generator) else Generator(
            generator, backend=backend, registry=registry)
        self.backend = self.generator.backend
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        #: Sample the rows of requests that share a pipeline with one call (False: one call
        #: per request, the tokens are the same; for measuring what sharing saves).
        self.share_calls = bool(share_calls)
        self._cond = threading.Condition()     # guards _waiting, _cancelled, _closed; wakes the loop
        self._waiting: deque[Request] = deque()
        self._cancelled: set[Request] = set()
        self._closed = False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._driver: int | None = None        # the thread running the loop now
        # Loop state, touched only by the thread running the loop:
        self._groups: list[_Group] = []        # in backend row order
        self._bundles: list[_Bundle] = []      # the groups sampled together (a group is in at most one)
        self._logits: torch.Tensor | None = None
        self._holding = False                  # the Generator's lock (while rows run)
        self._admitting: list[Request] = []    # requests being admitted (failed with the batch)
        self._solo: set[Request] = set()       # requests to admit one at a time (a joint admission failed)

    # -- public API -------------------------------------------------------------------------
    def submit(self, prompt: Prompt, *, pipeline: PipelineEntry = None, seed: int | None = None,
               overrides: RowOverrides | None = None, **generation: Any) -> Request:
        """Queue one prompt (text, or with ``chat=True`` a list of messages); returns its
        :class:`Request`. ``pipeline``: ``None`` (the Generator's), a preset name, a
        :class:`~samplerkit.Pipeline` or a mapping in YAML form (see
        :meth:`Generator.pipeline_for`); ``seed`` seeds the request's rows as
        ``Generator.generate(seeds=[seed])`` does; ``overrides`` are per-step parameter
        overrides (``{"top_p": {"top_p": 0.5}}``); ``generation`` are options of the
        ``generation:`` section (``max_new_tokens``, ``n``, ``stop``, ``logprobs``, ``echo``,
        ``chat``, ...). Everything is validated here: errors (:class:`SamplerkitError`, located
        like YAML errors) raise in the caller, before anything is queued.
        """
        if not isinstance(prompt, str) and not (
                isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray))
                and all(isinstance(m, Mapping) for m in prompt)):
            raise GenerationError(f"submit takes one prompt (a string, or a list of chat messages), got "
                                  f"{type(prompt).__name__}; submit each prompt of a list separately")
        run = _Run(self.generator, [prompt], None if seed is None else [seed],
                   None if overrides is None else [overrides], generation, [pipeline])
        if run.gen.n > self.max_rows:
            raise GenerationError(f"n={run.gen.n} needs {run.gen.n} rows but this engine runs at most "
                                  f"max_rows={self.max_rows}; lower n or raise max_rows")
        run.tokenize()                     # prompt errors (too long, bad chat) raise here
        request = Request(self, run, next(self._ids))
        run.request = request
        if run.gen.max_new_tokens == 0 and not run.gen.echo:     # nothing to compute
            run.start_rows()
            request._push(list(run._finish_all("length")), completions=run.completions(), done=True)
            return request
        with self._cond:
            if self._closed:
                raise EngineClosedError("this engine is closed; create a new Engine")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise GenerationError(f"too many waiting requests ({len(self._waiting)}, max_waiting="
                                      f"{self.max_waiting}); retry later")
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def start(self) -> Engine:
        """Run the loop in a background (daemon) thread until :meth:`close`."""
        with self._cond:
            if self._closed:
                raise EngineClosedError("this engine is closed; create a new Engine")
            if self._thread is not None:
                return self
            self._thread = threading.Thread(target=self._background, name="samplerkit-engine", daemon=True)
        self._thread.start()
        return self

    def close(self, *, cancel: bool = True, timeout: float | None = None) -> None:
        """Stop the engine. ``cancel=True`` cancels every unfinished request (finish reason
        ``"cancelled"``); ``cancel=False`` first lets them finish. No new requests after."""
        if not cancel:
            self._drain(timeout)
        with self._cond:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for request in waiting:
            self._finish_cancelled(request)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        elif thread is None:
            self._with_driver(self._stop_running)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def run_until_idle(self) -> None:
        """Run the loop in this thread until no request is waiting or running (without a
        background thread: :meth:`start` not called)."""
        if self._thread is not None:
            raise GenerationError("this engine runs in its background thread (start() was called); wait for "
                                  "requests with request.result() instead of run_until_idle()")
        self._with_driver(self._until_idle)

    def step(self) -> bool:
        """One turn of the loop in this thread (admit, sample, step); False when idle."""
        if self._thread is not None:
            raise GenerationError("this engine runs in its background thread (start() was called)")
        return self._with_driver(self._turn)

    @property
    def running_rows(self) -> int:
        """Rows in the running batch (approximate when read from another thread)."""
        return sum(len(g.members) for g in self._groups)

    @property
    def waiting(self) -> int:
        """Requests waiting for rows."""
        with self._cond:
            return len(self._waiting)

    # -- the loop -----------------------------------------------------------------------------
    def _with_driver(self, fn):
        with self._cond:
            if self._driver is not None and self._driver != threading.get_ident():
                raise GenerationError("another thread is running this engine's loop")
            self._driver = threading.get_ident()
        try:
            return fn()
        finally:
            with self._cond:
                self._driver = None

    def _until_idle(self) -> None:
        while self._turn():
            pass

    def _drain(self, timeout: float | None) -> None:
        if self._thread is None:
            self.run_until_idle()
            return
        with self._cond:
            self._cond.wait_for(lambda: not self._waiting and not self._groups and not self._cancelled, timeout)

    def _background(self) -> None:
        self._driver = threading.get_ident()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._waiting or self._groups or self._cancelled)
                if self._closed:
                    break
            self._turn()
            with self._cond:
                self._cond.notify_all()         # wakes _drain
        self._stop_running()

    def _turn(self) -> bool:
        """Cancel, admit, sample, step. Any failure outside one request's pipeline (the
        backend) fails every running request and empties the batch; the engine goes on. The
        exception: a join that raises on a backend with ``join_is_atomic`` fails only the
        joining request (several joining ones are admitted again one at a time)."""
        self._admitting: list[Request] = []
        try:
            return self._turn_inner()
        except BaseException as exc:        # noqa: BLE001 - handed to every request it hit
            admitting = self._admitting
            if isinstance(exc, Exception) and admitting and getattr(self.backend, "join_kept_rows", False) is True:
                # The backend's join raised and left the running rows as they were (its
                # join_is_atomic): they go on; only the joining requests are at stake.
                self.backend.join_kept_rows = False
                if len(admitting) > 1:          # one of them may be the cause: one at a time
                    self._requeue_alone(admitting)
                else:
                    admitting[0]._push([], error=exc, done=True)
                return True
            if isinstance(exc, Exception) and len(admitting) > 1:
                # A prefill or join of several new prompts failed: one of them may be the cause.
                # The running rows go (the backend's cache is in an unknown state), but the new
                # requests wait again at the head of the queue and are admitted one at a time,
                # so only the one that fails alone gets the error.
                self._fail_running(exc, spare=admitting)
                self._requeue_alone(admitting)
                return True
            self._fail_running(exc, admitting)
            if not isinstance(exc, Exception):
                raise
            return bool(self._waiting)

    def _requeue_alone(self, requests: Sequence[Request]) -> None:
        """Put ``requests`` back at the head of the queue, in order, each to be admitted alone."""
        with self._cond:
            for request in reversed(requests):
                self._waiting.appendleft(request)
            self._solo.update(requests)

    def _turn_inner(self) -> bool:
        with self._cond:
            cancelled = [r for r in self._cancelled]
            self._cancelled.clear()
            admitted: list[Request] = []
            free = self.max_rows - self.running_rows
            while self._waiting and self._waiting[0].n <= free and not self._closed:
                if admitted and self._waiting[0] in self._solo:
                    break
                request = self._waiting.popleft()
                admitted.append(request)
                free -= request.n
                if request in self._solo:       # suspected of failing an admission: alone
                    self._solo.discard(request)
                    break
        if cancelled:
            self._drop(cancelled, lambda r: self._finish_cancelled(r))
        if admitted:
            self._admitting = admitted
            self._admit(admitted)
            self._admitting = []
        if not self._groups:
            self._release()
            with self._cond:
                return bool(self._waiting)
        self._sample_and_step()
        return True

    def _acquire(self) -> None:
        if not self._holding:
            self.generator._acquire()
            self._holding = True

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self.generator._release()

    def _admit(self, requests: list[Request]) -> None:
        backend = self.backend
        self._acquire()
        prompts = [r._run.prompt_ids[0] for r in requests]
        echo = any(r._run.gen.echo for r in requests)
        old = self.running_rows
        if old == 0:
            out = backend.prefill(prompts, keep_all_logits=echo)
        elif backend.can_join:
            out = backend.join(prompts, keep_all_logits=echo)
        else:
            # No join(): rebuild the cache from every running row's sequence plus the new
            # prompts. The running rows keep the logits their last step gave (the same
            # distribution; recomputing it could differ in the last bits).
            sequences = [g.run.prompt_ids[0] + g.run.rows[r].tokens for g in self._groups for r in g.members]
            full = backend.prefill(sequences + prompts, keep_all_logits=echo)
            out = type(full)(full.last[old:], None if full.all is None else full.all[old:])
        fan = [k for k, r in enumerate(requests) for _ in range(r.n)]
        if len(fan) != len(requests):
            backend.select_rows(list(range(old)) + [old + k for k in fan])
        new_logits = out.last if len(fan) == len(requests) else out.last.index_select(
            0, torch.as_tensor(fan, device=out.last.device))
        self._logits = new_logits if old == 0 else torch.cat([self._logits, new_logits])
        finished_now = []
        failed: list[tuple[Request, Exception, range]] = []
        row = old
        for k, request in enumerate(requests):
            run = request._run
            rows = range(row, row + request.n)        # its rows in the backend (one pipeline: one block)
            row += request.n
            try:
                run.start_rows()
                if run.gen.echo:
                    run.prompt_logprobs = [run._prompt_logprobs(run.prompt_ids[0], out.all[k])]
                groups = run.make_groups(new_logits.shape[-1], new_logits.device)
            except Exception as exc:      # noqa: BLE001 - this request's own set-up failed, not the backend
                failed.append((request, exc, rows))
                continue
            self._groups.extend(groups)
            for g in groups:
                key = _Bundle.key_of(g) if self.share_calls else None
                if key is not None:
                    self._bundles.append(_Bundle(key, g))
            if run.gen.max_new_tokens == 0:       # echo only: the prompt's logprobs are all it wanted
                finished_now.append(request)
        if failed:
            gone = {i for _, _, rows in failed for i in rows}
            keep = [i for i in range(row) if i not in gone]
            if keep:                              # none left: the next admission prefills afresh
                backend.select_rows(keep)
                self._logits = self._logits.index_select(
                    0, torch.as_tensor(keep, dtype=torch.long, device=self._logits.device))
            else:
                self._logits = None
            for request, exc, _ in failed:
                request._push([], error=exc, done=True)
        if finished_now:
            self._drop(finished_now, self._finish_echo_only)

    def _finish_echo_only(self, request: Request) -> None:
        run = request._run
        request._push(list(run._finish_all("length")), completions=run.completions(), done=True)

    def _drop(self, requests: list[Request], finish) -> None:
        """Free the rows of ``requests`` now (one ``select_rows``), then ``finish(request)``."""
        gone = set(requests)
        keep: list[int] = []
        start = 0
        groups = []
        for g in self._groups:
            size = len(g.members)
            if g.run.request not in gone:
                keep.extend(range(start, start + size))
                groups.append(g)
            start += size
        if keep and len(keep) < start:          # none left: the next admission prefills afresh
            self.backend.select_rows(keep)
            if self._logits is not None:
                self._logits = self._logits.index_select(
                    0, torch.as_tensor(keep, dtype=torch.long, device=self._logits.device))
        self._groups = groups
        self._leave_bundles(gone)
        for request in requests:
            finish(request)
        if not groups:
            self._logits = None
            self._release()

    def _leave_bundles(self, gone: set[Request]) -> None:
        """Take the rows of the requests in ``gone`` out of their bundles."""
        for b in self._bundles:
            if any(p.run.request in gone for p in b.parts):
                b.select({id(p): list(range(len(p.members))) for p in b.parts if p.run.request not in gone})
        self._bundles = [b for b in self._bundles if b.parts]

    def _merge_bundles(self) -> None:
        """Join bundles of one key (requests admitted apart) once their step state matches."""
        merged: list[_Bundle] = []
        for b in self._bundles:
            into = next((m for m in merged if m.can_absorb(b)), None)
            if into is None:
                merged.append(b)
            else:
                into.absorb(b)
        self._bundles = merged

    def _step_bundle(self, b: _Bundle, logits: torch.Tensor, starts: dict[int, int], ids: torch.Tensor,
                     touched: dict[Request, list[Delta]], failed: dict[Request, BaseException],
                     kept: dict[int, list[int]]) -> None:
        """Sample bundle ``b``'s rows (gathered from the batch's ``logits``) into ``ids``; on a
        failure of a bundle of several requests, each samples alone so that only the request
        whose pipeline fails ends."""
        where = [starts[id(p)] + k for p in b.parts for k in range(len(p.members))]
        first = where[0]
        if where == list(range(first, first + len(where))):
            index, part = None, logits[first:first + len(where)]
        else:
            index = torch.as_tensor(where, dtype=torch.long, device=logits.device)
            part = logits.index_select(0, index)
        try:
            out_ids, results = b.step(part)
        except Exception as exc:           # noqa: BLE001 - a pipeline's failure ends its own request
            if len(b.parts) > 1:
                singles = b.split()
                self._bundles.extend(singles)
                for single in singles:
                    self._step_bundle(single, logits, starts, ids, touched, failed, kept)
                return
            failed[b.parts[0].run.request] = exc
            b.parts[0].members = []
            return
        if index is None:
            ids[first:first + len(where)] = out_ids
        else:
            ids.index_copy_(0, index, out_ids)
        by_part = {}
        for g, events, keep, error in results:
            if error is not None:
                failed[g.run.request] = error
                continue
            touched.setdefault(g.run.request, []).extend(events)
            by_part[id(g)] = keep
            kept[id(g)] = [starts[id(g)] + k for k in keep]
        b.select(by_part)

    def _sample_and_step(self) -> None:
        logits = self._logits
        self._merge_bundles()
        keep: list[int] = []
        groups: list[_Group] = []
        starts: dict[int, int] = {}
        start = 0
        for g in self._groups:
            starts[id(g)] = start
            start += len(g.members)
        ids = torch.zeros(start, dtype=torch.int64, device=logits.device)
        touched: dict[Request, list[Delta]] = {}
        failed: dict[Request, BaseException] = {}
        kept: dict[int, list[int]] = {}       # id(group) -> its running rows' backend positions
        segmented = any(g.run.segments for g in self._groups)
        before = [(id(g.run), r) for g in self._groups for r in g.members] if segmented else None
        for b in list(self._bundles):
            self._step_bundle(b, logits, starts, ids, touched, failed, kept)
        self._bundles = [b for b in self._bundles if b.parts]
        for g in self._groups:
            if getattr(g, "bundle", None) is not None:
                continue
            size = len(g.members)
            request = g.run.request
            start = starts[id(g)]
            part = logits if size == logits.shape[0] else logits[start:start + size]
            try:
                g_ids, events, g_kept = g.step(part)
            except Exception as exc:     # noqa: BLE001 - this request's pipeline failed: only it ends
                failed[request] = exc
                continue
            touched.setdefault(request, []).extend(events)
            ids[start:start + size] = g_ids
            kept[id(g)] = [start + k for k in g_kept]
            if len(g_kept) < size:
                g.select(g_kept)
        for g in self._groups:
            if g.run.request in failed:
                continue
            keep.extend(kept.get(id(g), []))
            if g.members:
                groups.append(g)
        self._groups = groups                 # a failed group's rows are not in keep either
        if failed:
            self._leave_bundles(set(failed))
        alive = {g.run.request for g in self._groups}
        for request, events in touched.items():
            if request in failed:
                continue
            if request in alive:
                request._push(events)
            else:
                request._push(events, completions=request._run.completions(), done=True)
        for request, exc in failed.items():
            request._push(touched.get(request, []), error=exc, done=True)
        if not self._groups:
            self._logits = None               # the next admission prefills a fresh batch
            self._release()
            return
        if before is not None and any(g.leaving for g in self._groups):
            # segments: rows that switched move to other groups; the backend's rows follow.
            self._groups = regroup(self._groups, logits.shape[-1], logits.device)
            where = {key: b for b, key in enumerate(before)}
            keep = [where[(id(g.run), r)] for g in self._groups for r in g.members]
        if keep != list(range(ids.shape[0])):
            self.backend.select_rows(keep)
            ids = ids.index_select(0, torch.as_tensor(keep, dtype=torch.long, device=ids.device))
        self._logits = self.backend.step(ids)

    def _cancel(self, request: Request) -> None:
        with self._cond:
            if request._done or request._cancel:
                return
            request._cancel = True
            if request in self._waiting:
                self._waiting.remove(request)
                waiting = True
            else:
                waiting = False
                self._cancelled.add(request)
                self._cond.notify_all()
        if waiting:
            self._finish_cancelled(request)

    def _finish_cancelled(self, request: Request, error: BaseException | None = None) -> None:
        run = request._run
        if not run.rows:
            run.start_rows()
        events = []
        for row in run.rows:
            if row.finish_reason is None:
                row.finish_reason = CANCELLED
                events.append(row.event(row.stops.finish(), CANCELLED))
        request._push(events, completions=run.completions(), error=error, done=True)

    def _fail_running(self, exc: BaseException, admitting: Sequence[Request] = (),
                      spare: Sequence[Request] = ()) -> None:
        """Empty the batch: every running request and those in ``admitting`` end with ``exc``,
        except those in ``spare`` (queued again by the caller)."""
        requests = ({g.run.request for g in self._groups} | set(admitting)) - set(spare)
        self._groups = []
        self._bundles = []
        self._logits = None
        try:
            self.backend.select_rows([])
        except Exception:                   # noqa: BLE001 - the backend is already broken
            pass
        self._release()
        for request in requests:
            request._push([], error=exc, done=True)

    def _stop_running(self) -> None:
        """On close: cancel what still runs and give the Generator back."""
        requests = list(dict.fromkeys(g.run.request for g in self._groups))
        if requests:
            self._drop(requests, self._finish_cancelled)
        self._release()


__all__ = ["CANCELLED", "Engine", "EngineClosedError", "Request"]
