"""The plugin as installed: its entry point, blocking, and a registry that does not import llama_cpp."""

from __future__ import annotations

import subprocess
import sys

import pytest
from samplerkit_llamacpp import LlamaCppBackend

import samplerkit
from samplerkit import ConfigError


def test_registered_with_its_distribution():
    entry = samplerkit.default_registry().entry("backend", "llamacpp")
    assert entry.cls is LlamaCppBackend
    assert entry.plugin.name == "llamacpp"
    assert entry.plugin.distribution == "samplerkit-llamacpp"
    assert entry.plugin.describe() == "llamacpp (samplerkit-llamacpp 0.1.0)"


def test_register_backends_hook_lists_the_backend():
    import samplerkit_llamacpp

    assert samplerkit_llamacpp.register_backends() == [LlamaCppBackend]


def test_blocked_by_name():
    with pytest.raises(ConfigError, match="unknown backend 'llamacpp'"):
        samplerkit.load_pipeline({"backend": {"name": "llamacpp"}, "plugins": {"block": ["llamacpp"]}})


def test_params_are_validated():
    with pytest.raises(ConfigError, match="n_seq"):
        samplerkit.load_pipeline({"backend": {"name": "llamacpp", "n_seq": 0}})


def test_building_a_registry_does_not_import_llama_cpp():
    code = ("import sys, samplerkit; r = samplerkit.default_registry(); r.entry('backend', 'llamacpp'); "
            "print('llama_cpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
