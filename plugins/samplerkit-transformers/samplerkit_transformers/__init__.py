"""samplerkit-transformers: Hugging Face transformers and samplerkit, both ways round.

- The ``transformers`` backend (:class:`~samplerkit_transformers.backend.TransformersBackend`):
  any local ``AutoModelForCausalLM`` directory runs in samplerkit's decode loop
  (``backend: {name: transformers, model: ./my-model}``).
- :class:`~samplerkit_transformers.processor.SamplerkitLogitsProcessor` and
  :func:`~samplerkit_transformers.processor.generate_kwargs`: a samplerkit pipeline chooses the
  tokens of ``model.generate()``, with samplerkit's per-row seeds and exact distribution.

Registering the plugin imports neither transformers nor the processor module: the backend
imports transformers when a model is loaded, and the processor names below are imported on
first use, so building a registry stays fast.
"""

from __future__ import annotations

import samplerkit
from samplerkit_transformers.backend import TransformersBackend, TransformersParams

__all__ = ["NEUTRAL_GENERATE_KWARGS", "SamplerkitLogitsProcessor", "TransformersBackend", "TransformersParams",
           "generate_kwargs", "register_backends"]

_PROCESSOR_NAMES = {"NEUTRAL_GENERATE_KWARGS", "SamplerkitLogitsProcessor", "generate_kwargs"}


@samplerkit.hookimpl
def register_backends():
    return [TransformersBackend]


def __getattr__(name: str):
    # The processor subclasses transformers.LogitsProcessor, so importing it imports transformers.
    if name in _PROCESSOR_NAMES:
        from samplerkit_transformers import processor

        return getattr(processor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
