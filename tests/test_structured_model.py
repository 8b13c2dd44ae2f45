"""Constrained decoding on the default model (SmolLM2-135M-Instruct): a corpus of JSON schemas,
regexes and grammars, all rows of ONE generation call (each row its own constraint), each at
temperature 1.0 with top_p 0.95 and at greedy. Every output must parse and validate."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from samplerkit import Generator
from samplerkit.registry import default_registry

pytest.importorskip("llguidance")
pytestmark = [pytest.mark.slow]

REGISTRY = default_registry()
SMALL = {"type": "integer", "minimum": -9, "maximum": 9}

# Schemas whose valid outputs are short (bounded strings, numbers and arrays; closed objects),
# so every row completes within MAX_NEW_TOKENS and a row that does not is a real failure.
SCHEMAS = [
    {"type": "integer", "minimum": 0, "maximum": 100},
    {"type": "boolean"},
    {"type": "null"},
    {"enum": ["red", "green", "blue"]},
    {"enum": [2, 3, 5, 7]},
    {"enum": [1, "one", True, None]},
    {"enum": ["New York", "Los Angeles"]},
    {"const": "yes"},
    {"type": "string", "maxLength": 8},
    {"type": "string", "minLength": 2, "maxLength": 5},
    {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
    {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 2},
    {"type": "array", "items": {"type": "array", "items": SMALL, "maxItems": 2}, "maxItems": 2},
    {"type": "array", "prefixItems": [{"type": "string", "maxLength": 5}, {"type": "integer", "minimum": 0, "maximum": 50}],
     "items": False, "minItems": 2},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}}, "required": ["name"],
     "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}}, "additionalProperties": False},
    {"type": "object", "properties": {"status": {"enum": ["ok", "error"]}, "code": {"type": "integer", "minimum": 100,
                                                                                  "maximum": 599}},
     "required": ["status", "code"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"}, "v": SMALL}, "required": ["kind", "v"],
     "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
                                                                                     "maximum": 999}},
                                               "required": ["id"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 4}]},
    {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
    {"anyOf": [{"type": "object", "properties": {"a": SMALL}, "required": ["a"], "additionalProperties": False},
               {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"],
                "additionalProperties": False}]},
    {"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 20}]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": SMALL, "y": SMALL}, "required": ["x", "y"],
                      "additionalProperties": False}}, "$ref": "#/$defs/pt"},
    {"$defs": {"pt": {"type": "object", "properties": {"x": SMALL}, "required": ["x"], "additionalProperties": False}},
     "type": "array", "items": {"$ref": "#/$defs/pt"}, "minItems": 1, "maxItems": 2},
    {"$defs": {"color": {"enum": ["red", "blue"]}}, "type": "object",
     "properties": {"fg": {"$ref": "#/$defs/color"}, "bg": {"$ref": "#/$defs/color"}}, "required": ["fg", "bg"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "items": {"type": "array", "items": SMALL,
                                                                          "maxItems": 2}},
     "required": ["ok", "items"], "additionalProperties": False},
]
REGEXES = [r"[0-9]{3}", r"(yes|no)", r"[A-Z][a-z]{2,8}", r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"#[0-9a-f]{6}",
           r"(Paris|Rome|Berlin) is in (France|Italy|Germany)\."]
GRAMMARS = [  # (step parameters, a Python regex for the same language)
    ({"lark": 'start: "(" NUM ("+" NUM)? ")"\nNUM: /[0-9]{1,2}/'}, r"\([0-9]{1,2}(\+[0-9]{1,2})?\)"),
    ({"gbnf": 'root ::= ("yes" | "no") "."'}, r"(yes|no)\."),
    ({"lark": 'start: WORD ("," WORD)?\nWORD: /[a-z]{1,6}/'}, r"[a-z]{1,6}(,[a-z]{1,6})?"),
]
CHOICES = ["Paris", "London", "Rome"]
MAX_NEW_TOKENS = 48


def _rows():
    rows, checks = [], []
    for s in SCHEMAS:
        rows.append({"json_schema": {"schema": s}})
        checks.append(lambda text, s=s: jsonschema.validate(json.loads(text), s))
    for r in REGEXES:
        rows.append({"regex": {"pattern": r}})
        checks.append(lambda text, r=r: _fullmatch(r, text))
    for params, r in GRAMMARS:
        rows.append({"grammar": params})
        checks.append(lambda text, r=r: _fullmatch(r, text))
    rows.append({"choice": {"options": CHOICES}})
    checks.append(lambda text: _fullmatch("|".join(CHOICES), text))
    return rows, checks


def _fullmatch(pattern, text):
    assert re.fullmatch(pattern, text), f"{text!r} does not match {pattern!r}"


@pytest.fixture(scope="module")
def llama():
    from samplerkit.builtins.backends.llama import LlamaBackend

    return LlamaBackend()


def test_every_output_of_the_default_model_validates(llama):
    """One generate call: every constraint twice, once sampled at temperature 1.0 with top_p 0.95
    and once greedy (a row's temperature 0 keeps only its top logit, lowest id among ties: what
    the greedy sampler picks)."""
    rows, checks = _rows()
    assert len(SCHEMAS) >= 30
    pipeline = [{"json_schema": {"whitespace_flexible": False}}, {"regex": {}}, {"grammar": {}}, {"choice": {}},
                {"temperature": 1.0}, {"top_p": 0.95}]
    greedy = [{**row, "temperature": {"temperature": 0.0}} for row in rows]
    gen = Generator({"backend": "llama", "pipeline": pipeline, "sampler": {"name": "categorical", "seed": 7},
                     "generation": {"max_new_tokens": MAX_NEW_TOKENS}}, backend=llama, registry=REGISTRY)
    prompts = ["Answer:"] * (2 * len(rows))      # short: the prefill of 84 rows is a large part of the cost
    out = gen.generate(prompts, rows=[*rows, *greedy])
    failures = []
    for i, c in enumerate(out):
        mode, row, check = ("greedy" if i >= len(rows) else "T=1.0 top_p=0.95"), rows[i % len(rows)], checks[i % len(rows)]
        try:
            assert c.finish_reason == "stop", f"finish_reason {c.finish_reason!r}"
            check(c.text)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"{mode} {row}: {c.text!r}: {str(exc)[:200]}")
    assert not failures, "\n".join(failures)
