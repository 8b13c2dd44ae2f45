"""Exceptions raised by samplerkit.

Every error a user can cause is a :class:`SamplerkitError`; the CLI prints its message
(no traceback) and exits with status 2. :class:`ConfigError` carries *every* problem found
in a configuration, each with its location, not only the first.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Longest echo of a user's value in a message: a config can hold megabytes in one value, and a
#: message that repeats it (or an alias bomb's expansion) is a denial of service of its own.
MAX_VALUE_CHARS = 80
#: Most problems listed by one :class:`ConfigError`; the rest are counted, not printed.
MAX_ISSUES = 50


def short_repr(value: Any, limit: int = MAX_VALUE_CHARS, _depth: int = 0) -> str:
    """``repr(value)`` cut to ``limit`` characters: ``'aaaa...' (10000 chars)``.

    Containers are never ``repr``-ed whole: a list of ten million entries (or an alias bomb
    that expands to one) would take minutes and gigabytes. Their text is built from a bounded
    prefix of their items instead, with the item count.
    """
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        if _depth >= 8:                      # deep nesting: no recursion without bound
            return "[...]" if isinstance(value, list) else "{...}"
        return _short_container(value, limit, _depth + 1)
    try:
        text = repr(value)
    except Exception:                        # a user object whose __repr__ fails
        text = f"<{type(value).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` cut to ``limit`` characters (for a user's key echoed in a location, unquoted)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _short_container(value: Any, limit: int, depth: int) -> str:
    brackets = {list: "[]", tuple: "()"}.get(type(value), "{}")
    items = value.items() if isinstance(value, dict) else value
    parts: list[str] = []
    used = 0
    for item in items:
        if used > limit:
            break
        part = (f"{short_repr(item[0], limit, depth)}: {short_repr(item[1], limit, depth)}"
                if isinstance(value, dict) else short_repr(item, limit, depth))
        parts.append(part)
        used += len(part) + 2
    text = brackets[0] + ", ".join(parts) + brackets[1]
    if len(text) <= limit and len(parts) == len(value):
        return text
    return f"{text[:limit]}... ({len(value)} items)"


def closest(name: Any, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The entry of ``choices`` most like ``name`` (difflib's ratio >= ``cutoff``), or None."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(name: Any, choices: Iterable[str]) -> str:
    """``"; did you mean 'top_p'?"`` when one of ``choices`` is close to ``name`` (difflib's
    ratio >= 0.6), else ``"."``: the one spelling-suggestion rule of every message."""
    close = closest(name, choices)
    return f"; did you mean {close!r}?" if close else "."


class SamplerkitError(Exception):
    """Base class for errors caused by user input, configuration or plugins."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration: where (``pipeline[2] top_p``) and what."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class ConfigError(SamplerkitError):
    """A configuration (YAML file, dict, ``--set`` override) failed validation.

    ``issues`` lists every problem found; ``str()`` shows them one per line.
    """

    def __init__(self, issues: list[ConfigIssue] | ConfigIssue | str, source: str | None = None):
        if isinstance(issues, str):
            issues = [ConfigIssue("", issues)]
        elif isinstance(issues, ConfigIssue):
            issues = [issues]
        self.issues: list[ConfigIssue] = list(issues)
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        if len(self.issues) == 1:
            text = f"{head}: {self.issues[0]}"
        else:
            # Millions of bad entries must not print millions of lines: the first MAX_ISSUES
            # are shown (they are in document order), the rest counted.
            shown = self.issues[:MAX_ISSUES]
            text = head + f" ({len(self.issues)} problems):\n" + "\n".join(f"  {i}" for i in shown)
            if len(self.issues) > len(shown):
                text += f"\n  ... and {len(self.issues) - len(shown)} more problems (fix these and validate again)"
        super().__init__(text)


class UnknownNameError(SamplerkitError):
    """A processor, sampler or backend name that no registered plugin provides."""


class PluginError(SamplerkitError):
    """A plugin failed to load, registered a conflicting name, or misbehaved at run time."""


class ModelNotFoundError(SamplerkitError):
    """A model file or directory is missing; the message says how to get one."""


class GenerationError(SamplerkitError):
    """A request that cannot be generated as given (prompt longer than the context, ...)."""


class InvalidLogitsError(SamplerkitError):
    """A row's logits became unusable (NaN, +inf, or nothing left after masking) under the
    ``on_invalid: raise`` policy; the message names the row and the stage responsible."""
