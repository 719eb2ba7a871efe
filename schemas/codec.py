"""Avro single-object encoding of Nexus records.

Each value is ``C3 01`` + the 8-byte little-endian CRC-64-AVRO fingerprint of the
writer schema's parsing canonical form + the Avro binary body, so any Avro
implementation holding the ``.avsc`` files can decode it without a registry.

Schemas live in ``schemas/avro/<Name>.v<N>.avsc``. The highest version of each
record is the one written; every version is known by fingerprint for reading,
and records written with an older or newer version are resolved to the
current reader schema by Avro's schema-resolution rules.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from collections.abc import Mapping

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form
from nexus.errors import NexusError

MAGIC = b"\xc3\x01"
HEADER_SIZE = 10
SCHEMA_DIR = Path(__file__).parent / "avro"
NAMESPACE = "nexus.inference"
_FILE_NAME = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\.v(?P<version>\d+)\.avsc$")


class SchemaError(NexusError, ValueError):
    """Base class of codec errors: the bytes or the value do not fit a known schema."""


class NotAvroError(SchemaError):
    """The bytes do not start with the single-object encoding header."""


class UnknownSchemaError(SchemaError):
    """The fingerprint names a schema that is not in ``schemas/avro``."""


class MalformedRecordError(SchemaError):
    """The header is right but the body does not decode with its schema."""


class InvalidValueError(SchemaError):
    """A value to encode does not match the schema (missing field, wrong type)."""


@dataclass(frozen=True)
class SchemaVersion:
    name: str
    version: int
    fingerprint: bytes
    schema: dict[str, Any]
    canonical: str


class Codec:
    """Encodes and decodes Nexus records; knows every schema version by fingerprint."""

    def __init__(self, versions: list[SchemaVersion], pin: Mapping[str, int] | None = None) -> None:
        """``pin`` makes this the codec of an application built for older versions: it reads and
        writes ``{name: version}`` instead of the highest, and still reads newer writers' records
        (resolved down to the pinned version) as long as it holds their ``.avsc`` files."""
        self._by_fingerprint = {v.fingerprint: v for v in versions}
        self._current: dict[str, SchemaVersion] = {}
        for v in sorted(versions, key=lambda v: v.version):
            self._current[v.name] = v
        for name, version in (pin or {}).items():
            pinned = [v for v in versions if v.name == name and v.version == version]
            if not pinned:
                known = sorted(v.version for v in versions if v.name == name)
                raise UnknownSchemaError(f"cannot pin {name} to v{version}: known versions {known}")
            self._current[name] = pinned[0]

    @classmethod
    def from_directory(cls, directory: Path = SCHEMA_DIR, pin: Mapping[str, int] | None = None) -> Codec:
        return cls(load_versions(directory), pin)

    @property
    def versions(self) -> list[SchemaVersion]:
        return list(self._by_fingerprint.values())

    def current(self, name: str) -> SchemaVersion:
        try:
            return self._current[name]
        except KeyError:
            raise UnknownSchemaError(
                f"no schema named {name!r}; known: {sorted(self._current)}"
            ) from None

    def encode(self, name: str, value: dict[str, Any]) -> bytes:
        """Encode ``value`` with the current version of record ``name``."""
        writer = self.current(name)
        out = io.BytesIO()
        out.write(MAGIC)
        out.write(writer.fingerprint)
        try:
            fastavro.schemaless_writer(out, writer.schema, value)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise InvalidValueError(f"value does not fit {name} v{writer.version}: {exc}") from None
        return out.getvalue()

    def decode(self, data: bytes, expected: str | None = None) -> tuple[str, dict[str, Any]]:
        """Decode single-object-encoded ``data``; return ``(record name, value)``.

        With ``expected``, a record of another type is an error.
        """
        writer = self.writer_of(data)
        if expected is not None and writer.name != expected:
            raise UnknownSchemaError(f"expected a {expected} record, got {writer.name}")
        reader = self._current[writer.name]
        body = io.BytesIO(data[HEADER_SIZE:])
        try:
            value = fastavro.schemaless_reader(
                body,
                writer.schema,
                reader.schema if reader is not writer else None,
            )
        except Exception as exc:  # fastavro raises many kinds on garbage
            raise MalformedRecordError(
                f"{writer.name} v{writer.version} body does not decode: {type(exc).__name__}: {exc}"
            ) from None
        if body.tell() != len(data) - HEADER_SIZE:
            raise MalformedRecordError(
                f"{writer.name} v{writer.version} body has "
                f"{len(data) - HEADER_SIZE - body.tell()} trailing bytes"
            )
        return writer.name, value  # type: ignore[return-value]

    def writer_of(self, data: bytes) -> SchemaVersion:
        """The schema version that wrote ``data``, from its header."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise NotAvroError(f"expected bytes, got {type(data).__name__}")
        if len(data) < HEADER_SIZE or data[:2] != MAGIC:
            raise NotAvroError(
                "not Avro single-object encoding (expected header C3 01 + 8-byte fingerprint)"
            )
        fp = bytes(data[2:HEADER_SIZE])
        try:
            return self._by_fingerprint[fp]
        except KeyError:
            raise UnknownSchemaError(
                f"unknown schema fingerprint {fp.hex()}: not one of the schemas in schemas/avro"
            ) from None


def load_versions(directory: Path = SCHEMA_DIR) -> list[SchemaVersion]:
    """Parse every ``<Name>.v<N>.avsc``, inlining references to other named types."""
    raw: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted(directory.glob("*.avsc")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise SchemaError(f"{path}: schema files must be named <Name>.v<N>.avsc")
        schema = json.loads(path.read_text())
        if schema.get("name") != match["name"]:
            raise SchemaError(f"{path}: file name does not match record name {schema.get('name')!r}")
        raw[(match["name"], int(match["version"]))] = schema
    # Named types referenced by full name resolve to their latest version.
    latest: dict[str, dict[str, Any]] = {}
    for (name, _), schema in sorted(raw.items(), key=lambda kv: kv[0][1]):
        latest[f"{schema.get('namespace', NAMESPACE)}.{name}"] = schema
    versions = []
    for (name, version), schema in raw.items():
        expanded = _inline(schema, latest, set())
        canonical = to_parsing_canonical_form(expanded)
        # fastavro renders the CRC-64-AVRO as hex of its little-endian bytes, as the header wants.
        fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
        versions.append(
            # Parsed once, with fastavro's marker: without it every encode and decode parses again.
            SchemaVersion(name, version, fp, cast(dict[str, Any], parse_schema(expanded)), canonical)  # a record: a dict
        )
    return versions


def _inline(node: Any, named: dict[str, dict[str, Any]], seen: set[str]) -> Any:
    if isinstance(node, str):
        if node in named and node not in seen:
            seen.add(node)
            return _inline(named[node], named, seen)
        return node
    if isinstance(node, list):
        return [_inline(n, named, seen) for n in node]
    if isinstance(node, dict):
        if node.get("type") == "record":
            seen.add(f"{node.get('namespace', NAMESPACE)}.{node['name']}")
        return {k: (_inline(v, named, seen) if k in ("type", "fields", "items", "values") else v)
                for k, v in node.items()}
    return node
