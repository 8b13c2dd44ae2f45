"""Shared fixtures: the default SmolLM2 GGUF in the ``llamacpp`` backend and in samplerkit's own
``llama`` backend (the reference). Backend tests skip only when llama-cpp-python is missing."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("SAMPLERKIT_QUIET", "1")


@pytest.fixture(scope="session")
def backend():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the plugin's only engine)")
    from samplerkit_llamacpp import LlamaCppBackend, LlamaCppParams

    return LlamaCppBackend(LlamaCppParams(n_ctx=2048, n_seq=8))


@pytest.fixture(scope="session")
def reference():
    from samplerkit.builtins.backends.llama import LlamaBackend

    return LlamaBackend()
