"""The FastAPI application: OpenAI's ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``
and ``/health`` over a :class:`~samplerkit.serve.runner.GeneratorRunner`.

Every request is answered, never with a traceback: bad JSON, wrong types and values are a 400
with OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``), a body over the
limit a 413, more rows than the server runs at once a 429, a wrong or missing API key a 401, a
request over its time limit a 504 (its rows are cancelled). A client that disconnects cancels
its rows at the next decode step.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request, imported
# inside create_app because FastAPI is an optional extra) as objects.

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from samplerkit.detokenize import lone_surrogate_in
from samplerkit.errors import SamplerkitError
from samplerkit.generate import Completion, TokenLogprob
from samplerkit.serve.protocol import ApiError, ChatRequest, CompletionRequest, validation_error
from samplerkit.serve.runner import Done, EngineRunner, Submitted
from samplerkit.serve.translate import Job, ServerSide, to_job

log = logging.getLogger("samplerkit.serve")

#: A log-probability that is -inf (a token the pipeline removed) is sent as this, as OpenAI does:
#: JSON has no infinity.
NEG_INF_LOGPROB = -9999.0


def require_fastapi():
    """Import FastAPI, or a clear error naming the extra that installs it."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise SamplerkitError(f"samplerkit serve needs FastAPI and uvicorn ({exc.name} is missing): "
                              "pip install 'samplerkit[serve]'") from None


@dataclass
class _State:
    """Book-keeping of the rows in flight (touched only on the event loop's thread)."""

    rows: int = 0
    requests: int = 0
    served: int = 0
    cancelled: int = 0


def _lp(value: float) -> float:
    return value if math.isfinite(value) else NEG_INF_LOGPROB


def create_app(runner: EngineRunner, server: ServerSide, *, model_name: str, api_key: str | None = None):
    """The ASGI app serving ``runner`` under the name ``model_name``."""
    require_fastapi()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    limits = server.limits
    state = _State()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runner.close)

    app = FastAPI(title="samplerkit", description="OpenAI-compatible server; every request may bring its own "
                                                 "sampling pipeline.", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.samplerkit = state
    app.state.samplerkit_runner = runner

    def error(exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}; this server has /v1/completions, "
                        "/v1/chat/completions, /v1/models and /health",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error(ApiError(exc.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError):
        return error(ApiError(400, str(exc)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error(ApiError(500, f"internal error: {type(exc).__name__}; the server keeps running",
                              type="server_error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                                "the key the server was started with (--api-key)", type="invalid_request_error",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            raise ApiError(413, f"the request body has {int(length):,} bytes; this server accepts at most "
                                f"{limits.max_body_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"the request body is over {limits.max_body_bytes:,} bytes, the most this "
                                    "server accepts")
        try:
            data = json.loads(bytes(body), parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
        # JSON can spell a lone surrogate ("\\ud800"), which is not text; pydantic cannot even
        # word an error about one, so it is refused here, wherever it is in the body.
        if (problem := lone_surrogate_in(data)) is not None:
            raise ApiError(400, problem, param=problem.split(" ", 1)[0] if not problem.startswith("has ") else None)
        return data

    async def admit(request: Request, cls: type) -> tuple[CompletionRequest | ChatRequest, Job, Any]:
        check_key(request)
        data = await read_json(request)
        try:
            parsed = cls.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if parsed.model != model_name:
            raise ApiError(404, f"model {parsed.model[:100]!r} is not served here; this server serves "
                                f"{model_name!r} (see GET /v1/models)", param="model", code="model_not_found")
        job = await asyncio.to_thread(to_job, parsed, server)
        capacity = limits.max_rows + limits.max_waiting_rows
        if state.rows + job.rows > capacity:
            raise ApiError(429, f"the server is busy: {state.rows} rows are running or waiting and this request "
                                f"needs {job.rows} (at most {capacity} at once); retry shortly",
                           type="rate_limit_error", code="too_many_rows")
        state.rows += job.rows             # before the await: concurrent requests see it
        try:
            submitted = await asyncio.to_thread(runner.submit, job)
        except SamplerkitError as exc:
            state.rows -= job.rows
            raise ApiError(400, str(exc), param=_param_of(exc)) from None
        except BaseException:
            state.rows -= job.rows
            raise
        return parsed, job, submitted

    class Run:
        """A submitted job's events on the event loop; its rows count until it has ended."""

        def __init__(self, job: Job, submitted: Submitted):
            self.job, self.submitted = job, submitted
            self.events = runner.events(submitted)
            self.finished = False          # its Done event was seen
            self.ended = False
            state.requests += 1

        def cancel(self) -> None:
            runner.cancel(self.submitted)

        async def close(self) -> None:
            """The job is over for the client: an unfinished one is cancelled (the engine frees
            its rows before its next decode step) and its rows leave the count."""
            if self.ended:
                return
            self.ended = True
            if not self.finished:
                self.cancel()
                state.cancelled += 1
            state.rows -= self.job.rows
            state.requests -= 1
            state.served += 1
            with contextlib.suppress(Exception):
                await self.events.aclose()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "rows_in_flight": state.rows, "requests_in_flight": state.requests,
                "max_rows": limits.max_rows, "requests_done": state.served, "requests_cancelled": state.cancelled}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except ApiError as exc:
            return error(exc)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "samplerkit"}]}

    async def handle(request: Request, cls: type):
        try:
            parsed, job, submitted = await admit(request, cls)
        except ApiError as exc:
            return error(exc)
        chat = cls is ChatRequest
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        deadline = time.monotonic() + limits.request_timeout_s
        run = Run(job, submitted)
        if parsed.stream:
            return EventStream(run, stream(request, parsed, run, rid, deadline))
        try:
            while True:
                event = await next_event(request, run, deadline)
                if isinstance(event, Done):
                    return JSONResponse(full_response(parsed, job, rid, event.completions, chat))
        except ApiError as exc:
            return error(exc)
        except ClientGone:
            return JSONResponse({}, status_code=499)
        finally:
            await run.close()

    class EventStream(StreamingResponse):
        """Server-sent events that always close their run, also when the client is gone before
        the first event (then the body's own ``finally`` never runs)."""

        def __init__(self, run: "Run", body: AsyncIterator[bytes]):
            super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.run = run

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.run.close()

    async def next_event(request: Request, run: "Run", deadline: float) -> Any:
        """The next event of a job; raises for its end by error, timeout or a gone client."""
        pending = asyncio.ensure_future(anext(run.events))
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ApiError(504, f"the request took longer than {limits.request_timeout_s:g} s (the server's "
                                        "request timeout) and was cancelled; ask for fewer tokens", type="timeout")
                done, _ = await asyncio.wait({pending}, timeout=min(remaining, 0.25))
                if done:
                    break
                if await request.is_disconnected():
                    raise ClientGone()
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
        try:
            event = pending.result()
            run.finished = isinstance(event, Done)
            return event
        except StopAsyncIteration:
            raise ApiError(500, "the generation ended without a result", type="server_error") from None
        except SamplerkitError as exc:
            raise ApiError(400, str(exc)) from None
        except Exception as exc:
            log.error("generation failed", exc_info=exc)
            raise ApiError(500, f"internal error during generation: {type(exc).__name__}; the server keeps "
                                "running", type="server_error") from None

    async def stream(request, parsed, run: "Run", rid: str, deadline) -> AsyncIterator[bytes]:
        job = run.job
        chat = isinstance(parsed, ChatRequest)
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = job.generation["n"]
        offsets: dict[int, int] = {}

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            body: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                                    "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

        try:
            if chat:
                yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for j in range(n)])
            while True:
                try:
                    event = await next_event(request, run, deadline)
                except ApiError as exc:
                    yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
                    break
                if isinstance(event, Done):
                    if parsed.stream_options is not None and parsed.stream_options.include_usage:
                        yield chunk([], usage(event.completions))
                    break
                d = event.delta
                index = d.prompt_index * n + d.sample_index
                choice: dict[str, Any] = {"index": index, "finish_reason": d.finish_reason}
                if chat:
                    choice["delta"] = {"content": d.text} if d.text or d.finish_reason is None else {}
                    choice["logprobs"] = {"content": chat_logprobs(event.logprobs)} if job.generation.get(
                        "logprobs") is not None else None
                else:
                    choice["text"] = d.text
                    start_at = offsets.get(index, len(job.prompts[d.prompt_index]))
                    lp, offsets[index] = completion_logprobs(event.logprobs, start_at)
                    choice["logprobs"] = lp if job.generation.get("logprobs") is not None else None
                yield chunk([choice])
            yield b"data: [DONE]\n\n"
        except ClientGone:
            pass
        finally:
            await run.close()          # a client that left (or a finished stream): free the rows

    def usage(completions: list[Completion]) -> dict[str, int]:
        prompts = {c.prompt_index: len(c.prompt_token_ids) for c in completions}
        generated = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": sum(prompts.values()), "completion_tokens": generated,
                "total_tokens": sum(prompts.values()) + generated}

    def chat_logprobs(items: list[TokenLogprob]) -> list[dict[str, Any]]:
        def entry(text: str, value: float) -> dict[str, Any]:
            return {"token": text, "logprob": _lp(value), "bytes": list(text.encode("utf-8", "replace"))}
        return [{**entry(t.text, t.logprob), "top_logprobs": [entry(text, v) for _, text, v in t.top]} for t in items]

    def completion_logprobs(items: list[TokenLogprob | None], start: int,
                            tokens_text: list[str] | None = None) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        at = start
        for i, t in enumerate(items):
            text = t.text if t is not None else (tokens_text[i] if tokens_text else "")
            out["tokens"].append(text)
            out["token_logprobs"].append(None if t is None else _lp(t.logprob))
            out["top_logprobs"].append(None if t is None else {s: _lp(v) for _, s, v in t.top})
            out["text_offset"].append(at)
            at += len(text)
        return out, at

    def full_response(parsed, job: Job, rid: str, completions: list[Completion], chat: bool) -> dict[str, Any]:
        want_logprobs = job.generation.get("logprobs") is not None
        choices = []
        for index, c in enumerate(completions):
            if chat:
                choice: dict[str, Any] = {"index": c.sample_index,
                                          "message": {"role": "assistant", "content": c.text},
                                          "logprobs": {"content": chat_logprobs(c.logprobs or [])} if want_logprobs
                                          else None,
                                          "finish_reason": c.finish_reason}
            else:
                text = c.text
                logprobs = None
                if job.generation.get("echo"):
                    text = c.prompt + c.text
                if want_logprobs:
                    items: list[TokenLogprob | None] = list(c.logprobs or [])
                    start = len(c.prompt)
                    texts = None
                    if job.generation.get("echo") and c.prompt_logprobs is not None:
                        texts = [runner.backend.detokenize([t]) for t in c.prompt_token_ids] + [""] * len(items)
                        items = [*c.prompt_logprobs, *items]
                        start = 0
                    logprobs, _ = completion_logprobs(items, start, texts)
                choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}
            choices.append(choice)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": usage(completions)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatRequest)

    return app


class ClientGone(Exception):
    """The client disconnected (or its job was cancelled): nothing more is sent."""


def _param_of(exc: SamplerkitError) -> str | None:
    """The request field a located error is about (``seed`` for ``seed: ...``)."""
    issues = getattr(exc, "issues", None)
    return issues[0].location.split(" ")[0] or None if issues else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
