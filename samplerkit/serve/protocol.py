"""OpenAI's wire format: the request bodies the server accepts and its error bodies.

Every field a request may send is declared here; anything else is refused (HTTP 400 naming the
field), so nothing a client sends is silently ignored. Numbers and booleans are strict in the
same way as a run config (:mod:`samplerkit.strict`): ``"0.7"`` or ``true`` is not a temperature.
Ranges are OpenAI's where samplerkit's steps accept them (``temperature`` in ``[0, 2]``,
penalties in ``[-2, 2]``, ``logit_bias`` values in ``[-100, 100]``), and the server's limits
(:class:`Limits`) bound everything whose size costs memory or time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from samplerkit.errors import clip, short_repr
from samplerkit.strict import check_strict

#: The most stop strings and the longest one (OpenAI allows 4; a few more cost nothing).
MAX_STOP = 16
MAX_STOP_CHARS = 1000
#: The most ``logit_bias`` entries (OpenAI's limit is 300).
MAX_LOGIT_BIAS = 1024
#: The most alternatives ``logprobs`` / ``top_logprobs`` may ask for (OpenAI: 5 and 20).
MAX_TOP_LOGPROBS = 20
#: The most prompts of one completions request and messages of one chat request.
MAX_PROMPTS = 256
MAX_MESSAGES = 1024


@dataclass(frozen=True)
class Limits:
    """What one server accepts; beyond these a request gets a clear 4xx.

    ``max_rows``: rows (prompts x ``n``) in the running batch (the engine's ``max_rows``);
    ``max_waiting_rows``: rows that may wait for a place in it; a request that would take the
    rows in flight (running and waiting) past ``max_rows + max_waiting_rows`` gets a 429;
    ``max_tokens``: the largest ``max_tokens`` a request may ask for (400 beyond);
    ``max_body_bytes``: the largest request body (413 beyond);
    ``request_timeout_s``: wall-clock seconds a request may take, queueing included (504 beyond,
    and its rows are cancelled).
    """

    max_rows: int = 64
    max_waiting_rows: int = 256
    max_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 600.0


class ApiError(Exception):
    """An error answered with OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _strict(cls, value: Any, info: ValidationInfo) -> Any:
    field = cls.model_fields[info.field_name]
    return check_strict(value, field.annotation)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        return _strict(cls, value, info)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplerkitOptions(_Strict):
    """The ``samplerkit`` extension: a whole pipeline, as in a run config, or a preset name.

    Only ``pipeline``, ``sampler`` and ``preset`` exist: a request never names a backend, a
    file, a plugin list or generation options here (those are OpenAI's own fields).
    """

    pipeline: list[Any] | None = Field(None, description="processors in order, as in YAML `pipeline:`")
    sampler: str | dict[str, Any] | None = Field(None, description="as in YAML `sampler:`")
    preset: str | None = Field(None, description="a shipped preset; `pipeline`/`sampler` given beside it override it")


class JsonSchemaFormat(_Strict):
    name: str = Field("response", max_length=256)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


NonNegInt = Annotated[int, Field(ge=0)]


class _Common(_Strict):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model: str = Field(max_length=1024)
    n: int = Field(1, ge=1, description="samples per prompt")
    stop: str | list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, max_length=1024, description="the caller's end-user id (accepted, not used)")
    samplerkit: SamplerkitOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        for s in [value] if isinstance(value, str) else value or []:
            if s == "":
                raise ValueError("a stop string must not be empty")
        if isinstance(value, str) and len(value) > MAX_STOP_CHARS:
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return value


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(max_length=MAX_PROMPTS)
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and value and (isinstance(value[0], int) or isinstance(value[0], list)):
            raise ValueError("prompts given as token ids are not supported; send the prompt text")
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, part in enumerate(value):
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(f"content[{i}] has type {short_repr(part.get('type'))}; this server takes text "
                                     "parts only ({'type': 'text', 'text': ...})")
        return value

    def as_template_message(self) -> dict[str, Any]:
        """The message as the chat template takes it: ``content`` one string (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


#: Union members and validators in pydantic's error locations (``stop.list[str]``): not fields.
_UNION_TAG = re.compile(r"str|int|float|bool|none|(list|dict|json-or-python|tagged-union)\[.*\]|function-.*|"
                        r"constrained-.*|[A-Z]\w*")


def validation_error(exc: ValidationError) -> ApiError:
    """A pydantic error of a request body as a 400 naming the first bad field (``param``) and
    listing every problem (``messages[1].role: ...``)."""
    problems = []
    first = None
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.fullmatch(p))]
        path = ""
        for p in loc:
            path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
        path = clip(path, 160) if path else ""
        first = first or path or None
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field (not part of this API); remove it"
        elif err["type"] == "missing":
            message = "required field is missing"
        elif "input" in err and err["type"] not in ("value_error",):
            message += f", got {short_repr(err['input'])}"
        problems.append(f"{path}: {message}" if path else message)
    unique = list(dict.fromkeys(problems))
    shown = unique[:10]
    text = "; ".join(shown) + (f"; ... and {len(unique) - len(shown)} more" if len(unique) > len(shown) else "")
    return ApiError(400, text, param=first)
