"""The one declaration of a step's parameters: a pydantic model.

Validation messages, the ``samplerkit plugins`` listing and the JSON Schema all derive from
these classes, so they cannot drift from the checks. Every field's default is its *neutral*
value: a row whose parameters are all defaults is left unchanged by the step.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from samplerkit.strict import check_strict


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

    def is_neutral(self) -> bool:
        """True when every field equals its default, i.e. the step leaves this row unchanged.

        Steps whose neutral set is larger (``top_k >= V``) override this.
        """
        return all(getattr(self, name) == field.get_default(call_default_factory=True)
                   for name, field in type(self).model_fields.items())

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
