"""The plugin hooks: the whole contract a samplerkit plugin implements.

A plugin is a module with functions named after these hooks, decorated with
``@samplerkit.hookimpl``. Each ``register_*`` hook but ``register_commands`` returns a list of
classes; each class's ``name`` class attribute is its key in YAML. Built-ins use exactly the
same hooks. ``register_commands`` adds verbs to the ``samplerkit`` command line.
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


@hookspec
def register_commands(subparsers) -> None:
    """Add verbs to the ``samplerkit`` command (as simonw/llm's hook of the same name does, with
    argparse): ``subparsers`` is the ``argparse`` sub-parsers action of the command line. Add a
    parser with ``subparsers.add_parser(name, help=...)``, its arguments, and the function that
    runs it with ``parser.set_defaults(run=function)``; ``function(args)`` returns the exit
    status. Raising :class:`~samplerkit.SamplerkitError` prints its message and exits 2."""
