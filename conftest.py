"""Session-wide test setup for every test path (tests/, plugins/*/tests, doctests)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

_CACHE = tempfile.mkdtemp(prefix="samplerkit-test-cache-")

# Without a GPU, Triton's kernels run in its interpreter (numpy on CPU tensors), so
# tests/test_triton_kernels.py checks them everywhere. Set before anything imports Triton:
# @triton.jit picks the interpreter when it decorates. The library only launches Triton
# kernels on CUDA tensors, so no other test takes them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Tests never read or fill the developer's model cache (~/.cache/samplerkit): one private,
    # initially empty cache per session, so the first load of each model in it is a cold start.
    os.environ["SAMPLERKIT_CACHE"] = _CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def default_model_path():
    """The default model's GGUF file; the test is skipped (saying why) where it is unavailable."""
    from samplerkit.builtins.backends.llama import default_model

    try:
        return default_model.find_default_model()
    except Exception as e:  # noqa: BLE001 - any reason means: skip and say why
        pytest.skip(f"default model unavailable ({e})")


@pytest.fixture
def failing_backend():
    """A bigram backend whose prefill and join raise for prompts containing '!' (token 33): a
    backend failure that belongs to one request (tests/test_engine.py, tests/test_batch.py)."""
    from samplerkit.builtins.backends.bigram import BigramBackend

    class FailingBackend(BigramBackend):
        def prefill(self, prompts, *, keep_all_logits=False):
            if any(33 in p for p in prompts):
                raise RuntimeError("prefill broke")
            return super().prefill(prompts, keep_all_logits=keep_all_logits)

        def join(self, prompts, *, keep_all_logits=False):
            if any(33 in p for p in prompts):
                raise RuntimeError("join broke")
            return super().join(prompts, keep_all_logits=keep_all_logits)

    return FailingBackend()
