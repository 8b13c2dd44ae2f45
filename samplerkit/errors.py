"""Exceptions raised by samplerkit.

Every error a user can cause is a :class:`SamplerkitError`; the CLI prints its message
(no traceback) and exits with status 2. :class:`ConfigError` carries *every* problem found
in a configuration, each with its location, not only the first.
"""

from __future__ import annotations

from dataclasses import dataclass


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
            text = head + f" ({len(self.issues)} problems):\n" + "\n".join(f"  {i}" for i in self.issues)
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
