"""The real-model corpus: one load of the default model (SmolLM2-135M-Instruct) per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("SAMPLERKIT_QUIET", "1")


@pytest.fixture(scope="session")
def llama():
    """The default ``llama`` backend, loaded once and shared by every test of the corpus."""
    from samplerkit.builtins.backends.llama import LlamaBackend

    return LlamaBackend()
