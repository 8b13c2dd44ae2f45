"""Session-wide test setup for every test path (tests/, plugins/*/tests, doctests)."""

from __future__ import annotations

import os
import shutil
import tempfile

_CACHE = tempfile.mkdtemp(prefix="samplerkit-test-cache-")


def pytest_configure(config):
    # Tests never read or fill the developer's model cache (~/.cache/samplerkit): one private,
    # initially empty cache per session, so the first load of each model in it is a cold start.
    os.environ["SAMPLERKIT_CACHE"] = _CACHE


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)
