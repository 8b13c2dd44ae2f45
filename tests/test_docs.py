"""Meta-tests: the documentation keeps up with the code (after datasette's tests/test_docs.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from samplerkit import hookspecs
from samplerkit.registry import default_registry

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name in dir(hookspecs) if name.startswith("register_")]


def test_hookspecs_are_the_documented_hooks():
    assert HOOKS == ["register_backends", "register_commands", "register_processors", "register_samplers"]


def test_every_hookspec_is_a_register_hook():
    """HOOKS (the register_ names) is every hook pluggy sees in hookspecs, so the tests below cover them all."""
    import pluggy

    pm = pluggy.PluginManager("samplerkit")
    pm.add_hookspecs(hookspecs)
    assert sorted(name for name in dir(pm.hook) if not name.startswith("_")) == HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    """Each hook is described (named in backticks) somewhere in docs/."""
    docs = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}
    assert any(f"`{hook}" in text for text in docs.values()), f"no page in docs/ documents `{hook}`"


def _verbs() -> list[str]:
    from samplerkit.cli import COMMANDS

    return [c.name for c in COMMANDS]


@pytest.mark.parametrize("verb", _verbs())
def test_every_cli_verb_has_a_section_in_docs_cli(verb):
    text = (ROOT / "docs" / "cli.md").read_text()
    assert re.search(rf"^## .*`samplerkit {verb}\b", text, flags=re.M), f"docs/cli.md has no section for {verb}"


def test_docs_cli_lists_exactly_the_verbs():
    """The first paragraph of docs/cli.md names the verbs: all of them, none other."""
    first = (ROOT / "docs" / "cli.md").read_text().split("\n\n")[1]
    listed = re.findall(r"`(\w+)`", first.split(":", 1)[1].split("(", 1)[0])
    words = dict(enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                           "fifteen sixteen seventeen eighteen nineteen twenty".split()))
    assert sorted(listed) == sorted(_verbs())
    assert f"has {words[len(_verbs())]} commands" in first


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
