"""The plugin hooks: the whole contract a samplerkit plugin implements.

A plugin is a module with functions named after these hooks, decorated with
``@samplerkit.hookimpl``. Each returns a list of classes; each class's ``name`` class
attribute is its key in YAML. Built-ins use exactly the same hooks.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("samplerkit")
hookimpl = pluggy.HookimplMarker("samplerkit")


@hookspec
def register_processors() -> list[type]:
    """Return :class:`~samplerkit.Processor` subclasses (logits ``[B, V]`` -> ``[B, V]``)."""


@hookspec
def register_samplers() -> list[type]:
    """Return :class:`~samplerkit.Sampler` subclasses (logits ``[B, V]`` -> token ids ``[B]``)."""


@hookspec
def register_backends() -> list[type]:
    """Return :class:`~samplerkit.Backend` subclasses (models with a KV cache and a tokenizer)."""
