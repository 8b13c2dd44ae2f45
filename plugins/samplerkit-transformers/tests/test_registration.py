"""The plugin as installed: its entry point, blocking, and a registry that stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest
from samplerkit_transformers import TransformersBackend

import samplerkit
from samplerkit import ConfigError


def test_registered_with_its_distribution():
    entry = samplerkit.default_registry().entry("backend", "transformers")
    assert entry.cls is TransformersBackend
    assert entry.plugin.name == "transformers"
    assert entry.plugin.distribution == "samplerkit-transformers"
    assert entry.plugin.describe() == "transformers (samplerkit-transformers 0.1.0)"


def test_register_backends_hook_lists_the_backend():
    import samplerkit_transformers

    assert samplerkit_transformers.register_backends() == [TransformersBackend]


def test_blocked_by_name(model_dir):
    with pytest.raises(ConfigError, match="unknown backend 'transformers'"):
        samplerkit.load_pipeline({"backend": {"name": "transformers", "model": str(model_dir)},
                                  "plugins": {"block": ["transformers"]}})


def test_model_is_required():
    with pytest.raises(ConfigError, match="model"):
        samplerkit.load_pipeline({"backend": "transformers"})


def test_building_a_registry_does_not_import_transformers():
    code = ("import sys, samplerkit; r = samplerkit.default_registry(); r.entry('backend', 'transformers'); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
