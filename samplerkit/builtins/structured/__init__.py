"""Built-in structured-output plugin: JSON Schema, JSON object, regex, grammar and choice
constraints, on the llguidance engine (the extra ``structured``)."""

from samplerkit.builtins.structured.constraint import (
    BUILTIN_STRUCTURED,
    Choice,
    Constraint,
    Grammar,
    JsonObject,
    JsonSchema,
    Regex,
)
from samplerkit.hookspecs import hookimpl

__all__ = ["BUILTIN_STRUCTURED", "Choice", "Constraint", "Grammar", "JsonObject", "JsonSchema", "Regex",
           "register_processors"]


@hookimpl
def register_processors():
    return list(BUILTIN_STRUCTURED)
