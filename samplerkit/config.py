"""Run configuration: YAML/dict -> validated, in two phases.

Phase 1 checks the structure (sections, types of the generation options) with pydantic.
Phase 2 resolves each step name in the registry and validates its parameters against the
class's own ``Params`` model (plugins make a static union impossible). Every problem from
both phases is collected, each with its location, into one :class:`ConfigError`::

    pipeline[2] top_p: must be in (0, 1], got 1.5

The format::

    backend: {name: llama}                 # or just `backend: llama`
    pipeline:                              # applied exactly in this order
      - temperature: {temperature: 0.7}
      - top_p: 0.9                         # shorthand: the field named like the step
    sampler: {name: categorical, seed: 1234}
    generation: {max_new_tokens: 128, stop: ["\\n\\n"]}
    plugins: {block: [some_plugin]}
    preset: llama_cpp                      # optional: start from a shipped preset (samplerkit.presets)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo, field_validator

from samplerkit.detokenize import lone_surrogate_in
from samplerkit.errors import ConfigError, ConfigIssue, clip, did_you_mean, short_repr
from samplerkit.presets import PRESET_KEY, apply_preset, list_presets, unknown_preset_message
from samplerkit.registry import Kind, Registry, default_registry
from samplerkit.segments import SEGMENT_KEYS, Segment
from samplerkit.spec import StepSpec, issues_from_validation, message_for, with_item_path
from samplerkit.strict import CONFIG_DIR, check_strict
from samplerkit.yaml_io import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_NODES,
    check_bounds,
    parse_set_value,
    parse_yaml,
    read_yaml,
)

#: What a pipeline does with a row whose logits are unusable (NaN, +inf, nothing left):
#: ``raise`` an error naming the row and stage; ``mark_invalid`` (the row ends with finish
#: reason ``invalid``); ``fallback_greedy`` (argmax over the row's finite input logits).
InvalidPolicy = Literal["raise", "mark_invalid", "fallback_greedy"]

DEFAULT_BACKEND = "llama"
DEFAULT_SAMPLER = "categorical"
# The seed's defaults (meta-llama/llama generate): temperature 0.6, then top_p 0.9.
DEFAULT_PIPELINE: list[dict[str, Any]] = [{"temperature": {"temperature": 0.6}}, {"top_p": {"top_p": 0.9}}]
#: Most steps in ``pipeline:`` (each is resolved and validated on its own; real ones have < 20).
MAX_PIPELINE_STEPS = 1000


#: The stage a logprob tap or a trace names for the pipeline's input (the raw model logits).
STAGE_INPUT = "input"
#: The stage name for the output of the last processor (the input when there is none).
STAGE_PROCESSED = "processed"


class LogprobTaps(BaseModel):
    """``logprobs: {top: 5, at: [input, top_k, processed]}``: the chosen token's log-probability
    and the ``top`` most likely tokens under the distribution at each named stage of the
    pipeline (see :func:`stage_names`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    top: int = Field(0, ge=0, le=100, description="how many most likely tokens to report at each stage (and in `top`)")
    at: list[str] = Field(min_length=1, max_length=MAX_PIPELINE_STEPS + 3, description=(
        "the stages to tap: `input`, a processor's name (`top_k`; a repeated step: `top_k#2`), `processed`, "
        "or a sampler that picks the argmax (`greedy`)"))

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return check_strict(value, cls.model_fields[info.field_name].annotation)

    @field_validator("at")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(map(repr, repeated))} more than once; list each stage once")
        return value


def _logprobs_form(value: Any) -> str:
    """Which form of ``logprobs`` a value is (a mapping: the taps; anything else: the count), so
    that a mistake is reported against that form only."""
    return "LogprobTaps" if isinstance(value, (Mapping, LogprobTaps)) else "int"


class GenerationConfig(BaseModel):
    """Options of the decode loop (not of any step)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    max_new_tokens: int = Field(128, ge=0, description="most tokens generated per row")
    stop: list[str] = Field(default_factory=list, description="stop strings, matched across token boundaries; not included in the text")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="extra token ids that end a row, besides the model's EOS")
    ignore_eos: bool = Field(False, description="keep generating past EOS")
    n: int = Field(1, ge=1, le=1024, description="samples per prompt")
    logprobs: Annotated[Annotated[int, Field(ge=0, le=100), Tag("int")] | Annotated[LogprobTaps, Tag("LogprobTaps")],
                        Discriminator(_logprobs_form)] | None = Field(None, description=(
        "return the chosen token's log-probability and this many top alternatives; or `{top: N, at: [stage, ...]}` "
        "for the same at named stages of the pipeline too; null for none"))
    top_logprobs_from: Literal["raw", "processed"] = Field(
        "raw", description="where the logprobs top alternatives come from: the raw model distribution or the one the token was drawn from")
    echo: bool = Field(False, description="also return the prompt tokens with their log-probabilities")
    chat: bool = Field(False, description="wrap each prompt in the model's chat template")

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # The same strict numbers and booleans as every step's Params (samplerkit.strict).
        if info.field_name == "logprobs" and _logprobs_form(value) == "int":
            return check_strict(value, int | None)        # the mapping form checks its own fields
        return check_strict(value, cls.model_fields[info.field_name].annotation)

    @property
    def top_logprobs(self) -> int:
        """How many top alternatives each logprob reports (the int form, or ``logprobs.top``)."""
        return self.logprobs.top if isinstance(self.logprobs, LogprobTaps) else (self.logprobs or 0)

    @property
    def logprob_stages(self) -> tuple[str, ...]:
        """The stages tapped by ``logprobs: {at: [...]}``; empty for the int form or none."""
        return tuple(self.logprobs.at) if isinstance(self.logprobs, LogprobTaps) else ()


def stage_names(processors: Sequence[StepSpec], sampler: StepSpec | None = None) -> list[str]:
    """The stages of a pipeline, in order, as traces and logprob taps name them: ``input``, each
    processor by its step name (a name that repeats gets ``#2``, ``#3``, ... from its second
    occurrence: ``top_k``, ``top_k#2``), and the sampler's name when the sampler declares
    ``picks_argmax`` (its own truncation to one token). ``processed`` (the last processor's
    output) is an alias that :func:`check_stages` accepts too."""
    names = [STAGE_INPUT]
    seen: dict[str, int] = {}
    for spec in processors:
        seen[spec.name] = seen.get(spec.name, 0) + 1
        names.append(spec.name if seen[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}")
    if sampler is not None and getattr(sampler.cls, "picks_argmax", False):
        names.append(sampler.name)
    return names


def check_stages(wanted: Sequence[str], processors: Sequence[StepSpec], sampler: StepSpec | None,
                 where: str = "generation.logprobs.at") -> list[ConfigIssue]:
    """One issue per name in ``wanted`` that is not a stage of this pipeline, naming the stages."""
    known = stage_names(processors, sampler)
    known.insert(len(processors) + 1, STAGE_PROCESSED)
    return [ConfigIssue(f"{where}[{i}]", f"{short_repr(name)} is not a stage of this pipeline{did_you_mean(name, known)} "
                                         f"Stages: {', '.join(known)}")
            for i, name in enumerate(wanted) if name not in known]


class PluginsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block: list[str] = Field(default_factory=list, description="plugin names not to load (also SAMPLERKIT_BLOCK_PLUGINS)")


class _Structure(BaseModel):
    """Phase 1: the document's shape; step parameters stay raw until phase 2."""

    model_config = ConfigDict(extra="forbid")

    backend: str | dict[str, Any] = Field(default_factory=lambda: {"name": DEFAULT_BACKEND})
    pipeline: list[Any] = Field(default_factory=lambda: [dict(s) for s in DEFAULT_PIPELINE])
    sampler: str | dict[str, Any] = Field(default_factory=lambda: {"name": DEFAULT_SAMPLER})
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    on_invalid: InvalidPolicy = "raise"
    segments: list[Any] | None = None


@dataclass(frozen=True)
class RunConfig:
    """A fully validated run: backend, processors in order, one sampler, loop options."""

    backend: StepSpec
    processors: tuple[StepSpec, ...]
    sampler: StepSpec
    generation: GenerationConfig
    plugins: PluginsConfig
    raw: Mapping[str, Any]
    on_invalid: InvalidPolicy = "raise"
    #: ``segments:`` resolved (samplerkit/segments.py); empty when the config has none.
    segments: tuple[Segment, ...] = ()


def resolve(data: Mapping[str, Any], registry: Registry, source: str | None = None) -> RunConfig:
    """Validate a config mapping in two phases and resolve every name in ``registry``. When
    ``source`` is the YAML file the mapping was read from, relative paths in step parameters
    (:data:`samplerkit.strict.ConfigPath`, e.g. ``json_schema: {file: ...}``) are read from its
    directory; otherwise from the working directory."""
    token = _config_dir.set(Path(os.path.abspath(source)).parent if source and Path(source).is_file() else None)
    try:
        return _resolve(data, registry, source)
    finally:
        _config_dir.reset(token)


#: The directory of the YAML file being resolved (None: the working directory).
_config_dir: ContextVar[Path | None] = ContextVar("samplerkit_config_dir", default=None)


def _resolve(data: Mapping[str, Any], registry: Registry, source: str | None) -> RunConfig:
    check_bounds(data, source)
    if isinstance(data, Mapping) and (problem := lone_surrogate_in(dict(data))) is not None:
        raise ConfigError(problem, source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config is a mapping (backend, pipeline, sampler, ...), got {type(data).__name__}",
                          source)
    issues: list[ConfigIssue] = []
    data = _expand_preset(data, issues)
    try:
        structure = _Structure.model_validate(dict(data))
    except ValidationError as exc:
        for err in exc.errors():
            issues.append(_issue_for_section(err))
        # Keep validating what parsed so every problem is reported at once.
        structure = _Structure.model_construct(**{
            k: v for k, v in data.items()
            if k in _Structure.model_fields and not any(e["loc"][:1] == (k,) for e in exc.errors())})
        for name, field in _Structure.model_fields.items():
            if not hasattr(structure, name) or getattr(structure, name, None) is None:
                setattr(structure, name, field.get_default(call_default_factory=True))

    backend = _resolve_named(structure.backend, "backend", registry, issues, DEFAULT_BACKEND)
    processors = []
    if len(structure.pipeline) > MAX_PIPELINE_STEPS:
        issues.append(ConfigIssue("pipeline", f"has {len(structure.pipeline):,} steps; at most {MAX_PIPELINE_STEPS:,} "
                                              "are allowed (a real pipeline has a handful)"))
    else:
        for index, entry in enumerate(structure.pipeline):
            spec = _resolve_pipeline_entry(index, entry, registry, issues)
            if spec is not None:
                processors.append(spec)
    sampler = _resolve_named(structure.sampler, "sampler", registry, issues, DEFAULT_SAMPLER)
    segments = _resolve_segments(structure, registry, issues) if structure.segments is not None else ()
    if isinstance(structure.generation, GenerationConfig) and structure.generation.logprob_stages:
        issues.extend(check_stages(structure.generation.logprob_stages, processors, sampler))
        for seg in segments:
            issues.extend(check_stages(structure.generation.logprob_stages, seg.processors, seg.sampler,
                                       f"generation.logprobs.at ({seg.location})"))
    if issues:
        raise ConfigError(issues, source)
    return RunConfig(backend, tuple(processors), sampler, structure.generation, structure.plugins, dict(data),
                     structure.on_invalid, segments)


def _resolve_segments(structure: _Structure, registry: Registry, issues: list[ConfigIssue]) -> tuple[Segment, ...]:
    """``segments:`` -> :class:`Segment` list (see samplerkit/segments.py); problems are collected
    with their location (``segments[1] pipeline[0] top_p: ...``). ``after: S`` on segment ``k``
    is ``until: S`` on segment ``k - 1`` (on segment 0: a leading segment with the top-level
    pipeline and sampler that runs until ``S``)."""
    raw = structure.segments or []
    if not raw:
        issues.append(ConfigIssue("segments", "is empty; list at least one segment, e.g. "
                                              "[{until: \"</think>\", pipeline: [{temperature: 0.8}]}], or remove the key"))
        return ()
    out: list[Segment] = []
    afters: list[str | None] = []
    for i, item in enumerate(raw):
        where = f"segments[{i}]"
        n = len(issues)
        if not isinstance(item, dict):
            issues.append(ConfigIssue(where, f"a segment is a mapping of {', '.join(SEGMENT_KEYS)} and constraint steps, "
                                             f"like {{until: \"</think>\", pipeline: [{{temperature: 0.8}}]}}; got {short_repr(item)}"))
            continue
        constraints = [k for k in item if k not in SEGMENT_KEYS and isinstance(k, str)
                       and registry.has("processor", k) and getattr(registry.entry("processor", k).cls, "completes", False)]
        unknown = [k for k in item if k not in SEGMENT_KEYS and k not in constraints]
        for k in unknown:
            issues.append(ConfigIssue(f"{where} {clip(str(k))}", f"unknown segment key{did_you_mean(str(k), list(SEGMENT_KEYS))} "
                                                                 f"A segment takes {', '.join(SEGMENT_KEYS)}, or a constraint step "
                                                                 "(a processor that declares completes, e.g. json_schema, regex)"))
        texts = {}
        for key in ("until", "after"):
            value = item.get(key)
            if key in item and (not isinstance(value, str) or not value):
                issues.append(ConfigIssue(f"{where}.{key}", f"must be a non-empty string (the text that closes the segment), "
                                                            f"got {short_repr(value)}"))
                value = None
            texts[key] = value
        budget = item.get("max_tokens")
        if "max_tokens" in item and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            issues.append(ConfigIssue(f"{where}.max_tokens", f"must be an integer >= 1 (tokens in the segment before its "
                                                             f"closing string is forced), got {short_repr(budget)}"))
            budget = None
        steps = item.get("pipeline", structure.pipeline)
        if not isinstance(steps, list):
            issues.append(ConfigIssue(f"{where}.pipeline", f"must be a list of steps, got {short_repr(steps)}"))
            steps = []
        processors = [spec for j, entry in enumerate(steps)
                      if (spec := _resolve_pipeline_entry(j, entry, registry, issues, f"{where} ")) is not None]
        first = []
        for name in constraints:
            if any(spec.name == name for spec in processors):
                issues.append(ConfigIssue(f"{where} {name}", f"is given both as a segment key and in {where}.pipeline; "
                                                             "keep one of the two"))
                continue
            spec = _validate_step(registry, "processor", name, item[name], f"{where} {name}", issues)
            if spec is not None:
                first.append(spec)
        sampler = _resolve_named(item.get("sampler", structure.sampler), "sampler", registry, issues, DEFAULT_SAMPLER,
                                 f"{where} ")
        if len(issues) > n or sampler is None:
            continue
        if i == 0 and texts["after"] is not None:       # the text before the trigger: the top-level pipeline
            top = [spec for j, entry in enumerate(structure.pipeline)
                   if (spec := _resolve_pipeline_entry(j, entry, registry, [])) is not None]
            top_sampler = _resolve_named(structure.sampler, "sampler", registry, [], DEFAULT_SAMPLER)
            if top_sampler is not None:
                out.append(Segment(tuple(top), top_sampler, texts["after"], None, f"{where}.after"))
                afters.append(None)
        out.append(Segment(tuple([*first, *processors]), sampler, texts["until"], budget, where))
        afters.append(texts["after"] if i > 0 else None)
    for k in range(1, len(out)):
        after = afters[k]
        if after is None:
            continue
        prev = out[k - 1]
        if prev.until is not None and prev.until != after:
            issues.append(ConfigIssue(f"{out[k].location}.after", f"{short_repr(after)} differs from {prev.location}.until "
                                                                  f"{short_repr(prev.until)}; they are the same boundary, give one"))
        out[k - 1] = Segment(prev.processors, prev.sampler, after, prev.max_tokens, prev.location)
    for seg in out[:-1]:
        if seg.until is None:
            issues.append(ConfigIssue(seg.location, "needs `until` (or the next segment's `after`): every segment but the "
                                                    "last must say which text closes it"))
    return tuple(out)


def _expand_preset(data: Mapping[str, Any], issues: list[ConfigIssue]) -> Mapping[str, Any]:
    """``preset: NAME`` at the top level: the preset's mapping merged under the document's own
    keys (see :mod:`samplerkit.presets`). An unknown name is collected with the other problems."""
    if "preset" not in data:
        return data
    name = data["preset"]
    if not isinstance(name, str) or name not in list_presets():
        issues.append(ConfigIssue("preset", unknown_preset_message(name)))
        return {k: v for k, v in data.items() if k != "preset"}
    return apply_preset(data)


def _resolve_pipeline_entry(index: int, entry: Any, registry: Registry, issues: list[ConfigIssue],
                            prefix: str = "") -> StepSpec | None:
    where = f"{prefix}pipeline[{index}]"
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        issues.append(ConfigIssue(where, "each pipeline entry is a mapping with exactly one step name, "
                                         f"like `- top_p: {{top_p: 0.9}}`; got {short_repr(entry)}"))
        return None
    (name, params), = entry.items()
    if not isinstance(name, str):
        issues.append(ConfigIssue(where, f"a step name is a string, like `- top_p: 0.9`; got {short_repr(name)}"))
        return None
    if registry.has("sampler", name) and not registry.has("processor", name):
        issues.append(ConfigIssue(where, f"{short_repr(name)} is a sampler; a pipeline has exactly one sampler, "
                                         f"set it in the `sampler:` section (sampler: {{name: {name}}})"))
        return None
    if not registry.has("processor", name):
        issues.append(ConfigIssue(where, registry.unknown_message("processor", name)))
        return None
    return _validate_step(registry, "processor", name, params, f"{where} {name}", issues)


def _resolve_named(section: Any, kind: Kind, registry: Registry, issues: list[ConfigIssue], default: str,
                   prefix: str = "") -> StepSpec | None:
    if not isinstance(section, (str, dict)) and prefix:
        issues.append(ConfigIssue(f"{prefix}{kind}", f"must be a {kind} name or a mapping with `name`, got {short_repr(section)}"))
        return None
    if isinstance(section, str):
        section = {"name": section}
    section = dict(section or {})
    name = section.pop("name", default)
    if not isinstance(name, str):
        issues.append(ConfigIssue(f"{prefix}{kind}.name", f"must be the name of a {kind} (a string), got {short_repr(name)}. "
                                                  f"Available {kind}s: {', '.join(registry.names(kind))}"))
        return None
    if kind == "sampler" and registry.has("processor", name) and not registry.has("sampler", name):
        issues.append(ConfigIssue(f"{prefix}{kind}.name", f"{short_repr(name)} is a processor; put it in `pipeline:`. "
                                                  f"Samplers: {', '.join(registry.names('sampler'))}"))
        return None
    if not registry.has(kind, name):
        issues.append(ConfigIssue(f"{prefix}{kind}.name", registry.unknown_message(kind, name)))
        return None
    return _validate_step(registry, kind, name, section, f"{prefix}{kind} {name}", issues, shorthand=False)


def _validate_step(registry: Registry, kind: Kind, name: str, params: Any, where: str,
                   issues: list[ConfigIssue], shorthand: bool = True) -> StepSpec | None:
    entry = registry.entry(kind, name)
    cls = entry.cls
    if params is None:
        params = {}
    if shorthand and not isinstance(params, dict):
        if name in cls.Params.model_fields:
            params = {name: params}          # `- top_p: 0.9`
        else:
            issues.append(ConfigIssue(where, f"parameters must be a mapping of {_field_list(cls)}, got {short_repr(params)}"))
            return None
    if not isinstance(params, dict):
        issues.append(ConfigIssue(where, f"parameters must be a mapping, got {short_repr(params)}"))
        return None
    try:
        validated = cls.Params.model_validate(params, context={CONFIG_DIR: _config_dir.get()})
    except ValidationError as exc:
        issues.extend(issues_from_validation(exc, where, cls))
        return None
    return StepSpec(cls, validated, where, entry.plugin.describe())


# -- messages ---------------------------------------------------------------------------

def _field_list(cls: type) -> str:
    fields = list(cls.Params.model_fields)
    return ", ".join(fields) if fields else "(no parameters)"


def _issue_for_section(err: Mapping[str, Any]) -> ConfigIssue:
    err = with_item_path(err)
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden" and len(loc) == 1:
        known = [*_Structure.model_fields, "preset"]
        return ConfigIssue(clip(loc[0]), f"unknown section{did_you_mean(loc[0], known)} Sections: {', '.join(known)}")
    if loc[:3] == ["generation", "logprobs", "LogprobTaps"]:      # the mapping form's own fields
        loc = ["generation", "logprobs", *loc[3:]]
        section, field_at = LogprobTaps, 2
    else:
        loc = loc[:2] + [p for p in loc[2:] if p != "int"] if loc[:2] == ["generation", "logprobs"] else loc
        section, field_at = {"generation": GenerationConfig, "plugins": PluginsConfig}.get(loc[0] if loc else ""), 1
    location = clip(".".join(p for p in loc if not re.fullmatch(r"str|dict\[.*\]", p)), 160)
    known = list(section.model_fields) if section else []
    field = section.model_fields.get(loc[field_at]) if section and len(loc) > field_at else None
    return ConfigIssue(location, message_for(err, field, known))


# -- overrides (--set) ------------------------------------------------------------------

_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def command_line_data(config_file: str | None, overrides: Sequence[str] = (),
                      preset: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(document, data)`` as the command line reads a config: ``document`` is the YAML file as
    written (plus ``preset: NAME`` for ``--preset``); ``data`` expands a known preset first (so
    ``--set pipeline[1].top_p=0.5`` edits its pipeline; an unknown name stays for
    :func:`resolve` to report with every other problem), then applies each ``--set`` in order."""
    document = read_yaml(config_file) if config_file else {}
    if preset is not None:
        document = {**document, PRESET_KEY: preset}
    data = apply_preset(document) if document.get(PRESET_KEY) in list_presets() else dict(document)
    for assignment in overrides:
        data = apply_override(data, assignment)
    return document, data


def resolve_unblocked(data: Mapping[str, Any], source: str | None = None,
                      extra_block: Sequence[str] = ()) -> tuple[RunConfig, Registry]:
    """:func:`resolve` in a registry without the plugins ``data`` blocks (``plugins: {block:
    [...]}``, a malformed list left for :func:`resolve` to report) and ``extra_block``."""
    plugins = data.get("plugins") if isinstance(data.get("plugins"), dict) else {}
    block = plugins.get("block", []) if isinstance(plugins.get("block", []), list) else []
    registry = default_registry([*block, *extra_block])
    return resolve(data, registry, source), registry


def validate_generation(base: GenerationConfig, overrides: Mapping[str, Any]) -> GenerationConfig:
    """``base`` with some options replaced; errors are a located :class:`ConfigError`."""
    if (problem := lone_surrogate_in(dict(overrides), "generation")) is not None:
        raise ConfigError(problem)
    try:
        return GenerationConfig.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        issues = [_issue_for_section({**err, "loc": ("generation", *err["loc"])}) for err in exc.errors()]
        raise ConfigError(issues) from None


def apply_override(data: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply ``key.path=value`` (the CLI's ``--set``); the value is parsed as YAML.

    ``sampler.seed=3``, ``generation.stop=["\\n"]``, ``pipeline[1].top_p=0.5`` (shorthand for
    ``pipeline[1].top_p.top_p``). Returns a new mapping; errors are :class:`ConfigError`.
    """
    import copy

    if "=" not in assignment:
        raise ConfigError(ConfigIssue(f"--set {assignment}", "expected KEY=VALUE, e.g. --set sampler.seed=3"))
    key, raw = assignment.split("=", 1)
    tokens = [m.group(1) if m.group(1) is not None else int(m.group(2)) for m in _PATH_TOKEN.finditer(key.strip())]
    if not tokens or "".join(str(t) for t in tokens).replace("_", "") == "":
        raise ConfigError(ConfigIssue(f"--set {assignment}", "empty key"))
    if len(tokens) > MAX_CONFIG_DEPTH:
        raise ConfigError(ConfigIssue(f"--set {clip(key)}", f"the key path is more than {MAX_CONFIG_DEPTH} levels deep"))
    value = parse_set_value(raw, key)
    out = copy.deepcopy(data)
    if tokens[0] == "pipeline" and "pipeline" not in out:
        out["pipeline"] = [dict(step) for step in DEFAULT_PIPELINE]
    node: Any = out
    for depth, tok in enumerate(tokens):
        is_last = depth == len(tokens) - 1
        if isinstance(tok, int):
            if not isinstance(node, list) or not -len(node) <= tok < len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ConfigError(ConfigIssue(f"--set {key}", f"index [{tok}] is out of range (the list has {size} entries)"))
            if is_last:
                node[tok] = value
            else:
                node = node[tok]
            continue
        if not isinstance(node, dict):
            raise ConfigError(ConfigIssue(f"--set {key}", f"{short_repr(tok)} is not inside a mapping"))
        if is_last:
            node[tok] = value
            break
        child = node.get(tok)
        if child is None or (not isinstance(child, (dict, list))):
            # Expand shorthands so the path can go deeper: `sampler: greedy` ->
            # {name: greedy}; `- top_p: 0.9` -> {top_p: 0.9}.
            in_pipeline_step = depth == 2 and tokens[0] == "pipeline" and isinstance(tokens[1], int)
            if tok in ("backend", "sampler") and depth == 0 and isinstance(child, str):
                child = {"name": child}
            elif child is not None and in_pipeline_step:
                child = {tok: child}
            elif child is not None:
                path = key[:key.index(str(tok)) + len(str(tok))]
                raise ConfigError(ConfigIssue(f"--set {key}", f"{path} is a value ({short_repr(child)}), not a mapping to set keys in"))
            else:
                child = [] if isinstance(tokens[depth + 1], int) else {}
            node[tok] = child
        node = child
    return out


# StepSpec and the YAML reader live below the registry (samplerkit.spec, samplerkit.yaml_io) so
# that steps and presets need not import this module; they are re-exported here for callers.
__all__ = [
    "DEFAULT_BACKEND", "DEFAULT_PIPELINE", "DEFAULT_SAMPLER", "MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "MAX_CONFIG_NODES",
    "MAX_PIPELINE_STEPS", "STAGE_INPUT", "STAGE_PROCESSED", "GenerationConfig", "InvalidPolicy", "LogprobTaps",
    "PluginsConfig", "RunConfig", "StepSpec", "apply_override", "check_bounds", "check_stages", "command_line_data",
    "parse_yaml", "read_yaml", "resolve", "resolve_unblocked", "stage_names", "validate_generation",
]
