"""A step class with validated parameters (:class:`StepSpec`), and the translation of pydantic's
validation errors into located messages (``pipeline[2] top_p: must be in (0, 1], got 1.5``).

Below the registry and the config: :mod:`samplerkit.steps` builds specs (``Step.spec``) and
:mod:`samplerkit.config` resolves YAML entries into them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from samplerkit.errors import ConfigError, ConfigIssue, clip, did_you_mean, short_repr
from samplerkit.params import StepParams


@dataclass(frozen=True)
class StepSpec:
    """A step class with validated parameters, and where it came from (for messages)."""

    cls: type
    params: StepParams
    location: str = ""
    plugin: str = ""

    @property
    def name(self) -> str:
        return self.cls.name

    def with_params(self, overrides: Mapping[str, Any], location: str) -> StepSpec:
        """This step with some parameters replaced (validated; errors name ``location``)."""
        if not overrides:
            return self
        data = {**self.params.model_dump(), **overrides}
        try:
            params = self.cls.Params.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(issues_from_validation(exc, location, self.cls)) from None
        return StepSpec(self.cls, params, self.location, self.plugin)


def issues_from_validation(exc: ValidationError, where: str, cls: type) -> list[ConfigIssue]:
    """Turn pydantic errors into ``<where>.<field>: must be in (0, 1], got 1.5``."""
    issues = []
    step_name = where.rsplit(" ", 1)[-1]
    for err in map(with_item_path, exc.errors()):
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else ""
        # `pipeline[0] top_p: ...` for the field named like the step; its items keep their path.
        shown = loc[1:] if field == step_name else loc
        suffix = "." + ".".join(shown) if shown else ""
        location = clip(where + suffix, 160)
        issues.append(ConfigIssue(location, message_for(err, cls.Params.model_fields.get(field), list(cls.Params.model_fields))))
    return issues


def message_for(err: Mapping[str, Any], field: Any, known: list[str]) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        return f"unknown parameter {short_repr(name)}{did_you_mean(name, known)} Parameters: {', '.join(known) or '(none)'}"
    if kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value)):
        return f"must be a finite number, got {short_repr(value)}"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        bound = _range_text(field) if field is not None else "in range"
        if bound == "in range":             # a constraint on a list item: pydantic names the bound
            symbol = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
            limit = next(iter((err.get("ctx") or {}).values()), None)
            bound = f"{symbol} {_num(limit)}" if isinstance(limit, (int, float)) else bound
        return f"must be {bound}, got {short_repr(value)}"
    if kind == "missing":
        return "is required"
    msg = err["msg"].removeprefix("Value error, ")
    text = f"{msg[0].lower()}{msg[1:]}"
    return f"{text} ({short_repr(value)})" if "got" in text else f"{text}, got {short_repr(value)}"


def field_bounds(field: Any) -> tuple[float | None, bool, float | None, bool]:
    """A pydantic field's declared range as ``(low, low_open, high, high_open)`` (``None``: unbounded
    on that side; ``*_open``: the bound itself is excluded, ``gt``/``lt``)."""
    lo = hi = None
    lo_open = hi_open = False
    for meta in getattr(field, "metadata", []):
        for attr, is_lo, is_open in (("gt", True, True), ("ge", True, False), ("lt", False, True), ("le", False, False)):
            v = getattr(meta, attr, None)
            if v is not None:
                if is_lo:
                    lo, lo_open = v, is_open
                else:
                    hi, hi_open = v, is_open
    return lo, lo_open, hi, hi_open


def _range_text(field: Any) -> str:
    lo, lo_open, hi, hi_open = field_bounds(field)
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return "in range"


def _num(value: float | int) -> str:
    """``1.0`` -> ``1``, ``0.5`` -> ``0.5``, ``2**63`` -> ``2**63``."""
    if isinstance(value, int):
        return "2**63" if value == 2**63 else str(value)
    return f"{value:g}"


def with_item_path(err: Mapping[str, Any]) -> Mapping[str, Any]:
    """A strict-type error (:mod:`samplerkit.strict`) located at the list item or mapping key
    inside its field, with that item as the value, as pydantic locates its own item errors."""
    ctx = err.get("ctx") or {}
    if "path" not in ctx:
        return err
    return {**err, "loc": (*err["loc"], *ctx["path"]), "input": ctx["value"]}
