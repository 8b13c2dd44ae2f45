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

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from samplerkit.errors import ConfigError, ConfigIssue
from samplerkit.params import StepParams
from samplerkit.registry import Kind, Registry

#: What a pipeline does with a row whose logits are unusable (NaN, +inf, nothing left):
#: ``raise`` an error naming the row and stage; ``mark_invalid`` (the row ends with finish
#: reason ``invalid``); ``fallback_greedy`` (argmax over the row's finite input logits).
InvalidPolicy = Literal["raise", "mark_invalid", "fallback_greedy"]

DEFAULT_BACKEND = "llama"
DEFAULT_SAMPLER = "categorical"
# The seed's defaults (meta-llama/llama generate): temperature 0.6, then top_p 0.9.
DEFAULT_PIPELINE: list[dict[str, Any]] = [{"temperature": {"temperature": 0.6}}, {"top_p": {"top_p": 0.9}}]


class GenerationConfig(BaseModel):
    """Options of the decode loop (not of any step)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    max_new_tokens: int = Field(128, ge=0, description="most tokens generated per row")
    stop: list[str] = Field(default_factory=list, description="stop strings, matched across token boundaries; not included in the text")
    stop_token_ids: list[int] = Field(default_factory=list, description="extra token ids that end a row, besides the model's EOS")
    ignore_eos: bool = Field(False, description="keep generating past EOS")
    n: int = Field(1, ge=1, le=1024, description="samples per prompt")
    logprobs: int | None = Field(None, ge=0, le=100, description="return the chosen token's log-probability and this many top alternatives; null for none")
    top_logprobs_from: Literal["raw", "processed"] = Field(
        "raw", description="where the logprobs top alternatives come from: the raw model distribution or the one the token was drawn from")
    echo: bool = Field(False, description="also return the prompt tokens with their log-probabilities")
    chat: bool = Field(False, description="wrap each prompt in the model's chat template")


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


@dataclass(frozen=True)
class StepSpec:
    """A step class with validated parameters, and where it came from (for messages)."""

    cls: type
    params: StepParams
    location: str = ""
    plugin: str = ""

    @property
    def name(self) -> str:
        return self.cls.name

    def with_params(self, overrides: Mapping[str, Any], location: str) -> StepSpec:
        """This step with some parameters replaced (validated; errors name ``location``)."""
        if not overrides:
            return self
        data = {**self.params.model_dump(), **overrides}
        try:
            params = self.cls.Params.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_issues_from_pydantic(exc, location, self.cls)) from None
        return StepSpec(self.cls, params, self.location, self.plugin)


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


# -- loading ----------------------------------------------------------------------------

def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; syntax errors report line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_yaml(text, source=str(path))


def parse_yaml(text: str, source: str = "<string>") -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(ConfigIssue(where, f"YAML syntax error: {exc.problem or exc}"), source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping (backend, pipeline, sampler, ...), got {type(data).__name__}", source)
    return data


def resolve(data: Mapping[str, Any], registry: Registry, source: str | None = None) -> RunConfig:
    """Validate a config mapping in two phases and resolve every name in ``registry``."""
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
    for index, entry in enumerate(structure.pipeline):
        spec = _resolve_pipeline_entry(index, entry, registry, issues)
        if spec is not None:
            processors.append(spec)
    sampler = _resolve_named(structure.sampler, "sampler", registry, issues, DEFAULT_SAMPLER)
    if issues:
        raise ConfigError(issues, source)
    return RunConfig(backend, tuple(processors), sampler, structure.generation, structure.plugins, dict(data),
                     structure.on_invalid)


def _expand_preset(data: Mapping[str, Any], issues: list[ConfigIssue]) -> Mapping[str, Any]:
    """``preset: NAME`` at the top level: the preset's mapping merged under the document's own
    keys (see :mod:`samplerkit.presets`). An unknown name is collected with the other problems."""
    if "preset" not in data:
        return data
    from samplerkit.presets import apply_preset, list_presets, unknown_preset_message

    name = data["preset"]
    if not isinstance(name, str) or name not in list_presets():
        issues.append(ConfigIssue("preset", unknown_preset_message(name)))
        return {k: v for k, v in data.items() if k != "preset"}
    return apply_preset(data)


def _resolve_pipeline_entry(index: int, entry: Any, registry: Registry, issues: list[ConfigIssue]) -> StepSpec | None:
    where = f"pipeline[{index}]"
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        issues.append(ConfigIssue(where, "each pipeline entry is a mapping with exactly one step name, "
                                         f"like `- top_p: {{top_p: 0.9}}`; got {entry!r}"))
        return None
    (name, params), = entry.items()
    if registry.has("sampler", name) and not registry.has("processor", name):
        issues.append(ConfigIssue(where, f"{name!r} is a sampler; a pipeline has exactly one sampler, "
                                         f"set it in the `sampler:` section (sampler: {{name: {name}}})"))
        return None
    if not registry.has("processor", name):
        issues.append(ConfigIssue(where, registry.unknown_message("processor", name)))
        return None
    return _validate_step(registry, "processor", name, params, f"{where} {name}", issues)


def _resolve_named(section: Any, kind: Kind, registry: Registry, issues: list[ConfigIssue], default: str) -> StepSpec | None:
    if isinstance(section, str):
        section = {"name": section}
    section = dict(section or {})
    name = section.pop("name", default)
    if kind == "sampler" and registry.has("processor", name) and not registry.has("sampler", name):
        issues.append(ConfigIssue(f"{kind}.name", f"{name!r} is a processor; put it in `pipeline:`. "
                                                  f"Samplers: {', '.join(registry.names('sampler'))}"))
        return None
    if not registry.has(kind, name):
        issues.append(ConfigIssue(f"{kind}.name", registry.unknown_message(kind, name)))
        return None
    return _validate_step(registry, kind, name, section, f"{kind} {name}", issues, shorthand=False)


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
            issues.append(ConfigIssue(where, f"parameters must be a mapping of {_field_list(cls)}, got {params!r}"))
            return None
    if not isinstance(params, dict):
        issues.append(ConfigIssue(where, f"parameters must be a mapping, got {params!r}"))
        return None
    try:
        validated = cls.Params.model_validate(params)
    except ValidationError as exc:
        issues.extend(_issues_from_pydantic(exc, where, cls))
        return None
    return StepSpec(cls, validated, where, entry.plugin.describe())


# -- messages ---------------------------------------------------------------------------

def _field_list(cls: type) -> str:
    fields = list(cls.Params.model_fields)
    return ", ".join(fields) if fields else "(no parameters)"


def _issues_from_pydantic(exc: ValidationError, where: str, cls: type) -> list[ConfigIssue]:
    """Turn pydantic errors into ``<where>.<field>: must be in (0, 1], got 1.5``."""
    issues = []
    step_name = where.rsplit(" ", 1)[-1]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else ""
        suffix = "" if not field or field == step_name else "." + ".".join(loc)
        location = where + suffix
        issues.append(ConfigIssue(location, _message(err, cls.Params.model_fields.get(field), list(cls.Params.model_fields))))
    return issues


def _message(err: Mapping[str, Any], field: Any, known: list[str]) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        import difflib
        name = str(err["loc"][-1])
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        return f"unknown parameter {name!r}{hint} Parameters: {', '.join(known) or '(none)'}"
    if kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value)):
        return f"must be a finite number, got {value!r}"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"} and field is not None:
        return f"must be {_range_text(field)}, got {value!r}"
    if kind == "missing":
        return "is required"
    text = f"{err['msg'][0].lower()}{err['msg'][1:]}"
    return f"{text} ({value!r})" if "got" in text else f"{text}, got {value!r}"


def _range_text(field: Any) -> str:
    lo = hi = None
    lo_open = hi_open = False
    for meta in getattr(field, "metadata", []):
        for attr, is_lo, is_open in (("gt", True, True), ("ge", True, False), ("lt", False, True), ("le", False, False)):
            v = getattr(meta, attr, None)
            if v is not None:
                if is_lo:
                    lo, lo_open = v, is_open
                else:
                    hi, hi_open = v, is_open
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return "in range"


def _num(value: float | int) -> str:
    """``1.0`` -> ``1``, ``0.5`` -> ``0.5``, ``2**63`` -> ``2**63``."""
    if isinstance(value, int):
        return "2**63" if value == 2**63 else str(value)
    return f"{value:g}"


def _issue_for_section(err: Mapping[str, Any]) -> ConfigIssue:
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden" and len(loc) == 1:
        import difflib
        known = [*_Structure.model_fields, "preset"]
        close = difflib.get_close_matches(loc[0], known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        return ConfigIssue(loc[0], f"unknown section{hint} Sections: {', '.join(known)}")
    location = ".".join(p for p in loc if not re.fullmatch(r"str|dict\[.*\]", p))
    section = {"generation": GenerationConfig, "plugins": PluginsConfig}.get(loc[0] if loc else "")
    known = list(section.model_fields) if section else []
    field = section.model_fields.get(loc[1]) if section and len(loc) >= 2 else None
    return ConfigIssue(location, _message(err, field, known))


# -- overrides (--set) ------------------------------------------------------------------

_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def validate_generation(base: GenerationConfig, overrides: Mapping[str, Any]) -> GenerationConfig:
    """``base`` with some options replaced; errors are a located :class:`ConfigError`."""
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
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
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
            raise ConfigError(ConfigIssue(f"--set {key}", f"{tok!r} is not inside a mapping"))
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
                raise ConfigError(ConfigIssue(f"--set {key}", f"{path} is a value ({child!r}), not a mapping to set keys in"))
            else:
                child = [] if isinstance(tokens[depth + 1], int) else {}
            node[tok] = child
        node = child
    return out
