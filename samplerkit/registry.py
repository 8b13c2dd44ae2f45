"""An immutable snapshot of what the plugins registered: name -> class, with provenance.

Built from a plugin manager (:func:`build_registry`); tests build their own. Lookups of
unknown names fail with a did-you-mean suggestion and the list of what is available.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from samplerkit.errors import PluginError, UnknownNameError
from samplerkit.params import StepParams
from samplerkit.plugins import LoadedPlugins, PluginInfo, make_plugin_manager

Kind = Literal["processor", "sampler", "backend"]
KINDS: tuple[Kind, ...] = ("processor", "sampler", "backend")
_HOOK_FOR_KIND = {"processor": "register_processors", "sampler": "register_samplers",
                  "backend": "register_backends"}
_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Entry:
    """One registered class and the plugin that supplied it."""

    kind: Kind
    name: str
    cls: type
    plugin: PluginInfo


class Registry:
    """Processors, samplers and backends by name. Immutable once built."""

    def __init__(self, entries: Iterable[Entry], failed: Mapping[str, str] | None = None,
                 blocked: Iterable[str] = ()):
        table: dict[Kind, dict[str, Entry]] = {k: {} for k in KINDS}
        for entry in entries:
            existing = table[entry.kind].get(entry.name)
            if existing is not None:
                raise PluginError(
                    f"two plugins register a {entry.kind} named {entry.name!r}: "
                    f"{existing.plugin.describe()} and {entry.plugin.describe()}. "
                    f"Uninstall or block one of them (plugins: {{block: [name]}} in the config, "
                    f"or SAMPLERKIT_BLOCK_PLUGINS=name).")
            table[entry.kind][entry.name] = entry
        self._table = {k: MappingProxyType(dict(sorted(v.items()))) for k, v in table.items()}
        self.failed: Mapping[str, str] = MappingProxyType(dict(failed or {}))
        self.blocked = frozenset(blocked)

    def names(self, kind: Kind) -> list[str]:
        return list(self._table[kind])

    def entries(self, kind: Kind) -> list[Entry]:
        return list(self._table[kind].values())

    def has(self, kind: Kind, name: str) -> bool:
        return name in self._table[kind]

    def entry(self, kind: Kind, name: str) -> Entry:
        try:
            return self._table[kind][name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(kind, name)) from None

    def get(self, kind: Kind, name: str) -> type:
        return self.entry(kind, name).cls

    def unknown_message(self, kind: Kind, name: str) -> str:
        """``unknown processor 'top_q'; did you mean 'top_p'? Available: ...``"""
        available = self.names(kind)
        close = difflib.get_close_matches(str(name), available, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        listing = ", ".join(available) if available else "(none registered)"
        text = f"unknown {kind} {name!r}{hint} Available {kind}s: {listing}"
        if self.failed:
            text += ". Plugins that failed to load: " + ", ".join(sorted(self.failed))
        return text


def build_registry(plugins: LoadedPlugins) -> Registry:
    """Call every plugin's registration hooks and snapshot the result."""
    from samplerkit.backend import Backend
    from samplerkit.steps import Processor, Sampler

    base_for_kind = {"processor": Processor, "sampler": Sampler, "backend": Backend}
    entries: list[Entry] = []
    hook_caller = plugins.manager.hook
    for kind in KINDS:
        for impl in getattr(hook_caller, _HOOK_FOR_KIND[kind]).get_hookimpls():
            info = plugins.info.get(impl.plugin_name, PluginInfo(impl.plugin_name))
            try:
                classes = impl.function() or []
            except Exception as exc:
                raise PluginError(f"plugin {info.describe()} raised in {_HOOK_FOR_KIND[kind]}(): "
                                  f"{type(exc).__name__}: {exc}") from exc
            for cls in classes:
                _check_class(cls, kind, base_for_kind[kind], info)
                entries.append(Entry(kind, cls.name, cls, info))
    return Registry(entries, plugins.failed, plugins.blocked)


def _check_class(cls: object, kind: Kind, base: type, info: PluginInfo) -> None:
    where = f"plugin {info.describe()}, {_HOOK_FOR_KIND[kind]}()"
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{where} returned {cls!r}, which is not a subclass of "
                          f"samplerkit.{base.__name__}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _SNAKE.match(name):
        raise PluginError(f"{where}: class {cls.__qualname__} needs a snake_case class attribute "
                          f"`name` (got {name!r})")
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, StepParams)):
        raise PluginError(f"{where}: {cls.__qualname__}.Params must be a subclass of samplerkit.StepParams "
                          f"(got {params!r}), which forbids unknown keys and makes the defaults the neutral values")


def default_registry(block: Iterable[str] = ()) -> Registry:
    """The registry of built-ins plus installed entry-point plugins, minus ``block``."""
    return build_registry(make_plugin_manager(block=block))
