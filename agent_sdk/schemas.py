"""Semantic contracts: the schema language of registered event kinds (pure).

A documented subset of JSON Schema, chosen because agents and people already know
it and it says what bodies mean field by field, while the subset stays small enough
to implement again from protocol.md section 8.15 (no ``$ref``, no combinators, no
formats: a schema is a tree checked in one pass). Keywords:

* ``type``: ``object``, ``array``, ``string``, ``integer``, ``number``, ``boolean``,
  ``null`` or ``bytes`` (msgpack bin), or a list of those;
* objects: ``properties`` (name -> schema), ``required`` (names),
  ``additionalProperties`` (bool, default true);
* arrays: ``items`` (one schema for every item), ``minItems``, ``maxItems``;
* strings and bytes: ``minLength``, ``maxLength``; numbers: ``minimum``, ``maximum``;
* any: ``enum`` (a list of allowed values, compared by their canonical bytes: ``true``
  is not ``1``, nor ``1.0``), ``description`` (ignored).

:func:`check_schema` refuses anything else, naming the path; :func:`errors` lists
where a value breaks a schema, as ``$.items[2].price: ...`` paths.
"""

from __future__ import annotations

from typing import Any

from agent_sdk.wire import canonical

TYPES = ("object", "array", "string", "integer", "number", "boolean", "null", "bytes")
KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "minItems",
        "maxItems", "minLength", "maxLength", "minimum", "maximum", "enum", "description",
    }
)  # fmt: skip
MAX_DEPTH = 32
MAX_ERRORS = 8


class SchemaError(ValueError):
    """A schema that is not one of the subset; the message names the path."""


def check_schema(schema: Any, path: str = "$", depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise SchemaError(f"{path}: nested deeper than {MAX_DEPTH}")
    if not isinstance(schema, dict):
        raise SchemaError(f"{path}: a schema is a map")
    unknown = sorted(set(schema) - KEYWORDS)
    if unknown:
        raise SchemaError(f"{path}: unknown keyword {unknown[0]!r}")
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or not all(isinstance(k, str) and k in TYPES for k in kinds):
            raise SchemaError(f"{path}.type: one or a list of {', '.join(TYPES)}")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise SchemaError(f"{path}.properties: a map of name -> schema")
    for name, sub in properties.items():
        check_schema(sub, f"{path}.properties.{name}", depth + 1)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError(f"{path}.required: a list of names")
    if not isinstance(schema.get("additionalProperties", True), bool):
        raise SchemaError(f"{path}.additionalProperties: true or false")
    if "items" in schema:
        check_schema(schema["items"], f"{path}.items", depth + 1)
    for bound in ("minItems", "maxItems", "minLength", "maxLength"):
        value = schema.get(bound, 0)
        if type(value) is not int or value < 0:
            raise SchemaError(f"{path}.{bound}: a whole number")
    for bound in ("minimum", "maximum"):
        value = schema.get(bound, 0)
        if type(value) not in (int, float):
            raise SchemaError(f"{path}.{bound}: a number")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise SchemaError(f"{path}.enum: a list of values")
    if "description" in schema and not isinstance(schema["description"], str):
        raise SchemaError(f"{path}.description: text")


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, list):
        return "array"
    return "object"


def errors(schema: dict[str, Any], value: Any, path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (a checked one), at most ``MAX_ERRORS``."""
    found: list[str] = []
    _walk(schema, value, path, found)
    return found[:MAX_ERRORS]


def _walk(schema: dict[str, Any], value: Any, path: str, found: list[str]) -> None:
    if len(found) >= MAX_ERRORS:
        return
    actual = _type_of(value)
    wanted = schema.get("type")
    if wanted is not None:
        kinds = wanted if isinstance(wanted, list) else [wanted]
        fits = actual in kinds or (actual == "integer" and "number" in kinds)
        if not fits:
            found.append(f"{path}: expected {' or '.join(kinds)}, got {actual}")
            return
    if "enum" in schema and not _allowed(value, schema["enum"]):
        found.append(f"{path}: not one of the allowed values")
    if actual == "object":
        for name in schema.get("required", []):
            if name not in value:
                found.append(f"{path}.{name}: required")
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                _walk(properties[name], item, f"{path}.{name}", found)
            elif not schema.get("additionalProperties", True):
                found.append(f"{path}.{name}: not allowed here")
    elif actual == "array":
        if len(value) < schema.get("minItems", 0):
            found.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            found.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for n, item in enumerate(value):
                _walk(schema["items"], item, f"{path}[{n}]", found)
    elif actual in ("string", "bytes"):
        if len(value) < schema.get("minLength", 0):
            found.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            found.append(f"{path}: longer than {schema['maxLength']}")
    elif actual in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            found.append(f"{path}: below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            found.append(f"{path}: above {schema['maximum']}")


def _allowed(value: Any, allowed: list[Any]) -> bool:
    """Whether ``value`` is one of ``allowed`` by its canonical bytes, as another
    implementation compares: Python's ``==`` would take ``true`` for ``1`` and ``1.0``
    for ``1`` (protocol 8.15)."""
    encoded = canonical(value)
    return any(canonical(option) == encoded for option in allowed)
