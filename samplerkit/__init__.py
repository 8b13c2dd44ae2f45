"""samplerkit: plugin-based sampling strategies for LLM text generation.

Library entry points::

    import samplerkit
    pipe = samplerkit.load_pipeline({"pipeline": [{"top_p": 0.9}], "sampler": {"name": "categorical", "seed": 1}})
    ids = pipe.sample(logits)                           # one sampling step on [B, V] logits
    results = samplerkit.generate(["Hello"], config="examples/seed.yaml")

Plugins implement the hooks in :mod:`samplerkit.hookspecs` with ``@samplerkit.hookimpl``.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from samplerkit.backend import Backend, PrefillOutput
    from samplerkit.config import RunConfig, StepSpec
    from samplerkit.context import StepContext
    from samplerkit.errors import (
        ConfigError,
        GenerationError,
        InvalidLogitsError,
        ModelNotFoundError,
        PluginError,
        SamplerkitError,
        UnknownNameError,
    )
    from samplerkit.fastpath import MaskProcessor, ThresholdProcessor
    from samplerkit.generate import Completion, Delta, Generator, TokenLogprob, generate
    from samplerkit.hookspecs import hookimpl
    from samplerkit.params import StepParams
    from samplerkit.pipeline import BoundPipeline, Pipeline
    from samplerkit.registry import Registry, default_registry
    from samplerkit.steps import Processor, Sampler

# The public names are imported on first use (PEP 562), so `import samplerkit` (and with it the
# `samplerkit` command's own module) is light: the command then loads torch inside its main(),
# where Ctrl-C and errors are reported cleanly instead of as a traceback from an import.
_PUBLIC = {
    "samplerkit.backend": ("Backend", "PrefillOutput"),
    "samplerkit.config": ("RunConfig", "StepSpec"),
    "samplerkit.context": ("StepContext",),
    "samplerkit.errors": ("ConfigError", "GenerationError", "InvalidLogitsError", "ModelNotFoundError", "PluginError",
                          "SamplerkitError", "UnknownNameError"),
    "samplerkit.generate": ("Completion", "Delta", "Generator", "TokenLogprob", "generate"),
    "samplerkit.hookspecs": ("hookimpl",),
    "samplerkit.params": ("StepParams",),
    "samplerkit.pipeline": ("BoundPipeline", "Pipeline"),
    "samplerkit.registry": ("Registry", "default_registry"),
    "samplerkit.fastpath": ("MaskProcessor", "ThresholdProcessor"),
    "samplerkit.steps": ("Processor", "Sampler"),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'samplerkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


class _Package(types.ModuleType):
    """``samplerkit.generate`` is the function: importing the submodule of the same name (which
    sets it as an attribute of its package) must not replace it with the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__version__ = "0.1.0"


def load_pipeline(source: str | Path | Mapping[str, Any] | RunConfig, *, registry: Registry | None = None,
                  device: str = "cpu") -> Pipeline:
    """A :class:`Pipeline` from a YAML path, a config mapping or a resolved config.

    Only the ``pipeline`` and ``sampler`` sections matter here; others are validated too.
    """
    from samplerkit.generate import load_config
    from samplerkit.pipeline import Pipeline

    config, _ = load_config(source, registry)
    return Pipeline.from_config(config, device=device)


__all__ = [
    "Backend", "BoundPipeline", "Completion", "ConfigError", "Delta", "GenerationError", "Generator", "InvalidLogitsError", "MaskProcessor",
    "ModelNotFoundError", "Pipeline", "PluginError", "PrefillOutput", "Processor", "Registry", "RunConfig",
    "Sampler", "SamplerkitError", "StepContext", "StepParams", "StepSpec", "ThresholdProcessor", "TokenLogprob",
    "UnknownNameError",
    "default_registry", "generate", "hookimpl", "load_pipeline",
]
