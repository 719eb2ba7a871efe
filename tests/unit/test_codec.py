"""The Avro single-object codec: round trips, the wire format, interop, errors, evolution."""

from __future__ import annotations

import io
import json
import shutil
import struct
from datetime import datetime, timedelta, timezone, UTC
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form

from schemas import (
    Codec,
    InferenceOptions,
    InferenceRequest,
    InferenceResponse,
    InvalidValueError,
    MalformedRecordError,
    ModelContext,
    NotAvroError,
    SchemaError,
    UnknownSchemaError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from schemas.codec import SCHEMA_DIR, load_versions

# --- CRC-64-AVRO, written out from the Avro specification ("Schema Fingerprints") ---

EMPTY = 0xC15D213AA4D7A795
_MASK = 0xFFFFFFFFFFFFFFFF


def _fp_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            # Java: fp = (fp >>> 1) ^ (EMPTY & -(fp & 1L))
            fp = (fp >> 1) ^ (EMPTY & (-(fp & 1) & _MASK))
        table.append(fp)
    return table


FP_TABLE = _fp_table()


def crc64_avro(data: bytes) -> int:
    fp = EMPTY
    for byte in data:
        fp = (fp >> 8) ^ FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


def _latest_file(name: str, directory: Path = SCHEMA_DIR) -> Path:
    """The highest ``<name>.v<N>.avsc``: the version the codec writes."""
    return max(directory.glob(f"{name}.v*.avsc"), key=lambda p: int(p.name.split(".v")[1].split(".")[0]))


def _expanded_schema(name: str) -> dict:
    """The .avsc with the ModelContext reference inlined by hand, as any Avro parser would."""
    context = json.loads((SCHEMA_DIR / "ModelContext.v1.avsc").read_text())
    schema = json.loads(_latest_file(name).read_text())
    for field in schema["fields"]:
        if field["type"] == "nexus.inference.ModelContext":
            field["type"] = context
    return schema


# --- fixtures -------------------------------------------------------------------------

T0 = datetime(2024, 5, 17, 12, 34, 56, 789000, tzinfo=UTC)


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec.from_directory()


def _request(**overrides) -> InferenceRequest:
    fields = dict(
        id="req-1",
        model_id="llama3.1",
        input="Hello, world! Grüße — 你好 — 🚀\n\"quoted\"",
        context=ModelContext(session_id="session123", metadata={"user": "alice", "lang": "en"}),
        options=InferenceOptions(temperature=0.7, max_tokens=256, seed=-(2**63)),
        stream=True,
        created_at=T0,
    )
    fields.update(overrides)
    return InferenceRequest(**fields)


def _response(**overrides) -> InferenceResponse:
    fields = dict(
        id="req-1",
        model_id="mistral",
        status="ok",
        context=ModelContext(session_id="s-ü", metadata={"ключ": "значение"}),
        latency_ms=1234,
        completed_at=T0 + timedelta(milliseconds=1),
        output="Bonjour ✓ 🌍",
        error=None,
        backend_latency_ms=1000,
        endpoint="http://gpu1:11434",
        prompt_tokens=12,
        completion_tokens=34,
        done_reason="stop",
    )
    fields.update(overrides)
    return InferenceResponse(**fields)


# --- round trips ------------------------------------------------------------------------


def test_request_round_trip(codec: Codec) -> None:
    request = _request()
    assert decode_request(codec, encode_request(codec, request)) == request


def test_request_round_trip_empty_metadata_and_unset_options(codec: Codec) -> None:
    request = _request(
        input="",
        context=ModelContext(session_id="s"),
        options=InferenceOptions(),
        stream=False,
    )
    decoded = decode_request(codec, encode_request(codec, request))
    assert decoded == request
    assert decoded.context.metadata == {}
    assert decoded.options == InferenceOptions(None, None, None)


def test_request_options_zero_values_survive(codec: Codec) -> None:
    # 0.0 and 0 are values, not "unset": they must not come back as None.
    request = _request(options=InferenceOptions(temperature=0.0, max_tokens=1, seed=0))
    decoded = decode_request(codec, encode_request(codec, request))
    assert decoded.options == InferenceOptions(temperature=0.0, max_tokens=1, seed=0)


def test_response_round_trip_ok_and_error(codec: Codec) -> None:
    ok = _response()
    assert decode_response(codec, encode_response(codec, ok)) == ok
    failed = _response(
        status="error", output="", error="gpu1 did not answer within 120s", endpoint=None,
        done_reason=None, prompt_tokens=0, completion_tokens=0,
    )
    assert decode_response(codec, encode_response(codec, failed)) == failed


def test_datetimes_keep_millisecond_precision_and_instant(codec: Codec) -> None:
    # A millisecond-precision UTC time comes back identical and tz-aware.
    decoded = decode_request(codec, encode_request(codec, _request(created_at=T0)))
    assert decoded.created_at == T0
    assert decoded.created_at.tzinfo is not None
    assert decoded.created_at.utcoffset() == timedelta(0)
    # Another offset is the same instant.
    plus2 = T0.astimezone(timezone(timedelta(hours=2)))
    assert decode_request(codec, encode_request(codec, _request(created_at=plus2))).created_at == T0
    # Sub-millisecond digits are not kept (timestamp-millis), and never rounded past the ms.
    fine = T0.replace(microsecond=789999)
    assert decode_request(codec, encode_request(codec, _request(created_at=fine))).created_at == T0


def test_json_forms_are_json_serialisable() -> None:
    request_json = _request().to_json()
    assert json.loads(json.dumps(request_json))["created_at"] == T0.isoformat()
    assert request_json["context"] == {"session_id": "session123", "metadata": {"user": "alice", "lang": "en"}}
    response_json = _response().to_json()
    assert json.loads(json.dumps(response_json))["completed_at"] == (T0 + timedelta(milliseconds=1)).isoformat()


# --- wire format -------------------------------------------------------------------------


def test_crc64_avro_implementation_matches_spec_examples() -> None:
    # Values published by Apache Avro's own test suites for these canonical forms.
    assert crc64_avro(b'"int"') == 0x7275D51A3F395C8F == 8247732601305521295
    assert crc64_avro(b'"null"') == 7195948357588979594
    # The single-object header Avro's reference implementation gives for "int".
    assert b"\xc3\x01" + struct.pack("<Q", crc64_avro(b'"int"')) == bytes.fromhex("c3018f5c393f1ad57572")


@pytest.mark.parametrize("name", ["InferenceRequest", "InferenceResponse"])
def test_header_is_magic_plus_little_endian_crc64_of_canonical_form(codec: Codec, name: str) -> None:
    data = (
        encode_request(codec, _request()) if name == "InferenceRequest"
        else encode_response(codec, _response())
    )
    version = codec.current(name)
    assert data[:2] == b"\xc3\x01"
    (header_fp,) = struct.unpack("<Q", data[2:10])
    assert header_fp == crc64_avro(version.canonical.encode("utf-8"))
    assert data[2:10] == version.fingerprint


@pytest.mark.parametrize("name", ["InferenceRequest", "InferenceResponse", "ModelContext"])
def test_canonical_form_is_what_another_avro_parser_computes(codec: Codec, name: str) -> None:
    if name == "ModelContext":
        expected = (
            '{"name":"nexus.inference.ModelContext","type":"record","fields":['
            '{"name":"session_id","type":"string"},'
            '{"name":"metadata","type":{"type":"map","values":"string"}}]}'
        )
        assert codec.current(name).canonical == expected
    else:
        assert codec.current(name).canonical == to_parsing_canonical_form(_expanded_schema(name))


def test_request_and_response_fingerprints_differ(codec: Codec) -> None:
    assert codec.current("InferenceRequest").fingerprint != codec.current("InferenceResponse").fingerprint


# --- interop with a plain Avro implementation holding the .avsc files --------------------


def _plain_fastavro_schema(name: str):
    named: dict = {}
    fastavro.parse_schema(json.loads((SCHEMA_DIR / "ModelContext.v1.avsc").read_text()), named_schemas=named)
    return fastavro.parse_schema(json.loads(_latest_file(name).read_text()), named_schemas=named)


def test_plain_fastavro_decodes_a_nexus_request(codec: Codec) -> None:
    request = _request()
    data = encode_request(codec, request)
    assert struct.unpack("<Q", data[2:10])[0] == crc64_avro(
        to_parsing_canonical_form(_expanded_schema("InferenceRequest")).encode()
    )
    body = io.BytesIO(data[10:])
    value = fastavro.schemaless_reader(body, _plain_fastavro_schema("InferenceRequest"), None)
    assert body.read() == b""
    assert value == {
        "id": "req-1",
        "model_id": "llama3.1",
        "input": request.input,
        "context": {"session_id": "session123", "metadata": {"user": "alice", "lang": "en"}},
        "options": {"temperature": 0.7, "max_tokens": 256, "seed": -(2**63), "top_p": None, "top_k": None,
                    "min_p": None, "stop": [], "num_ctx": None, "repeat_penalty": None, "presence_penalty": None,
                    "frequency_penalty": None, "extra": None},
        "stream": True,
        "created_at": T0,
        "cache": "default",
        "deadline": None,
        "original_id": None,
        "reply_to": None,
        "key_name": None,
        "messages": [],
        "tools": [],
        "tool_choice": None,
        "format": None,
        "keep_alive": None,
        "priority": "interactive",
        "tenant": None,
    }


def test_codec_decodes_a_record_built_by_plain_fastavro(codec: Codec) -> None:
    schema = _plain_fastavro_schema("InferenceResponse")
    header = b"\xc3\x01" + struct.pack(
        "<Q", crc64_avro(to_parsing_canonical_form(_expanded_schema("InferenceResponse")).encode())
    )
    body = io.BytesIO()
    fastavro.schemaless_writer(
        body,
        schema,
        {
            "id": "ext-1",
            "model_id": "mistral",
            "status": "error",
            "error": "boom",
            "latency_ms": 7,
            "context": {"session_id": "s9", "metadata": {"k": "v"}},
            "completed_at": T0,
            # output, backend_latency_ms, endpoint, tokens, done_reason: schema defaults
        },
    )
    response = decode_response(codec, header + body.getvalue())
    assert response == InferenceResponse(
        id="ext-1", model_id="mistral", status="error", context=ModelContext("s9", {"k": "v"}),
        latency_ms=7, completed_at=T0, output="", error="boom", backend_latency_ms=0,
        endpoint=None, prompt_tokens=0, completion_tokens=0, done_reason=None,
    )


# --- typed errors ------------------------------------------------------------------------


def test_error_hierarchy() -> None:
    for cls in (NotAvroError, UnknownSchemaError, MalformedRecordError, InvalidValueError):
        assert issubclass(cls, SchemaError)
        assert issubclass(cls, ValueError)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc3", b"\xc3\x01\x00", b'{"id": "json, not avro"}', b"\x00" * 32, b"\xc3\x02" + b"\x00" * 20],
    ids=["empty", "one-byte", "short-header", "json", "zeros", "wrong-magic"],
)
def test_not_avro(codec: Codec, data: bytes) -> None:
    with pytest.raises(NotAvroError):
        codec.decode(data)


def test_not_bytes_is_not_avro(codec: Codec) -> None:
    with pytest.raises(NotAvroError):
        codec.decode("c3 01 not bytes")  # type: ignore[arg-type]


def test_unknown_fingerprint_names_it(codec: Codec) -> None:
    data = encode_request(codec, _request())
    forged = data[:2] + bytes.fromhex("0123456789abcdef") + data[10:]
    with pytest.raises(UnknownSchemaError) as info:
        codec.decode(forged)
    assert "0123456789abcdef" in str(info.value)


def test_truncated_body_is_malformed_at_every_length(codec: Codec) -> None:
    data = encode_request(codec, _request())
    for end in range(10, len(data)):
        with pytest.raises(MalformedRecordError):
            codec.decode(data[:end])


def test_trailing_bytes_are_malformed(codec: Codec) -> None:
    data = encode_response(codec, _response())
    with pytest.raises(MalformedRecordError, match="trailing"):
        codec.decode(data + b"\x00")


def test_request_decoded_as_response_is_refused(codec: Codec) -> None:
    data = encode_request(codec, _request())
    with pytest.raises(UnknownSchemaError, match="InferenceResponse"):
        codec.decode(data, expected="InferenceResponse")
    with pytest.raises(UnknownSchemaError):
        decode_response(codec, data)
    with pytest.raises(UnknownSchemaError):
        decode_request(codec, encode_response(codec, _response()))


def test_unknown_record_name_on_encode(codec: Codec) -> None:
    with pytest.raises(UnknownSchemaError):
        codec.encode("NoSuchRecord", {})


@pytest.mark.parametrize(
    "change",
    [
        lambda v: v.pop("id"),
        lambda v: v.pop("created_at"),
        lambda v: v.update(model_id=None),
        lambda v: v.update(input=42),
        lambda v: v.update(created_at="2024-05-17T12:00:00Z"),
        lambda v: v["context"].pop("session_id"),
        lambda v: v["context"].update(metadata={"n": 1}),
        lambda v: v.update(options={"temperature": "hot", "max_tokens": None, "seed": None}),
        lambda v: v.update(options={"temperature": None, "max_tokens": 2**31, "seed": None}),
        lambda v: v.update(options={"temperature": None, "max_tokens": None, "seed": 2**63}),
    ],
    ids=[
        "missing-id", "missing-created_at", "null-model_id", "int-input", "string-timestamp",
        "missing-session_id", "int-metadata-value", "string-temperature", "max_tokens-over-int32",
        "seed-over-int64",
    ],
)
def test_invalid_request_values(codec: Codec, change) -> None:
    value = _request().to_avro()
    change(value)
    with pytest.raises(InvalidValueError):
        codec.encode("InferenceRequest", value)


def test_invalid_response_values(codec: Codec) -> None:
    with pytest.raises(InvalidValueError):
        encode_response(codec, _response(status="maybe"))  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        encode_response(codec, _response(prompt_tokens="12"))  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        encode_response(codec, _response(output=None))  # type: ignore[arg-type]


# --- schema evolution ----------------------------------------------------------------------


@pytest.fixture()
def v2_dir(tmp_path: Path) -> Path:
    """A copy of the schemas with a next InferenceRequest version adding ``region``."""
    directory = tmp_path / "avro"
    shutil.copytree(SCHEMA_DIR, directory)
    latest = _latest_file("InferenceRequest", directory)
    schema = json.loads(latest.read_text())
    schema["fields"].append({"name": "region", "type": "int", "default": 0})
    next_version = int(latest.name.split(".v")[1].split(".")[0]) + 1
    (directory / f"InferenceRequest.v{next_version}.avsc").write_text(json.dumps(schema))
    return directory


def test_schema_dir_is_not_polluted_by_evolution_tests() -> None:
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.avsc")) == [
        "InferenceCancel.v1.avsc",
        "InferenceRequest.v1.avsc", "InferenceRequest.v2.avsc", "InferenceRequest.v3.avsc", "InferenceRequest.v4.avsc",
        "InferenceRequest.v5.avsc",
        "InferenceResponse.v1.avsc", "InferenceResponse.v2.avsc", "InferenceResponse.v3.avsc", "InferenceResponse.v4.avsc",
        "InferenceResponse.v5.avsc", "InferenceResponse.v6.avsc", "InferenceToken.v1.avsc", "InferenceToken.v2.avsc", "InferenceToken.v3.avsc",
        "ModelContext.v1.avsc",
    ]


def test_newest_version_is_written(codec: Codec, v2_dir: Path) -> None:
    v2 = Codec.from_directory(v2_dir)
    current = v2.current("InferenceRequest")
    assert current.version == codec.current("InferenceRequest").version + 1
    data = v2.encode("InferenceRequest", {**_request().to_avro(), "region": 5})
    assert data[2:10] == current.fingerprint
    assert struct.unpack("<Q", data[2:10])[0] == crc64_avro(current.canonical.encode())
    assert current.fingerprint != codec.current("InferenceRequest").fingerprint
    assert v2.decode(data) == ("InferenceRequest", {**_request().to_avro(), "region": 5})
    # Fields missing from the value take the schema default on write.
    _, value = v2.decode(encode_request(v2, _request()))
    assert value["region"] == 0


def test_v1_codec_cannot_read_v2(codec: Codec, v2_dir: Path) -> None:
    v2 = Codec.from_directory(v2_dir)
    data = encode_request(v2, _request())
    with pytest.raises(UnknownSchemaError) as info:
        codec.decode(data)
    assert v2.current("InferenceRequest").fingerprint.hex() in str(info.value)


def test_v2_codec_reads_v1_with_defaults(codec: Codec, v2_dir: Path) -> None:
    v2 = Codec.from_directory(v2_dir)
    request = _request()
    v1_bytes = encode_request(codec, request)
    name, value = v2.decode(v1_bytes)
    assert name == "InferenceRequest"
    assert value == {**request.to_avro(), "region": 0}
    assert decode_request(v2, v1_bytes) == request
    # Both versions are known for reading.
    assert sorted(v.version for v in v2.versions if v.name == "InferenceRequest") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "file_name",
    ["InferenceRequest.avsc", "InferenceRequest.vX.avsc", "InferenceRequest.v1.v2.avsc", "1Request.v1.avsc"],
)
def test_badly_named_schema_file(tmp_path: Path, file_name: str) -> None:
    shutil.copytree(SCHEMA_DIR, tmp_path / "avro")
    (tmp_path / "avro" / file_name).write_text((SCHEMA_DIR / "InferenceRequest.v1.avsc").read_text())
    with pytest.raises(SchemaError, match="<Name>.v<N>.avsc"):
        load_versions(tmp_path / "avro")


def test_file_name_must_match_record_name(tmp_path: Path) -> None:
    shutil.copytree(SCHEMA_DIR, tmp_path / "avro")
    (tmp_path / "avro" / "Request.v1.avsc").write_text((SCHEMA_DIR / "InferenceRequest.v1.avsc").read_text())
    with pytest.raises(SchemaError, match="InferenceRequest"):
        Codec.from_directory(tmp_path / "avro")
