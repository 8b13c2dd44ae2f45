"""The one declaration of a step's parameters: a pydantic model.

Validation messages, the ``samplerkit plugins`` listing and the JSON Schema all derive from
these classes, so they cannot drift from the checks. Every field's default is its *neutral*
value: a row whose parameters are all defaults is left unchanged by the step.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from samplerkit.strict import check_strict

#: The float32 range the packed ``[B]`` parameter tensors hold (steps compute in float32).
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38      # smallest normal float32


class StepParams(BaseModel):
    """Base class for processor, sampler and backend parameters.

    ``extra="forbid"`` rejects unknown keys; ``allow_inf_nan=False`` rejects NaN and
    infinities for every float field; ``frozen`` makes a validated config immutable; numbers
    and booleans are strict (``"50"``, ``true`` or ``50.0`` is not an integer) and integers fit
    in int64.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """No str/bool/float -> int (or str/bool -> float) coercion; ints within int64
        (:mod:`samplerkit.strict`)."""
        return check_strict(value, cls.model_fields[info.field_name].annotation)

    @field_validator("*", mode="after")
    @classmethod
    def _fits_tensors(cls, value: Any) -> Any:
        """Every float must survive packing into a float32 tensor unchanged in kind: ``1e300``
        would become ``inf`` and ``1e-300`` would become ``0`` (a temperature of ``inf`` turns
        ``-inf`` logits into NaN; a repetition penalty of ``0`` divides by zero). Integers are
        held to int64 before validation, by :func:`samplerkit.strict.check_strict`."""
        for number in _numbers(value):
            if isinstance(number, bool):
                continue
            if isinstance(number, float) and number != 0.0 and not FLOAT32_TINY <= abs(number) <= FLOAT32_MAX:
                raise PydanticCustomError(
                    "float32_range", "must be 0 or of magnitude in [1.2e-38, 3.4e38] (the float32 range the steps compute in)")
        return value

    def is_neutral(self) -> bool:
        """True when every field equals its default, i.e. the step leaves this row unchanged.

        A step without parameters is never neutral: nothing can switch it off, so it always
        runs. Steps whose neutral set is larger (``top_k >= V``) override this.
        """
        fields = type(self).model_fields
        return bool(fields) and all(getattr(self, name) == field.get_default(call_default_factory=True)
                   for name, field in fields.items())

    @classmethod
    def describe_fields(cls) -> list[dict[str, Any]]:
        """One dict per field for listings: name, type, default, constraints, description."""
        schema = cls.model_json_schema()
        props = schema.get("properties", {})
        out = []
        for name, field in cls.model_fields.items():
            prop = props.get(name, {})
            constraints = []
            for key, sym in (("exclusiveMinimum", ">"), ("minimum", ">="),
                             ("exclusiveMaximum", "<"), ("maximum", "<=")):
                if key in prop:
                    constraints.append(f"{sym} {prop[key]}")
            out.append({
                "name": name,
                "type": _type_name(prop),
                "default": field.get_default(call_default_factory=True),
                "constraints": ", ".join(constraints),
                "description": field.description or "",
            })
        return out


class NoParams(StepParams):
    """A step without parameters."""


def _type_name(prop: dict[str, Any]) -> str:
    if "type" in prop:
        t = prop["type"]
        if t == "array" and "items" in prop:
            return f"list[{_type_name(prop['items'])}]"
        return str(t)
    if "anyOf" in prop:
        return " | ".join(_type_name(p) for p in prop["anyOf"])
    if "enum" in prop:
        return " | ".join(repr(v) for v in prop["enum"])
    return "any"


def _numbers(value: Any, depth: int = 0):
    """The numbers in ``value``, a number or (nested) list/tuple/set/dict of them."""
    if isinstance(value, (int, float)):
        yield value
    elif depth < 8 and isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _numbers(item, depth + 1)
    elif depth < 8 and isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(key, depth + 1)
            yield from _numbers(item, depth + 1)
