"""Strict numbers and booleans for parameter models, and the 64-bit integer range.

pydantic's lax mode turns ``"50"``, ``true`` and ``50.0`` into the integer 50 and ``"yes"`` into
``True``: a typo or a quoting slip in a config silently becomes a different value. Its strict
mode goes further than a config needs (it refuses a tuple for a list, and the string keys every
JSON object has for an integer-keyed mapping). :func:`check_strict` refuses exactly the lossy
scalar coercions:

* an ``int`` field takes an ``int`` only (not a bool, a string or a float: ``50.0`` is refused);
* a ``float`` field takes an ``int`` or a ``float`` (YAML's ``top_p: 1`` is an int), not a bool
  or a string;
* a ``bool`` field takes ``true`` or ``false`` only;

inside lists, tuples and mapping values too. Every integer, mapping keys included, must also lie
in the signed 64-bit range ``[-2**63, 2**63)``: token ids and counts become int64 tensors, and a
larger value would pass validation only to fail in the middle of a run.
"""

from __future__ import annotations

import os
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, StringConstraints, ValidationInfo
from pydantic_core import PydanticCustomError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_strict(value: Any, annotation: Any) -> Any:
    """``value`` unchanged if it fits ``annotation`` without a lossy coercion; else a pydantic
    ``strict_type`` / ``int64_range`` error whose context holds ``path`` (the item's index or
    key inside the field, pydantic's own location style) and the offending ``value``."""
    problem = _problem(value, annotation)
    if problem is not None:
        kind, text, path, bad = problem
        raise PydanticCustomError(kind, text, {"path": tuple(path), "value": bad})
    return value


Problem = tuple[str, str, list[Any], Any]      # kind, message, path inside the field, offending value


def _problem(value: Any, annotation: Any) -> Problem | None:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _problem(value, get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        problems = [_problem(value, arg) for arg in get_args(annotation)]
        return None if any(p is None for p in problems) else next(p for p in problems if p is not None)
    if annotation is type(None):
        return None if value is None else ("strict_type", "input should be null", [], value)
    if origin is Literal or annotation is Any:
        return _range_problem(value)
    if annotation is bool:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return "strict_type", "input should be true or false", [], value
        return None
    if annotation is int:
        if isinstance(value, (bool, float, str)):
            return "strict_type", f"input should be an integer, not {_kind(value)}", [], value
        return _range_problem(value)
    if annotation is float:
        if isinstance(value, (bool, str)):
            return "strict_type", f"input should be a number, not {_kind(value)}", [], value
        return _range_problem(value)
    args = get_args(annotation)
    if origin in (list, tuple, set, frozenset) and args and isinstance(value, (list, tuple, set, frozenset)):
        item_types = args if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis) else (args[0],) * len(value)
        for index, (item, item_type) in enumerate(zip(value, item_types)):
            problem = _problem(item, item_type)
            if problem is not None:
                return problem[0], problem[1], [index, *problem[2]], problem[3]
        return None
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        for key, item in value.items():
            # Keys stay lax (a JSON object's keys are strings) but must fit int64.
            problem = _range_problem(key) or _problem(item, args[1])
            if problem is not None:
                return problem[0], problem[1], [key, *problem[2]], problem[3]
        return None
    return _range_problem(value)


def _range_problem(value: Any) -> Problem | None:
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        return "int64_range", "must lie in the 64-bit integer range [-2**63, 2**63)", [], value
    return None


def _kind(value: Any) -> str:
    return {bool: "true/false", str: "a string", float: "a float"}.get(type(value), type(value).__name__)


def _check_device(value: str) -> str:
    """A torch device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``): its syntax is checked when
    the config is validated; whether the machine has that device is checked when the backend
    starts (:func:`samplerkit.backend.resolve_device`), so a GPU config validates anywhere."""
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise PydanticCustomError("device", "not a torch device name; use 'cpu', 'cuda', 'cuda:1', 'mps', ...") from None
    return value


#: The type of a backend's ``device`` parameter.
TorchDevice = Annotated[str, AfterValidator(_check_device)]


#: The pydantic validation-context key holding the directory relative paths are read from:
#: the directory of the YAML file the parameters came from (:func:`samplerkit.config.resolve`
#: passes it). Without it (a mapping, a library call, a batch line) paths are relative to the
#: working directory.
CONFIG_DIR = "samplerkit_config_dir"


def _anchor_path(value: str, info: ValidationInfo) -> str:
    """``~`` expanded, then a relative path joined to the config file's directory (or the working
    directory), so the parameter holds the path that is read and messages can name it."""
    base = (info.context or {}).get(CONFIG_DIR)
    path = os.path.expanduser(value)
    return os.path.abspath(path if base is None else os.path.join(base, path))


#: The type of a step parameter that names a file (``json_schema: {file: ...}``): a relative
#: path in a YAML file is relative to that file's directory.
ConfigPath = Annotated[str, StringConstraints(min_length=1), AfterValidator(_anchor_path)]
