"""samplerkit: plugin-based sampling strategies for LLM text generation.

Library entry points::

    import samplerkit
    pipe = samplerkit.load_pipeline({"pipeline": [{"top_p": 0.9}], "sampler": {"name": "categorical", "seed": 1}})
    ids = pipe.sample(logits)                           # one sampling step on [B, V] logits
    results = samplerkit.generate(["Hello"], config="examples/seed.yaml")

Plugins implement the hooks in :mod:`samplerkit.hookspecs` with ``@samplerkit.hookimpl``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
from samplerkit.generate import Completion, Delta, Generator, TokenLogprob, generate
from samplerkit.hookspecs import hookimpl
from samplerkit.params import StepParams
from samplerkit.pipeline import BoundPipeline, Pipeline
from samplerkit.registry import Registry, default_registry
from samplerkit.steps import MaskProcessor, Processor, Sampler, ThresholdProcessor

__version__ = "0.1.0"


def load_pipeline(source: str | Path | Mapping[str, Any] | RunConfig, *, registry: Registry | None = None,
                  device: str = "cpu") -> Pipeline:
    """A :class:`Pipeline` from a YAML path, a config mapping or a resolved config.

    Only the ``pipeline`` and ``sampler`` sections matter here; others are validated too.
    """
    from samplerkit.generate import load_config

    config, _ = load_config(source, registry)
    return Pipeline.from_config(config, device=device)


__all__ = [
    "Backend", "BoundPipeline", "Completion", "ConfigError", "Delta", "GenerationError", "Generator", "InvalidLogitsError", "MaskProcessor",
    "ModelNotFoundError", "Pipeline", "PluginError", "PrefillOutput", "Processor", "Registry", "RunConfig",
    "Sampler", "SamplerkitError", "StepContext", "StepParams", "StepSpec", "ThresholdProcessor", "TokenLogprob",
    "UnknownNameError",
    "default_registry", "generate", "hookimpl", "load_pipeline",
]
