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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from samplerkit.errors import ConfigError, ConfigIssue, clip, did_you_mean, short_repr
from samplerkit.params import StepParams
from samplerkit.registry import Kind, Registry
from samplerkit.strict import check_strict

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
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="extra token ids that end a row, besides the model's EOS")
    ignore_eos: bool = Field(False, description="keep generating past EOS")
    n: int = Field(1, ge=1, le=1024, description="samples per prompt")
    logprobs: int | None = Field(None, ge=0, le=100, description="return the chosen token's log-probability and this many top alternatives; null for none")
    top_logprobs_from: Literal["raw", "processed"] = Field(
        "raw", description="where the logprobs top alternatives come from: the raw model distribution or the one the token was drawn from")
    echo: bool = Field(False, description="also return the prompt tokens with their log-probabilities")
    chat: bool = Field(False, description="wrap each prompt in the model's chat template")

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # The same strict numbers and booleans as every step's Params (samplerkit.strict).
        return check_strict(value, cls.model_fields[info.field_name].annotation)


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

#: Largest config accepted, in bytes (characters for a string): a real run file is a few
#: hundred bytes; a ``logit_bias`` over a 50,000-token vocabulary is under 1 MB.
MAX_CONFIG_BYTES = 2 * 1024 * 1024
#: Most values (mappings, lists and scalars) a config may hold once its aliases are expanded:
#: an alias names a node instead of copying it, so 400 bytes can stand for 10**9 values.
MAX_CONFIG_NODES = 250_000
#: Deepest nesting of mappings and lists (a real config nests 6 deep at most).
MAX_CONFIG_DEPTH = 64
#: Most steps in ``pipeline:`` (each is resolved and validated on its own; real ones have < 20).
MAX_PIPELINE_STEPS = 1000

# libyaml's C parser when PyYAML was built with it (50 times faster than the pure-Python one
# on a large file); the pure-Python one otherwise. Both produce the same Python objects.
_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LimitExceeded(Exception):
    """A bound of the config loader was hit; ``mark`` is where (a PyYAML Mark)."""

    def __init__(self, message: str, mark: Any = None):
        super().__init__(message)
        self.message, self.mark = message, mark


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """A safe loader that refuses duplicate keys, naming both lines."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            # Merge keys (`<<: *defaults`) override on purpose; other complex keys are
            # unhashable and PyYAML reports them itself.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            first = seen.setdefault(key, key_node)
            if first is not key_node:
                raise _LimitExceeded(
                    f"duplicate key {short_repr(key)} (first on line {first.start_mark.line + 1}, again on line "
                    f"{key_node.start_mark.line + 1}); YAML keeps only the last one, so remove one of them",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def _check_events(text: str) -> None:
    """Refuse a document that nests deeper than :data:`MAX_CONFIG_DEPTH` or expands to more than
    :data:`MAX_CONFIG_NODES` values, from its parse events, before any node is built.

    The expanded size counts each alias as the size of the node it names (a subtree's size is
    the count between its start and end events), so an alias bomb is refused after reading
    its few hundred bytes, not after building 10**9 objects. The check runs on events because
    libyaml's composer recurses in C without a limit (100,000 nested ``[`` crash the process).
    """
    loader = _BaseLoader(text)
    try:
        count = 0
        open_nodes: list[tuple[int, str | None, int]] = []   # (count at start, anchor, depth reached)
        sizes: dict[str, tuple[int, int]] = {}               # anchor -> (expanded size, height)
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.ScalarEvent):
                count += 1
                if event.anchor:
                    sizes[event.anchor] = (1, 0)
            elif isinstance(event, yaml.CollectionStartEvent):
                count += 1
                if len(open_nodes) >= MAX_CONFIG_DEPTH:
                    raise _LimitExceeded(f"nested more than {MAX_CONFIG_DEPTH} levels deep", event.start_mark)
                open_nodes.append((count, event.anchor, len(open_nodes) + 1))
            elif isinstance(event, yaml.CollectionEndEvent):
                start, anchor, reached = open_nodes.pop()
                if open_nodes:
                    parent = open_nodes[-1]
                    open_nodes[-1] = (parent[0], parent[1], max(parent[2], reached))
                if anchor:
                    sizes[anchor] = (count - start + 1, reached - len(open_nodes))
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor not in sizes:
                    if any(anchor == event.anchor for _, anchor, _ in open_nodes):
                        raise _LimitExceeded(f"alias *{event.anchor} refers to a node that contains it "
                                             "(a cycle)", event.start_mark)
                    continue                    # undefined: the composer reports it
                size, height = sizes[event.anchor]
                count += size
                depth = len(open_nodes) + height
                if depth > MAX_CONFIG_DEPTH:
                    raise _LimitExceeded(f"alias *{event.anchor} makes the document nest more than "
                                         f"{MAX_CONFIG_DEPTH} levels deep", event.start_mark)
                if open_nodes:
                    parent = open_nodes[-1]
                    open_nodes[-1] = (parent[0], parent[1], max(parent[2], depth))
            if count > MAX_CONFIG_NODES:
                raise _LimitExceeded(f"the document holds more than {MAX_CONFIG_NODES:,} values once its aliases "
                                     "are expanded (an alias bomb, or a config far larger than any run needs)",
                                     event.start_mark)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a UTF-8 file of at most :data:`MAX_CONFIG_BYTES`; errors report
    line and column."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)   # bounded: a FIFO or /dev/zero is not read forever
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the file is larger than {MAX_CONFIG_BYTES:,} bytes, far more than any run config "
                          "needs; is it the right file?", str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:64]
        hint = " (it looks like UTF-16)" if utf16 else ""
        raise ConfigError(ConfigIssue(f"line {line}, column {column}",
                                      f"the file is not UTF-8 text{hint}: byte 0x{raw[exc.start]:02x} cannot be "
                                      "decoded; save it as UTF-8"), str(path)) from None
    return parse_yaml(text, source=str(path))


def parse_yaml(text: str, source: str = "<string>") -> dict[str, Any]:
    """Parse a YAML mapping within the loader's bounds (:data:`MAX_CONFIG_BYTES`,
    :data:`MAX_CONFIG_NODES`, :data:`MAX_CONFIG_DEPTH`); duplicate keys are an error."""
    data = _load_bounded(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping (backend, pipeline, sampler, ...), got {type(data).__name__}", source)
    return data


def _load_bounded(text: str, source: str) -> Any:
    """One YAML document within the loader's bounds, as Python objects; errors are located."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the config is longer than {MAX_CONFIG_BYTES:,} characters, far more than any run "
                          "config needs", source)
    loader = None
    try:
        _check_events(text)
        loader = _Loader(text)
        return loader.get_single_data()
    except _LimitExceeded as exc:
        raise ConfigError(ConfigIssue(_where(exc.mark), exc.message), source) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(ConfigIssue(_where(mark), f"YAML syntax error: {exc.problem or exc}"), source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", source) from None
    finally:
        if loader is not None:
            loader.dispose()


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"


def check_bounds(data: Any, source: str | None = None) -> None:
    """Refuse a config object (a dict from Python, ``--set`` or YAML) that nests deeper than
    :data:`MAX_CONFIG_DEPTH` or holds more than :data:`MAX_CONFIG_NODES` values, counting a
    container shared in several places once per place (as validation would visit it).

    The walk recurses at most :data:`MAX_CONFIG_DEPTH` levels and memoizes each container's
    (size, height) by identity, so it is linear in the distinct objects: a shared-list bomb
    or a self-containing list is refused without being expanded.
    """
    memo: dict[int, tuple[int, int]] = {}
    path: list[str] = []

    def walk(value: Any, depth: int) -> tuple[int, int]:
        if not isinstance(value, (dict, list, tuple)):
            return 1, 0
        known = memo.get(id(value))
        if known is None:
            if depth >= MAX_CONFIG_DEPTH:
                raise ConfigError(ConfigIssue(_path_text(path), f"nested more than {MAX_CONFIG_DEPTH} levels deep"),
                                  source)
            size, height = 1, 0
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, child in items:
                path.append(f".{key}" if isinstance(value, dict) else f"[{key}]")
                child_size, child_height = walk(child, depth + 1)
                path.pop()
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_CONFIG_NODES:
                    raise ConfigError(ConfigIssue(_path_text(path), f"holds more than {MAX_CONFIG_NODES:,} values "
                                                                    "(counting each shared list or mapping once per "
                                                                    "place it is used)"), source)
            known = memo[id(value)] = (size, height)
        if depth + known[1] > MAX_CONFIG_DEPTH:
            raise ConfigError(ConfigIssue(_path_text(path), f"nested more than {MAX_CONFIG_DEPTH} levels deep"), source)
        return known

    walk(data, 0)


def _path_text(path: list[str]) -> str:
    return clip("".join(path).lstrip("."), 120) or "the top level"


def resolve(data: Mapping[str, Any], registry: Registry, source: str | None = None) -> RunConfig:
    """Validate a config mapping in two phases and resolve every name in ``registry``."""
    check_bounds(data, source)
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


def _resolve_named(section: Any, kind: Kind, registry: Registry, issues: list[ConfigIssue], default: str) -> StepSpec | None:
    if isinstance(section, str):
        section = {"name": section}
    section = dict(section or {})
    name = section.pop("name", default)
    if not isinstance(name, str):
        issues.append(ConfigIssue(f"{kind}.name", f"must be the name of a {kind} (a string), got {short_repr(name)}. "
                                                  f"Available {kind}s: {', '.join(registry.names(kind))}"))
        return None
    if kind == "sampler" and registry.has("processor", name) and not registry.has("sampler", name):
        issues.append(ConfigIssue(f"{kind}.name", f"{short_repr(name)} is a processor; put it in `pipeline:`. "
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
            issues.append(ConfigIssue(where, f"parameters must be a mapping of {_field_list(cls)}, got {short_repr(params)}"))
            return None
    if not isinstance(params, dict):
        issues.append(ConfigIssue(where, f"parameters must be a mapping, got {short_repr(params)}"))
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
    for err in map(_with_item_path, exc.errors()):
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else ""
        # `pipeline[0] top_p: ...` for the field named like the step; its items keep their path.
        shown = loc[1:] if field == step_name else loc
        suffix = "." + ".".join(shown) if shown else ""
        location = clip(where + suffix, 160)
        issues.append(ConfigIssue(location, _message(err, cls.Params.model_fields.get(field), list(cls.Params.model_fields))))
    return issues


def _message(err: Mapping[str, Any], field: Any, known: list[str]) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        return f"unknown parameter {short_repr(name)}{did_you_mean(name, known)} Parameters: {', '.join(known) or '(none)'}"
    if kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value)):
        return f"must be a finite number, got {short_repr(value)}"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        bound = _range_text(field) if field is not None else "in range"
        if bound == "in range":             # a constraint on a list item: pydantic names the bound
            symbol = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
            limit = next(iter((err.get("ctx") or {}).values()), None)
            bound = f"{symbol} {_num(limit)}" if isinstance(limit, (int, float)) else bound
        return f"must be {bound}, got {short_repr(value)}"
    if kind == "missing":
        return "is required"
    msg = err["msg"].removeprefix("Value error, ")
    text = f"{msg[0].lower()}{msg[1:]}"
    return f"{text} ({short_repr(value)})" if "got" in text else f"{text}, got {short_repr(value)}"


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


def _with_item_path(err: Mapping[str, Any]) -> Mapping[str, Any]:
    """A strict-type error (:mod:`samplerkit.strict`) located at the list item or mapping key
    inside its field, with that item as the value, as pydantic locates its own item errors."""
    ctx = err.get("ctx") or {}
    if "path" not in ctx:
        return err
    return {**err, "loc": (*err["loc"], *ctx["path"]), "input": ctx["value"]}


def _issue_for_section(err: Mapping[str, Any]) -> ConfigIssue:
    err = _with_item_path(err)
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden" and len(loc) == 1:
        known = [*_Structure.model_fields, "preset"]
        return ConfigIssue(clip(loc[0]), f"unknown section{did_you_mean(loc[0], known)} Sections: {', '.join(known)}")
    location = clip(".".join(p for p in loc if not re.fullmatch(r"str|dict\[.*\]", p)), 160)
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


def _parse_set_value(raw: str, key: str) -> Any:
    """A ``--set`` value parsed as YAML within the loader's bounds; text that is not valid
    YAML stays a plain string (``--set generation.stop=[`` sets the stop string ``[``)."""
    if not raw.strip():
        return ""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(ConfigIssue(f"--set {clip(key)}", f"the value is longer than {MAX_CONFIG_BYTES:,} characters"))
    loader = None
    try:
        _check_events(raw)
        loader = _Loader(raw)
        return loader.get_single_data()
    except _LimitExceeded as exc:
        raise ConfigError(ConfigIssue(f"--set {clip(key)}", exc.message)) from None
    except yaml.YAMLError:
        return raw
    finally:
        if loader is not None:
            loader.dispose()


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
    value = _parse_set_value(raw, key)
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
