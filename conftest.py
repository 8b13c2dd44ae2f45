"""Session-wide test setup for every test path (tests/, plugins/*/tests, doctests)."""

from __future__ import annotations

import os
import shutil
import tempfile

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
