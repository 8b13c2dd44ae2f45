"""samplerkit-llamacpp: GGUF models on llama.cpp's CPU kernels, tokens chosen by samplerkit.

The ``llamacpp`` backend (:class:`~samplerkit_llamacpp.backend.LlamaCppBackend`) runs a GGUF file
through llama-cpp-python's low-level API (all rows of a batch in one ``llama_batch``, one KV
sequence per row) and hands every step's logits to the samplerkit pipeline::

    backend: {name: llamacpp, model: ./model.gguf}

To go the other way (run llama.cpp's own samplers with a samplerkit config) see
``samplerkit export llamacpp CONFIG``.

Registering the plugin does not import llama_cpp: the backend imports it when a model is loaded.
"""

from __future__ import annotations

import samplerkit
from samplerkit_llamacpp.backend import LlamaCppBackend, LlamaCppParams

__all__ = ["LlamaCppBackend", "LlamaCppParams", "register_backends"]


@samplerkit.hookimpl
def register_backends():
    return [LlamaCppBackend]
