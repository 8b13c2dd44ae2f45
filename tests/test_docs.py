"""Meta-tests: the documentation keeps up with the code (after datasette's tests/test_docs.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from samplerkit import hookspecs
from samplerkit.registry import default_registry

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name in dir(hookspecs) if name.startswith("register_")]


def test_hookspecs_are_the_three_documented_hooks():
    assert HOOKS == ["register_backends", "register_processors", "register_samplers"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    assert f"`{hook}" in (ROOT / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised_by_a_test(hook):
    sources = [p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.name != "test_docs.py"]
    sources += [p.read_text() for p in (ROOT / "plugins").rglob("test_*.py")]
    assert any(hook in text for text in sources), f"no test mentions {hook}"


def _builtin_names() -> list[str]:
    registry = default_registry()
    return [e.name for kind in ("processor", "sampler") for e in registry.entries(kind)
            if e.plugin.name.startswith("samplerkit.builtins")]


@pytest.mark.parametrize("name", _builtin_names())
def test_every_builtin_step_is_documented(name):
    text = (ROOT / "docs" / "processors.md").read_text()
    assert re.search(rf"`{name}`", text), f"docs/processors.md does not describe `{name}`"


def test_readme_starts_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert "samplerkit generate" in blocks[0] and "pip install torch==2.13.0" in blocks[0]
    assert blocks[1].strip() == "bash .ci/run"
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate(path):
    from samplerkit.config import read_yaml, resolve

    resolve(read_yaml(path), default_registry(), str(path))
