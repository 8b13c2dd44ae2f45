"""docs/plugins.md names every member the fast-path base classes declare (a plugin deriving
from them inherits each one, so each needs a word there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from samplerkit.fastpath import FastPathProcessor, FastPathSampler

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


@pytest.mark.parametrize("cls", [FastPathProcessor, FastPathSampler])
def test_every_fast_path_member_is_documented(cls):
    text = DOC.read_text(encoding="utf-8")
    missing = [name for name in vars(cls) if not name.startswith("_") and f"`{name}`" not in text]
    assert not missing, f"docs/plugins.md does not mention {cls.__name__}.{missing}"
