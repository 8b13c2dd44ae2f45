"""Plugin registration: built-ins through the same hooks, blocking, duplicates, typos, failures."""

from __future__ import annotations

import importlib.metadata
import types

import pytest

from samplerkit import PluginError, UnknownNameError, hookimpl
from samplerkit.builtins.truncation import TopP
from samplerkit.config import resolve
from samplerkit.plugins import BLOCK_ENV_VAR, DEFAULT_PLUGINS, make_plugin_manager
from samplerkit.registry import build_registry, default_registry
from samplerkit.steps import Processor
from samplerkit.testing import temporary_plugin


class Shout(Processor):
    """Test processor."""

    name = "shout"

    def apply(self, logits, ctx):
        return logits


def plugin_module(name="fake_plugin", **hooks):
    module = types.ModuleType(name)
    for hook, classes in hooks.items():
        def impl(classes=classes):
            return list(classes)
        impl.__name__ = hook
        setattr(module, hook, hookimpl(impl))
    return module


def test_builtins_are_registered_through_the_hooks():
    loaded = make_plugin_manager(load_entry_points=False)
    names = [name for name, _ in loaded.manager.list_name_plugin()]
    assert set(DEFAULT_PLUGINS) <= set(names)
    registry = build_registry(loaded)
    entry = registry.entry("processor", "top_p")
    assert entry.cls is TopP and entry.plugin.name == "samplerkit.builtins.truncation"
    assert entry.plugin.describe() == "samplerkit.builtins.truncation (built-in)"
    assert registry.entry("sampler", "greedy").plugin.name == "samplerkit.builtins.samplers"
    assert registry.entry("backend", "bigram").plugin.name == "samplerkit.builtins.backends"


def test_registry_is_an_immutable_snapshot():
    registry = default_registry()
    with pytest.raises(TypeError):
        registry._table["processor"]["x"] = None          # MappingProxyType
    with temporary_plugin(plugin_module(register_processors=[Shout]), "shouty", load_entry_points=False) as reg:
        assert reg.has("processor", "shout")
    assert not registry.has("processor", "shout") and not default_registry().has("processor", "shout")


def test_block_by_name():
    registry = default_registry(block=["samplerkit.builtins.truncation"])
    assert not {"top_k", "top_p", "min_p", "typical_p", "xtc"} & set(registry.names("processor"))
    assert registry.has("processor", "temperature")            # the shaping plugin is not blocked
    assert "samplerkit.builtins.truncation" in registry.blocked
    assert registry.has("sampler", "greedy")


def test_block_from_config():
    from samplerkit.generate import load_config
    with pytest.raises(Exception) as info:
        load_config({"plugins": {"block": ["samplerkit.builtins.truncation"]}, "pipeline": [{"top_p": 0.9}]})
    # Using a step of a blocked plugin says it is blocked, and by which plugin.
    assert ("pipeline[0]: processor 'top_p' is provided by the plugin 'samplerkit.builtins.truncation', "
            "which is blocked") in str(info.value)
    config, registry = load_config({"plugins": {"block": ["samplerkit.builtins.truncation"]}, "pipeline": []})
    assert not registry.has("processor", "top_p") and config.plugins.block == ["samplerkit.builtins.truncation"]


def test_block_from_environment(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV_VAR, " samplerkit.builtins.samplers , other ")
    registry = default_registry()
    assert not {"greedy", "categorical"} & set(registry.names("sampler")) and registry.has("processor", "top_p")
    assert {"samplerkit.builtins.samplers", "other"} <= registry.blocked
    with temporary_plugin(plugin_module(register_processors=[Shout]), "other", load_entry_points=False) as reg:
        assert not reg.has("processor", "shout")          # the env var blocks extra plugins too


def test_duplicate_names_name_both_plugins():
    class AnotherTopP(Processor):
        name = "top_p"

    with pytest.raises(PluginError) as info:
        with temporary_plugin(plugin_module(register_processors=[AnotherTopP]), "rival_plugin", load_entry_points=False):
            pass
    msg = str(info.value)
    assert "two plugins register a processor named 'top_p'" in msg
    assert "samplerkit.builtins.truncation (built-in)" in msg and "rival_plugin" in msg


def test_duplicate_can_be_resolved_by_blocking():
    class AnotherTopP(Processor):
        name = "top_p"

    with temporary_plugin(plugin_module(register_processors=[AnotherTopP]), "rival_plugin",
                          block=["samplerkit.builtins.truncation"], load_entry_points=False) as reg:
        assert reg.get("processor", "top_p") is AnotherTopP


def test_hook_name_typo_is_an_error():
    module = types.ModuleType("typo_plugin")

    @hookimpl
    def register_processor():        # missing the final s
        return [Shout]

    module.register_processor = register_processor
    with pytest.raises(PluginError, match="register_processor") as info:
        make_plugin_manager(load_entry_points=False, extra=[("typo_plugin", module)])
    assert "register_processors, register_samplers or register_backends" in str(info.value)


@pytest.mark.parametrize("bad_name", ["Shout", "shout-it", "", None, "1st"])
def test_class_without_snake_case_name_is_an_error(bad_name):
    attrs = {"apply": lambda self, x, ctx: x}
    if bad_name is not None:
        attrs["name"] = bad_name
    cls = type("BadName", (Processor,), attrs)
    with pytest.raises(PluginError, match="snake_case") as info:
        with temporary_plugin(plugin_module(register_processors=[cls]), "bad_names", load_entry_points=False):
            pass
    assert "bad_names" in str(info.value)


def test_wrong_base_class_is_an_error():
    class NotAStep:
        name = "not_a_step"

    with pytest.raises(PluginError, match="not a subclass of samplerkit.Processor"):
        with temporary_plugin(plugin_module(register_processors=[NotAStep]), "wrong_base", load_entry_points=False):
            pass


def test_a_hook_that_raises_is_reported_with_the_plugin():
    module = types.ModuleType("raising")

    @hookimpl
    def register_processors():
        raise RuntimeError("boom")

    module.register_processors = register_processors
    with pytest.raises(PluginError, match="raising .*register_processors\\(\\): RuntimeError: boom"):
        with temporary_plugin(module, "raising", load_entry_points=False):
            pass


class _FakeEntryPoint:
    def __init__(self, name, target):
        self.name, self.group, self._target = name, "samplerkit", target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


class _FakeDist:
    def __init__(self, name, version, eps):
        self.metadata = {"name": name}
        self.version = version
        self.entry_points = eps


def test_failing_plugin_import_is_reported_while_the_rest_works(monkeypatch):
    good = plugin_module("samplerkit_shout", register_processors=[Shout])
    dists = [_FakeDist("samplerkit-broken", "0.1", [_FakeEntryPoint("broken", ImportError("No module named 'torchy'"))]),
             _FakeDist("samplerkit-shout", "1.2.3", [_FakeEntryPoint("shout", good)])]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: dists)
    registry = default_registry()
    assert set(registry.failed) == {"broken"}
    assert "samplerkit-broken 0.1 failed to import: ImportError: No module named 'torchy'" in registry.failed["broken"]
    entry = registry.entry("processor", "shout")
    assert (entry.plugin.name, entry.plugin.distribution, entry.plugin.version) == ("shout", "samplerkit-shout", "1.2.3")
    assert registry.has("processor", "top_p")
    # Unknown names mention the failed plugin, with a did-you-mean.
    with pytest.raises(UnknownNameError) as info:
        registry.entry("processor", "shoot")
    assert "did you mean 'shout'?" in str(info.value) and "failed to load: broken" in str(info.value)
    # Blocking the broken plugin silences it.
    assert default_registry(block=["broken"]).failed == {}


def test_unknown_name_error():
    registry = default_registry()
    with pytest.raises(UnknownNameError, match="unknown sampler 'gredy'; did you mean 'greedy'\\? Available samplers: "):
        registry.get("sampler", "gredy")
    assert "Available processors: " in registry.unknown_message("processor", "zzz")


def test_temporary_plugin_step_is_usable_in_a_config():
    with temporary_plugin(Shout, load_entry_points=False) as registry:
        cfg = resolve({"pipeline": ["shout", {"top_p": 0.5}]}, registry)
        assert [s.name for s in cfg.processors] == ["shout", "top_p"]
        assert cfg.processors[0].plugin.startswith("temporary_shout")


def _typo_module():
    module = types.ModuleType("samplerkit_typo")

    @hookimpl
    def register_processor():        # missing the final s
        return [Shout]

    module.register_processor = register_processor
    return module


def test_an_installed_plugin_with_a_hook_typo_does_not_break_the_others(monkeypatch):
    """One bad installed plugin used to fail every command; now it is reported like an import
    failure (its distribution, how to block it) and the rest load."""
    good = plugin_module("samplerkit_shout", register_processors=[Shout])
    dists = [_FakeDist("samplerkit-typo", "0.2", [_FakeEntryPoint("typo", _typo_module())]),
             _FakeDist("samplerkit-shout", "1.2.3", [_FakeEntryPoint("shout", good)])]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: dists)
    registry = default_registry()
    assert set(registry.failed) == {"typo"}
    why = registry.failed["typo"]
    assert "plugin 'typo' from samplerkit-typo 0.2 is not a valid samplerkit plugin" in why
    assert "register_processor" in why and "register_processors, register_samplers or register_backends" in why
    assert "plugins: {block: [typo]}" in why and "SAMPLERKIT_BLOCK_PLUGINS=typo" in why
    assert registry.has("processor", "shout") and registry.has("processor", "top_p")
    assert default_registry(block=["typo"]).failed == {}


def test_an_installed_plugin_whose_hook_raises_does_not_break_the_others(monkeypatch):
    class Other(Processor):
        name = "other_step"

        def apply(self, logits, ctx):
            return logits

    raising = types.ModuleType("samplerkit_raising")

    @hookimpl
    def register_processors():
        raise RuntimeError("boom")

    @hookimpl
    def register_samplers():
        return []

    raising.register_processors, raising.register_samplers = register_processors, register_samplers
    good = plugin_module("samplerkit_other", register_processors=[Other])
    dists = [_FakeDist("samplerkit-raising", "0.1", [_FakeEntryPoint("raising", raising)]),
             _FakeDist("samplerkit-other", "1.0", [_FakeEntryPoint("other", good)])]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: dists)
    registry = default_registry()
    assert set(registry.failed) == {"raising"}
    assert "raised in register_processors(): RuntimeError: boom" in registry.failed["raising"]
    assert "SAMPLERKIT_BLOCK_PLUGINS=raising" in registry.failed["raising"]
    assert registry.has("processor", "other_step")


def test_unknown_block_names_get_a_did_you_mean():
    from samplerkit import ConfigError

    with pytest.raises(ConfigError, match=r"plugins.block\[1\]: unknown plugin 'samplerkit.builtins.sampler'; "
                                          r"did you mean 'samplerkit.builtins.samplers'\? Plugins: "):
        default_registry(block=["samplerkit.builtins.truncation", "samplerkit.builtins.sampler"])


def test_a_step_of_a_blocked_builtin_says_it_is_blocked():
    registry = default_registry(block=["samplerkit.builtins.samplers"])
    with pytest.raises(UnknownNameError, match="sampler 'greedy' is provided by the plugin "
                                               "'samplerkit.builtins.samplers', which is blocked"):
        registry.get("sampler", "greedy")


def test_one_did_you_mean_helper():
    """Every spelling suggestion goes through samplerkit.errors.did_you_mean (six copies before)."""
    from pathlib import Path

    import samplerkit

    users = sorted(str(p.relative_to(Path(samplerkit.__file__).parent))
                   for p in Path(samplerkit.__file__).parent.rglob("*.py") if "difflib" in p.read_text())
    assert users == ["errors.py"]
