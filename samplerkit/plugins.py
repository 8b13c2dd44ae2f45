"""Building the plugin manager: built-ins and entry-point plugins through one path.

Nothing is loaded at import time: :func:`make_plugin_manager` builds a fresh manager each
call, and :mod:`samplerkit.registry` snapshots it. Any plugin, built-in or third-party, can be
blocked by name, from config (``plugins: {block: [...]}``) or from the environment
(``SAMPLERKIT_BLOCK_PLUGINS=name1,name2``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import pluggy

from samplerkit import hookspecs
from samplerkit.errors import ConfigError, ConfigIssue, PluginError, did_you_mean, short_repr

ENTRY_POINT_GROUP = "samplerkit"
BLOCK_ENV_VAR = "SAMPLERKIT_BLOCK_PLUGINS"

# Built-ins are ordinary plugin modules, registered exactly as third-party ones are.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "samplerkit.builtins.truncation",
    "samplerkit.builtins.shaping",
    "samplerkit.builtins.penalties",
    "samplerkit.builtins.structured",
    "samplerkit.builtins.samplers",
    "samplerkit.builtins.backends",
)


#: The registration hook of each kind of step.
HOOK_FOR_KIND = {"processor": "register_processors", "sampler": "register_samplers", "backend": "register_backends"}


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered plugin came from: its name and, for installed ones, its distribution."""

    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False

    def describe(self) -> str:
        if self.distribution:
            return f"{self.name} ({self.distribution} {self.version})"
        return f"{self.name} ({'built-in' if self.builtin else 'registered in code'})"


@dataclass
class LoadedPlugins:
    """A plugin manager plus what the registry needs to know about each plugin."""

    manager: pluggy.PluginManager
    info: dict[str, PluginInfo] = field(default_factory=dict)   # plugin name -> info
    failed: dict[str, str] = field(default_factory=dict)        # plugin name -> error text
    blocked: frozenset[str] = frozenset()
    blocked_steps: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, step) -> blocked plugin


def blocked_from_env() -> set[str]:
    raw = os.environ.get(BLOCK_ENV_VAR, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def make_plugin_manager(
    *,
    block: Iterable[str] = (),
    load_entry_points: bool = True,
    extra: Iterable[tuple[str, object]] = (),
    builtins: bool = True,
) -> LoadedPlugins:
    """Build a plugin manager with the built-ins, installed entry points and ``extra`` plugins.

    ``builtins=False`` leaves the built-in modules out (not even imported: they import torch),
    for callers that only want other plugins' hooks, such as the CLI's ``register_commands``.

    ``block`` (plus the ``SAMPLERKIT_BLOCK_PLUGINS`` environment variable) names plugins that
    are not registered; a name in ``block`` that no plugin has is a :class:`ConfigError` with a
    did-you-mean (names in the environment variable may name plugins not installed here).

    One bad installed plugin never breaks the others: one that fails to import, or implements
    a hook that does not exist (a typo), is recorded in ``failed`` with its distribution and
    how to block it, and the rest load. A plugin registered in code (``extra``) with a hook
    typo is a :class:`PluginError` at once: the caller wrote it.
    """
    extra = list(extra)
    entry_points = _entry_points() if load_entry_points else []
    known = [*DEFAULT_PLUGINS, *(ep.name for _, ep in entry_points), *(name for name, _ in extra)]
    wanted = _check_block(block, known)
    blocked = frozenset(wanted | blocked_from_env())
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    loaded = LoadedPlugins(manager=pm, blocked=blocked)

    for module_name in DEFAULT_PLUGINS if builtins else ():
        module = importlib.import_module(module_name)
        if module_name in blocked:
            _record_blocked_steps(loaded, module_name, module)
            continue
        pm.register(module, module_name)
        loaded.info[module_name] = PluginInfo(module_name, builtin=True)

    for dist, ep in entry_points:
        if ep.name in blocked or pm.has_plugin(ep.name):
            continue
        dist_name = dist.metadata["name"]
        how = f"block it with `plugins: {{block: [{ep.name}]}}` in the config or SAMPLERKIT_BLOCK_PLUGINS={ep.name}"
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            loaded.failed[ep.name] = (f"plugin {ep.name!r} from {dist_name} {dist.version} failed to import: "
                                      f"{type(exc).__name__}: {exc}; fix or uninstall {dist_name}, or {how}")
            continue
        try:
            pm.register(module, ep.name)
            pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if pm.is_registered(module):
                pm.unregister(module)
            loaded.failed[ep.name] = (f"plugin {ep.name!r} from {dist_name} {dist.version} is not a valid samplerkit "
                                      f"plugin: {exc}. {_HOOK_NAMES}; fix or uninstall {dist_name}, or {how}")
            continue
        loaded.info[ep.name] = PluginInfo(ep.name, dist_name, dist.version)

    for name, module in extra:
        if name in blocked:
            continue
        pm.register(module, name)
        loaded.info[name] = PluginInfo(name)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc}. {_HOOK_NAMES}.") from None
    return loaded


_HOOK_NAMES = "Hook functions must be named register_processors, register_samplers or register_backends"


def _entry_points() -> list[tuple[importlib.metadata.Distribution, importlib.metadata.EntryPoint]]:
    return [(dist, ep) for dist in importlib.metadata.distributions() for ep in dist.entry_points
            if ep.group == ENTRY_POINT_GROUP]


def _check_block(block: Iterable[object], known: list[str]) -> set[str]:
    """The plugin names in ``block``; anything else (not a string, no such plugin) is a
    :class:`ConfigError` listing every bad entry."""
    issues = []
    names = set()
    for index, name in enumerate(block):
        where = f"plugins.block[{index}]"
        if not isinstance(name, str):
            issues.append(ConfigIssue(where, f"must be a plugin name (a string), got {short_repr(name)}"))
        elif name not in known:
            issues.append(ConfigIssue(where, f"unknown plugin {short_repr(name)}{did_you_mean(name, known)} "
                                             f"Plugins: {', '.join(known)}"))
        else:
            names.add(name)
    if issues:
        raise ConfigError(issues)
    return names


def _record_blocked_steps(loaded: LoadedPlugins, plugin_name: str, module: object) -> None:
    """Remember which steps a blocked built-in would register, so that using one says it is
    blocked rather than unknown. (Installed plugins that are blocked are never imported.)"""
    for kind, hook in HOOK_FOR_KIND.items():
        function = getattr(module, hook, None)
        for cls in (function() if callable(function) else None) or []:
            name = getattr(cls, "name", None)
            if isinstance(name, str):
                loaded.blocked_steps[(kind, name)] = plugin_name
