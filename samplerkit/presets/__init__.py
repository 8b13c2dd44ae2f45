"""Presets: named pipelines shipped as YAML files in ``samplerkit/presets/``.

A preset is a partial run config (``pipeline`` and ``sampler``, plus a ``description``). Use one
from YAML with a top-level ``preset: NAME`` (the document's own sections override the preset's),
from the command line with ``samplerkit generate --preset NAME``, or in Python::

    config = samplerkit.presets.apply_preset({"preset": "llama_cpp", "sampler": {"seed": 1}})
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib import resources
from typing import Any

from samplerkit.errors import ConfigError, ConfigIssue, did_you_mean, short_repr
from samplerkit.yaml_io import parse_yaml

#: The config key that names a preset.
PRESET_KEY = "preset"


def _files():
    return resources.files(__name__)          # the YAML files live beside this module


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.name[:-5] for p in _files().iterdir() if p.name.endswith(".yaml"))


def unknown_preset_message(name: Any) -> str:
    names = list_presets()
    return f"unknown preset {short_repr(name)}{did_you_mean(name, names)} Presets: {', '.join(names)}"


def load_preset(name: str) -> dict[str, Any]:
    """The preset's config mapping (without its ``description``); :class:`ConfigError` if unknown."""
    if not isinstance(name, str) or name not in list_presets():
        raise ConfigError(ConfigIssue(PRESET_KEY, unknown_preset_message(name)))
    path = _files() / f"{name}.yaml"
    data = parse_yaml(path.read_text(encoding="utf-8"), source=f"preset {name}")
    data.pop("description", None)
    return data


def describe_preset(name: str) -> str:
    """The preset's one-line description."""
    load_preset(name)                                     # the unknown-name error
    return str(parse_yaml((_files() / f"{name}.yaml").read_text(encoding="utf-8")).get("description", ""))


def merge_under(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``. Mappings merge key by key, except that a ``backend`` or
    ``sampler`` naming a different step replaces the preset's (its parameters would not fit);
    lists (``pipeline``) and scalars replace."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        old = out.get(key)
        if key in ("backend", "sampler"):
            old = {"name": old} if isinstance(old, str) else old
            value = {"name": value} if isinstance(value, str) else value
            if isinstance(old, dict) and isinstance(value, dict) and value.get("name", old.get("name")) != old.get("name"):
                old = None
        if isinstance(old, dict) and isinstance(value, Mapping):
            out[key] = merge_under(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_preset(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with its ``preset:`` expanded: the preset's mapping merged under the document's
    own keys, ``preset`` removed. Without a ``preset`` key, a copy of ``data``."""
    data = dict(data)
    if PRESET_KEY not in data:
        return data
    name = data.pop(PRESET_KEY)
    return merge_under(load_preset(name), data)


__all__ = ["PRESET_KEY", "apply_preset", "describe_preset", "list_presets", "load_preset", "merge_under",
           "unknown_preset_message"]
