"""docs/plugins.md stays true: its code excerpts are the tutorial plugins' real code, and its
runnable snippets run and print what the page says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"

_BLOCK = re.compile(r"(<!-- excerpt: (?P<path>[^ ]+) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S)


def _blocks():
    return list(_BLOCK.finditer(DOC.read_text(encoding="utf-8")))


def _excerpts():
    return [(m["path"], m["body"]) for m in _blocks() if m["path"]]


def _snippets():
    return [m["body"] for m in _blocks() if m["lang"] == "python" and not m["path"]]


def test_the_tutorials_quote_their_plugins():
    paths = {path for path, _ in _excerpts()}
    assert {"plugins/samplerkit-example/samplerkit_example/__init__.py",
            "plugins/samplerkit-toybackend/samplerkit_toybackend/__init__.py",
            "plugins/samplerkit-toybackend/tests/test_trigram.py",
            "plugins/samplerkit-toybackend/pyproject.toml"} <= paths


@pytest.mark.parametrize("index", range(len(_excerpts())))
def test_excerpts_are_verbatim(index):
    path, body = _excerpts()[index]
    source = (ROOT / path).read_text(encoding="utf-8")
    assert body in source, f"docs/plugins.md quotes {path}, but the file no longer contains:\n{body}"


def _run(snippet: str) -> tuple[dict, str]:
    namespace: dict = {"__name__": "plugins_doc_snippet"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "docs/plugins.md", "exec"), namespace)
    return namespace, out.getvalue()


def _expected_output(snippet: str) -> str | None:
    """The ``# ...`` comment lines after the snippet's last ``print``: what it prints."""
    lines = snippet.rstrip("\n").split("\n")
    tail = []
    while lines and lines[-1].startswith("# "):
        tail.insert(0, lines.pop()[2:])
    return "\n".join(tail) + "\n" if tail and "print(" in "\n".join(lines[-3:]) else None


def test_there_are_runnable_snippets():
    assert len(_snippets()) >= 2 and all(_expected_output(s) for s in _snippets())


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_snippets_run_and_print_what_the_page_says(index):
    snippet = _snippets()[index]
    _, printed = _run(snippet)
    assert printed == _expected_output(snippet)


def test_the_epsilon_greedy_sampler_needs_its_distribution_claim():
    """The page says: without ``distribution``, check_sampler fails on the ``epsilon: 0`` example."""
    from samplerkit.testing import check_sampler

    [snippet] = [s for s in _snippets() if "class EpsilonGreedy" in s]
    namespace, _ = _run(snippet)
    unclaimed = type("Unclaimed", (namespace["EpsilonGreedy"],), {"distribution": None, "name": "unclaimed"})
    with pytest.raises(AssertionError, match=r"unclaimed\(seed=1, epsilon=0.0\) on test row \d+: the drawn tokens "
                                             r"do not follow softmax\(logits\)"):
        check_sampler(unclaimed)
