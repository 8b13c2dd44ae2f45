"""From a validated OpenAI request to a samplerkit job: prompts, a resolved pipeline, loop options.

Which pipeline a request samples with, in this order:

1. ``"samplerkit": {"pipeline": [...], "sampler": {...}}`` and/or ``{"preset": NAME}``: that
   pipeline, validated by :func:`samplerkit.config.resolve` exactly like YAML (the same messages,
   located under ``samplerkit.``). OpenAI's sampling fields beside it are refused (one source of
   truth for the distribution).
2. Any of OpenAI's sampling fields (``logit_bias``, ``frequency_penalty``, ``presence_penalty``,
   ``temperature``, ``top_p``): the pipeline they describe, in the order OpenAI applies them
   (biases and penalties, then temperature, then nucleus), with the ``categorical`` sampler.
   Fields not given are absent from it (OpenAI's defaults, ``temperature: 1`` and ``top_p: 1``,
   are the identity).
3. Neither: the server's own configured pipeline and sampler (``samplerkit serve --config``), so
   a request reproduces ``samplerkit generate --config`` with the same seed.

A request can never choose the backend, plugins, files or paths: the ``samplerkit`` object has
only ``pipeline``, ``sampler`` and ``preset``, names resolve in the server's registry (blocked
plugins are absent from it), and a step parameter that names a file is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from samplerkit.config import DEFAULT_PIPELINE, DEFAULT_SAMPLER, RunConfig, resolve, validate_generation
from samplerkit.errors import ConfigError, SamplerkitError, short_repr
from samplerkit.presets import load_preset, merge_under
from samplerkit.registry import Registry
from samplerkit.serve.protocol import ApiError, ChatRequest, CompletionRequest, Limits

#: Step parameters that would make the server read a file of the client's choosing.
PATH_PARAMS = frozenset({"file", "path", "filename", "model", "directory", "dir"})
PATH_SUFFIXES = ("_file", "_path", "_dir", "_directory")


@dataclass
class Job:
    """One request, validated: what the runner needs and nothing HTTP."""

    prompts: list[Any]                   # text, or (chat) a list of messages
    config: RunConfig                    # the server's config with this request's pipeline
    generation: dict[str, Any]           # GenerationConfig overrides (max_new_tokens, stop, n, ...)
    seed: int | None
    rows: int                            # prompts x n
    chat: bool = False
    pipeline_spec: dict[str, Any] = field(default_factory=dict)   # {"pipeline": [...], "sampler": {...}}
    uses_server_pipeline: bool = False   # the request named no pipeline: the server's own runs


@dataclass(frozen=True)
class ServerSide:
    """What the translation needs from the server: its config, registry, vocabulary and limits."""

    config: RunConfig
    registry: Registry
    vocab_size: int
    limits: Limits


_OPENAI_SAMPLING = ("logit_bias", "frequency_penalty", "presence_penalty", "temperature", "top_p")


def to_job(request: CompletionRequest | ChatRequest, server: ServerSide) -> Job:
    """The job of ``request``; :class:`ApiError` (400) for anything the server cannot run."""
    chat = isinstance(request, ChatRequest)
    if chat:
        prompts: list[Any] = [[m.as_template_message() for m in request.messages]]
    else:
        prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
    spec, where, own = _pipeline(request, server)
    data = {k: v for k, v in server.config.raw.items() if k not in ("pipeline", "sampler", "preset")}
    data.update(spec)
    if server.config.on_invalid != "raise":
        spec = {**spec, "on_invalid": server.config.on_invalid}
    try:
        config = resolve(data, server.registry)
    except ConfigError as exc:
        raise _located(exc, where) from None
    _refuse_paths(config, where)
    generation = _generation(request, server, chat)
    rows = len(prompts) * generation["n"]
    if generation["n"] > server.limits.max_rows:
        raise ApiError(400, f"n is {generation['n']}; this server runs at most {server.limits.max_rows} rows at once "
                            "(each sample is a row): lower n", param="n")
    if rows > server.limits.max_rows + server.limits.max_waiting_rows:
        raise ApiError(400, f"this request asks for {rows} rows ({len(prompts)} prompts x n={generation['n']}); "
                            f"this server holds at most {server.limits.max_rows + server.limits.max_waiting_rows} "
                            "rows (running and waiting): send fewer prompts per request", param="prompt")
    try:
        validate_generation(config.generation, generation)
    except ConfigError as exc:
        raise ApiError(400, str(exc)) from None
    return Job(prompts, config, generation, request.seed, rows, chat, spec, uses_server_pipeline=not own)


def _pipeline(request: CompletionRequest | ChatRequest,
              server: ServerSide) -> tuple[dict[str, Any], dict[int, str], bool]:
    """The ``{"pipeline", "sampler"}`` mapping of the request, for error messages the request
    field each pipeline index came from, and whether the request chose it (else the server's)."""
    given = [name for name in _OPENAI_SAMPLING if getattr(request, name) is not None]
    constrained = _constraint(request, server)
    if request.samplerkit is not None:
        ext = request.samplerkit
        if given:
            raise ApiError(400, f"{given[0]} and samplerkit.pipeline both set the sampling distribution; put the "
                                f"step in samplerkit.pipeline (e.g. {{'{given[0]}': ...}}) or drop the samplerkit "
                                "object", param=given[0])
        spec: dict[str, Any] = {}
        if ext.preset is not None:
            try:
                preset = load_preset(ext.preset)
            except ConfigError as exc:
                raise ApiError(400, f"samplerkit.{exc.issues[0]}", param="samplerkit.preset") from None
            spec = {k: v for k, v in preset.items() if k in ("pipeline", "sampler")}
        own = {k: v for k, v in (("pipeline", ext.pipeline), ("sampler", ext.sampler)) if v is not None}
        spec = merge_under(spec, own)
        if "pipeline" not in spec and "sampler" not in spec:
            raise ApiError(400, "samplerkit: give a pipeline, a sampler or a preset (or leave the object out)",
                           param="samplerkit")
        spec.setdefault("pipeline", [])
        spec.setdefault("sampler", "categorical")
        pipeline = list(spec["pipeline"])
        where = {i + len(constrained): f"samplerkit.pipeline[{i}]" for i in range(len(pipeline))}
        spec["pipeline"] = constrained + pipeline
    elif given:
        pipeline = []
        where = {}
        for name in given:
            value = getattr(request, name)
            where[len(constrained) + len(pipeline)] = name
            if name == "logit_bias":
                pipeline.append({"logit_bias": {"bias": _bias(value, server.vocab_size)}})
            else:
                pipeline.append({name: {name: value}})
        spec = {"pipeline": constrained + pipeline, "sampler": "categorical"}
    else:
        raw = server.config.raw
        pipeline = list(raw.get("pipeline", DEFAULT_PIPELINE))
        where = {i + len(constrained): f"the server's pipeline[{i}]" for i in range(len(pipeline))}
        spec = {"pipeline": constrained + pipeline, "sampler": raw.get("sampler", DEFAULT_SAMPLER)}
    for i in range(len(constrained)):
        where[i] = "response_format"
    return spec, where, bool(request.samplerkit is not None or given or constrained)


def _constraint(request: CompletionRequest | ChatRequest, server: ServerSide) -> list[dict[str, Any]]:
    """The constrained-decoding step ``response_format`` asks for: ``json_schema`` (or
    ``json_object``) when that step is registered, else a 400 saying which extra provides it."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return []
    step = fmt.type
    if not server.registry.has("processor", step):
        raise ApiError(400, f"response_format {step} needs the {step!r} step (constrained decoding, "
                            f"pip install 'samplerkit[structured]'), which this server does not have registered",
                       param="response_format")
    if step == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError(400, "response_format json_schema: give json_schema.schema (a JSON Schema object)",
                           param="response_format.json_schema")
        return [{"json_schema": {"schema": fmt.json_schema.schema_}}]
    return [{"json_object": {}}]


def _bias(value: dict[str, float], vocab: int) -> dict[int, float]:
    out = {}
    for key, bias in value.items():
        token = int(key) if key.isascii() and key.isdigit() and len(key) <= 19 else None
        if token is None or token >= vocab:
            raise ApiError(400, f"logit_bias key {short_repr(key)} is not a token id of this model (ids are "
                                f"decimal integers in [0, {vocab}))", param="logit_bias")
        out[token] = bias
    return out


def _located(exc: ConfigError, where: dict[int, str]) -> ApiError:
    """A pipeline's :class:`ConfigError` with each location named as the request names it."""
    lines = []
    param = None
    for issue in exc.issues:
        location = issue.location
        for index, name in where.items():
            prefix = f"pipeline[{index}]"
            if location == prefix or location.startswith(prefix + " ") or location.startswith(prefix + "."):
                location = name + location[len(prefix):]
                break
        else:
            if location.startswith(("sampler", "pipeline")):
                location = f"samplerkit.{location}"
        param = param or location.split(" ")[0]
        lines.append(f"{location}: {issue.message}")
    return ApiError(400, "; ".join(lines[:10]), param=param)


def _refuse_paths(config: RunConfig, where: dict[int, str]) -> None:
    steps = [*config.processors, config.sampler]
    for index, spec in enumerate(steps):
        for name in spec.params.model_fields_set:
            if name in PATH_PARAMS or name.endswith(PATH_SUFFIXES):
                location = where.get(index, "samplerkit.sampler") if index < len(config.processors) else "samplerkit.sampler"
                raise ApiError(400, f"{location} {spec.name}: parameter {name!r} names a file; a request may not make "
                                    "the server read files. Give the content inline, or configure the step in the "
                                    "server's --config", param=location)


def _generation(request: CompletionRequest | ChatRequest, server: ServerSide, chat: bool) -> dict[str, Any]:
    limits = server.limits
    out: dict[str, Any] = {"n": request.n, "chat": chat}
    if chat:
        if request.max_tokens is not None and request.max_completion_tokens is not None:
            raise ApiError(400, "give max_completion_tokens or max_tokens, not both", param="max_tokens")
        asked = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    else:
        asked, name = request.max_tokens, "max_tokens"
    if asked is None:
        asked = min(server.config.generation.max_new_tokens, limits.max_tokens)
    if asked > limits.max_tokens:
        raise ApiError(400, f"{name} is {asked}; this server generates at most {limits.max_tokens} tokens per "
                            "completion", param=name)
    out["max_new_tokens"] = asked
    if request.stop is not None:
        out["stop"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    if chat:
        if request.top_logprobs is not None and not request.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if request.logprobs:
            out["logprobs"] = request.top_logprobs or 0
    else:
        if request.logprobs is not None:
            out["logprobs"] = request.logprobs
        if request.echo:
            out["echo"] = True
        if request.best_of is not None and request.best_of != request.n:
            raise ApiError(400, "best_of (generate several, return the best) is not supported; leave it out and use n",
                           param="best_of")
        if request.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by this server", param="suffix")
    if request.stream and (out.get("echo") or False):
        raise ApiError(400, "echo with stream is not supported; use stream: false to get the prompt back",
                       param="echo")
    return out


__all__ = ["Job", "ServerSide", "SamplerkitError", "to_job"]
