"""What the package ships: the files pyproject.toml promises exist (PEP 561's marker, the presets)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import samplerkit

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(samplerkit.__file__).parent


def test_package_data_named_in_pyproject_exists():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = data["tool"]["setuptools"]["package-data"]["samplerkit"]
    assert "py.typed" in patterns                      # type checkers read the package's annotations
    for pattern in patterns:
        assert list(PACKAGE.glob(pattern)), f"pyproject.toml ships samplerkit/{pattern}, which matches no file"
