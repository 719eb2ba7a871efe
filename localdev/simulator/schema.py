"""JSON schemas the way Ollama 0.17.4 takes them in ``format``: which ones it accepts, and an instance.

Ollama turns a schema into a llama.cpp grammar (``common/json-schema-to-grammar.cpp`` in its Go
module) and the model can then only write JSON that fits. A schema that converter cannot read is
Ollama's HTTP 500 ``{"error": "invalid JSON schema in format"}``. So that the simulator refuses what
the real server refuses, :func:`schema_problem` walks a schema with the converter's own checks, in
its order; :func:`minimal_instance` then answers like constrained decoding would: a small value that
validates. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeGuard

from nexus.errors import NexusError

JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object", "null"})
STRING_FORMATS = frozenset({"date", "time", "date-time"})
"""The string formats the converter has a grammar for (besides ``uuid``, ``uuid1``..``uuid5``)."""

SIMULATED_STRING = "simulated"
"""Every free string of an instance says where it comes from, like the text answers do."""

_FORMAT_VALUES = {
    "date": "2000-01-01",
    "time": "00:00:00Z",
    "date-time": "2000-01-01T00:00:00Z",
}
_NIL_UUID = "00000000-0000-0000-0000-000000000000"
_MAX_DEPTH = 32  # a schema nested deeper than this is answered with null rather than recursing on
_ALL_PROPERTIES_DEPTH = 6  # below this depth optional properties are left out: recursive $refs end


class SchemaProblem(NexusError, ValueError):
    """A schema the grammar converter cannot read (Ollama: 500 "invalid JSON schema in format")."""


def schema_problem(schema: Any) -> str | None:
    """Why Ollama would refuse ``schema`` as a ``format``, or None when it takes it.

    The reason is for the simulator's log and tests; Ollama's answer is always the same
    ``invalid JSON schema in format``.
    """
    try:
        _Checker(schema).visit(schema, 0)
    except SchemaProblem as exc:
        return str(exc)
    return None


def minimal_instance(schema: Mapping[str, Any]) -> Any:
    """A small value valid against ``schema`` (one Ollama takes, see :func:`schema_problem`).

    Objects carry every property, required first as the grammar writes them (a client parsing the
    answer into a typed model sees each field filled); strings say ``simulated`` (or the shape their
    ``format`` asks for); numbers are 0 or the nearest allowed bound; booleans false; arrays hold
    one item (or ``minItems``); an enum or ``const`` gives its first value; unions their first
    branch. ``pattern`` is not honoured (the simulator does not invert regular expressions).
    """
    return _Instance(schema).of(schema, 0)


# --------------------------------------------------------------------------- references


def resolve_ref(root: Any, ref: Any) -> Any:
    """The subschema a local ``$ref`` ("#/$defs/Name") points at; SchemaProblem if none.

    Ollama reads no remote references, so only ``#...`` JSON pointers resolve.
    """
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise SchemaProblem(f"unsupported ref {ref!r}")
    node = root
    for raw in ref[1:].split("/")[1:] if ref != "#" else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise SchemaProblem(f"error resolving ref {ref}: {part!r} not in schema")
    return node


def _schema_type(schema: Mapping[str, Any]) -> Any:
    return schema.get("type")


def _has_object_shape(schema: Mapping[str, Any]) -> bool:
    """The converter builds an object rule for these (properties, or a non-trivial additionalProperties)."""
    return _schema_type(schema) in (None, "object") and (
        "properties" in schema
        or ("additionalProperties" in schema and schema["additionalProperties"] is not True)
    )


def _has_array_shape(schema: Mapping[str, Any]) -> bool:
    return _schema_type(schema) in (None, "array") and ("items" in schema or "prefixItems" in schema)


def _is_uuid_format(value: str) -> bool:
    return value == "uuid" or (len(value) == 5 and value.startswith("uuid") and value[4] in "12345")


# --------------------------------------------------------------------------- acceptance


class _Checker:
    """Mirror of the converter's ``visit``: the same branches in the same order."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.seen_refs: set[str] = set()

    def visit(self, schema: Any, depth: int) -> None:
        if not isinstance(schema, Mapping):
            raise SchemaProblem(f"unrecognized schema: {schema!r}")
        if depth > _MAX_DEPTH:
            return
        kind = _schema_type(schema)
        fmt = schema.get("format", "")
        if not isinstance(fmt, str):
            raise SchemaProblem("'format' of a schema must be a string")
        if "$ref" in schema:
            self._visit_ref(schema["$ref"], depth)
        elif "oneOf" in schema or "anyOf" in schema:
            branches = schema.get("oneOf", schema.get("anyOf"))
            if not isinstance(branches, list):
                raise SchemaProblem("oneOf/anyOf must be a list of schemas")
            for branch in branches:
                self.visit(branch, depth + 1)
        elif isinstance(kind, list):
            for one in kind:
                self.visit({**schema, "type": one}, depth + 1)
        elif "const" in schema or "enum" in schema:
            return
        elif _has_object_shape(schema):
            self._visit_object(schema, depth)
        elif kind in (None, "object", "string") and "allOf" in schema:
            self._visit_all_of(schema["allOf"], depth)
        elif _has_array_shape(schema):
            items = schema.get("items", schema.get("prefixItems"))
            for item in items if isinstance(items, list) else [items]:
                self.visit(item, depth + 1)
        elif kind in (None, "string") and ("pattern" in schema or _is_uuid_format(fmt) or fmt in STRING_FORMATS):
            return
        elif not schema or kind == "object":
            return
        elif not isinstance(kind, str) or kind not in JSON_TYPES:
            raise SchemaProblem(f"unrecognized schema: {dict(schema)!r}")

    def _visit_ref(self, ref: Any, depth: int) -> None:
        target = resolve_ref(self.root, ref)
        if ref in self.seen_refs:  # the converter names a rule once; recursion is fine
            return
        self.seen_refs.add(ref)
        self.visit(target, depth + 1)

    def _visit_object(self, schema: Mapping[str, Any], depth: int) -> None:
        properties = schema.get("properties", {})
        if not isinstance(properties, Mapping):
            raise SchemaProblem("'properties' must be an object")
        for value in properties.values():
            self.visit(value, depth + 1)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping) and extra:
            self.visit(extra, depth + 1)

    def _visit_all_of(self, parts: Any, depth: int) -> None:
        if not isinstance(parts, list):
            raise SchemaProblem("allOf must be a list of schemas")
        for part in parts:
            if not isinstance(part, Mapping):
                raise SchemaProblem(f"unrecognized schema in allOf: {part!r}")
            if "$ref" in part:
                self._visit_ref(part["$ref"], depth)
            elif isinstance(part.get("properties"), Mapping):
                for value in part["properties"].values():
                    self.visit(value, depth + 1)


# --------------------------------------------------------------------------- instances


class _Instance:
    """Builds the instance, following the same branch order as the checker."""

    def __init__(self, root: Any) -> None:
        self.root = root

    def of(self, schema: Any, depth: int) -> Any:  # noqa: PLR0911 - one return per branch reads best
        if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
            return None
        kind = _schema_type(schema)
        if "$ref" in schema:
            return self.of(resolve_ref(self.root, schema["$ref"]), depth + 1)
        if "oneOf" in schema or "anyOf" in schema:
            branches = schema.get("oneOf", schema.get("anyOf")) or [{}]
            return self.of(branches[0], depth + 1)
        if isinstance(kind, list):
            chosen = next((t for t in kind if t != "null"), "null") if kind else None
            return self.of({**schema, "type": chosen}, depth + 1)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            values = schema["enum"]
            return values[0] if isinstance(values, list) and values else None
        if _has_object_shape(schema):
            return self._object(schema, depth)
        if kind in (None, "object", "string") and "allOf" in schema:
            return self._all_of(schema["allOf"], depth)
        if _has_array_shape(schema):
            return self._array(schema, depth)
        if kind == "string" or (kind is None and ("pattern" in schema or "format" in schema)):
            return _string(schema)
        if kind in ("integer", "number"):
            return _number(schema, integer=kind == "integer")
        if kind == "boolean":
            return False
        if kind == "null":
            return None
        if kind == "array":
            return []
        return {}

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        properties: Mapping[str, Any] = schema.get("properties") or {}
        required = [r for r in schema.get("required") or [] if isinstance(r, str) and r in properties]
        names = required + [n for n in properties if n not in required]
        if depth >= _ALL_PROPERTIES_DEPTH:
            names = required
        instance = {name: self.of(properties[name], depth + 1) for name in names}
        # A name required but not described gets whatever additionalProperties allows.
        extra = schema.get("additionalProperties")
        for name in schema.get("required") or []:
            if isinstance(name, str) and name not in instance and extra is not False:
                instance[name] = self.of(extra, depth + 1) if isinstance(extra, Mapping) else SIMULATED_STRING
        return instance

    def _all_of(self, parts: list[Any], depth: int) -> Any:
        merged: dict[str, Any] = {}
        for part in parts:
            value = self.of(part, depth + 1)
            if isinstance(value, dict):
                merged.update(value)
            elif not merged and value is not None:
                return value
        return merged

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        items = schema.get("items", schema.get("prefixItems"))
        if isinstance(items, list):
            return [self.of(item, depth + 1) for item in items]
        count = max(_int(schema.get("minItems"), 0), 1)  # one item shows the shape of the others
        maximum = schema.get("maxItems")
        if isinstance(maximum, int) and not isinstance(maximum, bool):
            count = min(count, maximum)
        return [self.of(items, depth + 1) for _ in range(count)]


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _string(schema: Mapping[str, Any]) -> str:
    """``simulated`` fitted to minLength/maxLength, or a value of the ``format`` the grammar knows."""
    fmt = schema.get("format", "")
    if fmt in _FORMAT_VALUES:
        return _FORMAT_VALUES[fmt]
    if isinstance(fmt, str) and _is_uuid_format(fmt):
        return _NIL_UUID
    text = SIMULATED_STRING
    maximum = schema.get("maxLength")
    if isinstance(maximum, int) and not isinstance(maximum, bool):
        text = text[: max(maximum, 0)]
    return text.ljust(_int(schema.get("minLength"), 0), "x")


def _number(schema: Mapping[str, Any], *, integer: bool) -> int | float:
    """0 when allowed, else the allowed value nearest to it, on a ``multipleOf`` step if one is set."""
    low, high = _bounds(schema, integer=integer)
    step = schema.get("multipleOf")
    step = step if _is_number(step) and step > 0 else (1 if integer else None)
    value: float = 0  # 0 is a multiple of every step
    if low is not None and low > 0:
        value = math.ceil(low / step) * step if step else low
    elif high is not None and high < 0:
        value = math.floor(high / step) * step if step else high
    if integer:
        return int(value)
    return int(value) if float(value).is_integer() else value


def _bounds(schema: Mapping[str, Any], *, integer: bool) -> tuple[float | None, float | None]:
    """The smallest and largest allowed values (exclusive bounds made inclusive), None if open.

    An exclusive bound of a ``number`` moves halfway to the other bound (or by 1 if there is none).
    """
    low_in, high_in, low_ex, high_ex = (
        value if _is_number(value) else None
        for value in (schema.get(key) for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))
    )
    lowest = max((v for v in (low_in, low_ex) if v is not None), default=None)
    highest = min((v for v in (high_in, high_ex) if v is not None), default=None)
    if integer:
        lows = [math.ceil(low_in)] if low_in is not None else []
        lows += [math.floor(low_ex) + 1] if low_ex is not None else []
        highs = [math.floor(high_in)] if high_in is not None else []
        highs += [math.ceil(high_ex) - 1] if high_ex is not None else []
        return max(lows, default=None), min(highs, default=None)
    low = lowest
    if low_ex is not None and low_ex == lowest:
        low = low_ex + ((highest - low_ex) / 2 if highest is not None else 1)
    high = highest
    if high_ex is not None and high_ex == highest:
        high = high_ex - ((high_ex - lowest) / 2 if lowest is not None else 1)
    return low, high


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
