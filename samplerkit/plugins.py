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
from samplerkit.errors import PluginError

ENTRY_POINT_GROUP = "samplerkit"
BLOCK_ENV_VAR = "SAMPLERKIT_BLOCK_PLUGINS"

# Built-ins are ordinary plugin modules, registered exactly as third-party ones are.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "samplerkit.builtins.processors",
    "samplerkit.builtins.penalties",
    "samplerkit.builtins.shaping",
    "samplerkit.builtins.samplers",
    "samplerkit.builtins.backends",
)


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


def blocked_from_env() -> set[str]:
    raw = os.environ.get(BLOCK_ENV_VAR, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def make_plugin_manager(
    *,
    block: Iterable[str] = (),
    load_entry_points: bool = True,
    extra: Iterable[tuple[str, object]] = (),
) -> LoadedPlugins:
    """Build a plugin manager with the built-ins, installed entry points and ``extra`` plugins.

    ``block`` (plus the ``SAMPLERKIT_BLOCK_PLUGINS`` environment variable) names plugins that
    are not registered. A plugin that fails to import is recorded in ``failed`` rather than
    breaking everything else; a plugin that implements a hook that does not exist (a typo)
    is a :class:`PluginError`.
    """
    blocked = frozenset(set(block) | blocked_from_env())
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    loaded = LoadedPlugins(manager=pm, blocked=blocked)

    for module_name in DEFAULT_PLUGINS:
        if module_name in blocked:
            continue
        pm.register(importlib.import_module(module_name), module_name)
        loaded.info[module_name] = PluginInfo(module_name, builtin=True)

    if load_entry_points:
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or ep.name in blocked or pm.has_plugin(ep.name):
                    continue
                dist_name = dist.metadata["name"]
                try:
                    module = ep.load()
                except Exception as exc:  # a broken plugin must not take the others down
                    loaded.failed[ep.name] = (
                        f"plugin {ep.name!r} from {dist_name} {dist.version} failed to import: "
                        f"{type(exc).__name__}: {exc}")
                    continue
                pm.register(module, ep.name)
                loaded.info[ep.name] = PluginInfo(ep.name, dist_name, dist.version)

    for name, module in extra:
        if name in blocked:
            continue
        pm.register(module, name)
        loaded.info[name] = PluginInfo(name)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"{exc}. Hook functions must be named register_processors, register_samplers "
            f"or register_backends.") from None
    return loaded
