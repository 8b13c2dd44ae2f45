"""An immutable snapshot of what the plugins registered: name -> class, with provenance.

Built from a plugin manager (:func:`build_registry`); tests build their own. Lookups of
unknown names fail with a did-you-mean suggestion and the list of what is available.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from samplerkit.backend import Backend
from samplerkit.errors import PluginError, UnknownNameError, did_you_mean, short_repr
from samplerkit.params import StepParams
from samplerkit.plugins import HOOK_FOR_KIND, LoadedPlugins, PluginInfo, make_plugin_manager
from samplerkit.steps import Processor, Sampler

Kind = Literal["processor", "sampler", "backend"]
KINDS: tuple[Kind, ...] = ("processor", "sampler", "backend")
_HOOK_FOR_KIND = HOOK_FOR_KIND
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
                 blocked: Iterable[str] = (), blocked_steps: Mapping[tuple[str, str], str] | None = None):
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
        #: (kind, step name) -> the blocked plugin that would have registered it.
        self.blocked_steps: Mapping[tuple[str, str], str] = MappingProxyType(dict(blocked_steps or {}))

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
        blocker = self.blocked_steps.get((kind, name)) if isinstance(name, str) else None
        if blocker is not None:
            return (f"{kind} {name!r} is provided by the plugin {blocker!r}, which is blocked (plugins.block in the "
                    f"config, --block, or SAMPLERKIT_BLOCK_PLUGINS); unblock it to use {name!r}")
        available = self.names(kind)
        listing = ", ".join(available) if available else "(none registered)"
        text = f"unknown {kind} {short_repr(name)}{did_you_mean(name, available)} Available {kind}s: {listing}"
        if self.failed:
            text += ". Plugins that failed to load: " + ", ".join(sorted(self.failed))
        unexplained = sorted(set(self.blocked) - set(self.blocked_steps.values()))
        if unexplained:
            text += ". Blocked plugins (not loaded, so their steps are unknown): " + ", ".join(unexplained)
        return text


def build_registry(plugins: LoadedPlugins) -> Registry:
    """Call every plugin's registration hooks and snapshot the result.

    A hook of an *installed* plugin (one from a distribution) that raises or returns a bad
    class is reported in ``failed``, with how to block it, and that plugin's steps are left out
    while the others work. The same mistake in a plugin registered in code is a
    :class:`PluginError` at once (its author is the caller).
    """
    base_for_kind = {"processor": Processor, "sampler": Sampler, "backend": Backend}
    by_plugin: dict[str, list[Entry]] = {}
    failed = dict(plugins.failed)
    hook_caller = plugins.manager.hook
    for kind in KINDS:
        for impl in getattr(hook_caller, _HOOK_FOR_KIND[kind]).get_hookimpls():
            info = plugins.info.get(impl.plugin_name, PluginInfo(impl.plugin_name))
            if impl.plugin_name in failed:
                continue
            try:
                try:
                    classes = impl.function() or []
                except Exception as exc:
                    raise PluginError(f"plugin {info.describe()} raised in {_HOOK_FOR_KIND[kind]}(): "
                                      f"{type(exc).__name__}: {exc}") from exc
                found = []
                for cls in classes:
                    _check_class(cls, kind, base_for_kind[kind], info)
                    found.append(Entry(kind, cls.name, cls, info))
            except PluginError as exc:
                if info.distribution is None:
                    raise
                failed[impl.plugin_name] = (f"{exc}; fix or uninstall {info.distribution}, or block it with "
                                            f"`plugins: {{block: [{info.name}]}}` in the config or "
                                            f"SAMPLERKIT_BLOCK_PLUGINS={info.name}")
                by_plugin.pop(impl.plugin_name, None)
                continue
            by_plugin.setdefault(impl.plugin_name, []).extend(found)
    entries = [entry for found in by_plugin.values() for entry in found]
    return Registry(entries, failed, plugins.blocked, plugins.blocked_steps)


def _check_class(cls: object, kind: Kind, base: type, info: PluginInfo) -> None:
    where = f"plugin {info.describe()}, {_HOOK_FOR_KIND[kind]}()"
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{where} returned {short_repr(cls)}, which is not a subclass of "
                          f"samplerkit.{base.__name__}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _SNAKE.match(name):
        raise PluginError(f"{where}: class {cls.__qualname__} needs a snake_case class attribute "
                          f"`name` (got {short_repr(name)})")
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, StepParams)):
        raise PluginError(f"{where}: {cls.__qualname__}.Params must be a subclass of samplerkit.StepParams "
                          f"(got {short_repr(params)}), which forbids unknown keys and makes the defaults the neutral values")


def default_registry(block: Iterable[str] = ()) -> Registry:
    """The registry of built-ins plus installed entry-point plugins, minus ``block``."""
    return build_registry(make_plugin_manager(block=block))
