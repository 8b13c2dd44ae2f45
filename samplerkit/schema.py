"""JSON Schema of the run configuration, registered plugins' parameters included.

Editors (VS Code's YAML extension, for one) validate a config as it is typed when the file
starts with ``# yaml-language-server: $schema=samplerkit.schema.json``.
"""

from __future__ import annotations

from typing import Any, get_args

from samplerkit.config import GenerationConfig, InvalidPolicy, PluginsConfig
from samplerkit.registry import Registry


def _params_schema(cls: type) -> dict[str, Any]:
    schema = cls.Params.model_json_schema()
    schema.pop("title", None)
    schema["additionalProperties"] = False
    return schema


def _named_section(registry: Registry, kind: str) -> dict[str, Any]:
    variants = []
    for entry in registry.entries(kind):  # type: ignore[arg-type]
        params = _params_schema(entry.cls)
        props = {"name": {"const": entry.name}, **params.get("properties", {})}
        variants.append({"type": "object", "properties": props, "required": ["name"],
                         "additionalProperties": False, "description": _first_line(entry.cls.__doc__),
                         **({"$defs": params["$defs"]} if "$defs" in params else {})})
    names = registry.names(kind)  # type: ignore[arg-type]
    return {"anyOf": [{"type": "string", "enum": names}, *variants]}


def _pipeline_items(registry: Registry) -> dict[str, Any]:
    variants = []
    for entry in registry.entries("processor"):
        params = _params_schema(entry.cls)
        value: dict[str, Any] = {"anyOf": [params, {"type": "null"}]}
        if entry.name in entry.cls.Params.model_fields:     # `- top_p: 0.9` shorthand
            value["anyOf"].append(params["properties"][entry.name])
        variants.append({"type": "object", "properties": {entry.name: value}, "required": [entry.name],
                         "additionalProperties": False, "description": _first_line(entry.cls.__doc__)})
    return {"anyOf": [{"type": "string", "enum": registry.names("processor")}, *variants]}


def run_config_schema(registry: Registry) -> dict[str, Any]:
    """The whole config's schema (draft 2020-12)."""
    generation = GenerationConfig.model_json_schema()
    plugins = PluginsConfig.model_json_schema()
    # Nested models' definitions (logprobs' LogprobTaps): their "#/$defs/..." refs resolve at the root.
    defs = {**generation.pop("$defs", {}), **plugins.pop("$defs", {})}
    return {
        **({"$defs": defs} if defs else {}),
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "samplerkit run configuration",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "backend": _named_section(registry, "backend"),
            "pipeline": {"type": "array", "items": _pipeline_items(registry),
                         "description": "processors, applied exactly in this order"},
            "sampler": _named_section(registry, "sampler"),
            "generation": generation,
            "plugins": plugins,
            "on_invalid": {"enum": list(get_args(InvalidPolicy)), "default": "raise",
                           "description": "what to do with rows whose logits are NaN, +inf or empty"},
            "segments": _segments(registry),
            "preset": {"type": "string", "enum": _preset_names(),
                       "description": "start from this shipped preset; the document's own sections override it"},
        },
    }


def _segments(registry: Registry) -> dict[str, Any]:
    """``segments:`` (docs/segments.md): each item's own keys, plus a constraint step (a processor
    that declares ``completes``) as a key."""
    closing = {"type": "string", "minLength": 1}
    props: dict[str, Any] = {
        "pipeline": {"type": "array", "items": _pipeline_items(registry),
                     "description": "the segment's processors (default: the top-level pipeline)"},
        "sampler": _named_section(registry, "sampler"),
        "until": {**closing, "description": "the segment closes once its text contains this string"},
        "after": {**closing, "description": "the previous segment's `until` (on the first: the top level runs until it)"},
        "max_tokens": {"type": "integer", "minimum": 1,
                       "description": "budget: then the closing string is forced (no `until`: the row ends)"},
    }
    for entry in registry.entries("processor"):
        if getattr(entry.cls, "completes", False):
            props[entry.name] = {**_params_schema(entry.cls), "description": _first_line(entry.cls.__doc__)}
    return {"type": "array", "minItems": 1, "description": "pipelines for the parts of one output, in order",
            "items": {"type": "object", "properties": props, "additionalProperties": False}}


def _preset_names() -> list[str]:
    from samplerkit.presets import list_presets

    return list_presets()


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0]
