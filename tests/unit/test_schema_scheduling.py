"""The wire contract of fair scheduling: InferenceRequest v5, InferenceResponse v6, InferenceCancel v1
and the queue report; old versions still decode."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, UTC
from pathlib import Path

import pytest

import schemas
from schemas import (
    BATCH,
    INTERACTIVE,
    PRIORITIES,
    Codec,
    InferenceCancel,
    InferenceRequest,
    InferenceResponse,
    MalformedRecordError,
    ModelContext,
    QueueReport,
    SchemaError,
    UnknownSchemaError,
    decode_cancel,
    decode_request,
    decode_response,
    encode_cancel,
    encode_request,
    encode_response,
)
from schemas.codec import SCHEMA_DIR
from schemas.queue_state import MAX_REPORTED, QUEUED_FIELDS, RUNNING_FIELDS

CODEC = Codec.from_directory()
AT = datetime(2025, 1, 31, 14, 0, tzinfo=UTC)


def _request(**fields: object) -> InferenceRequest:
    return InferenceRequest("r1", "llama3.1", "hi", ModelContext("s1"), created_at=AT, **fields)  # type: ignore[arg-type]


def _response(status: str = "ok", **fields: object) -> InferenceResponse:
    return InferenceResponse("r1", "llama3.1", status, ModelContext("s1"), 12, AT, **fields)  # type: ignore[arg-type]


def test_the_priorities_are_exported_and_interactive_is_the_default() -> None:
    assert PRIORITIES == (INTERACTIVE, BATCH) == ("interactive", "batch")
    assert _request().priority == "interactive" and _request().tenant is None
    for name in ("PRIORITIES", "INTERACTIVE", "BATCH", "InferenceCancel", "encode_cancel", "decode_cancel",
                 "QueueReport"):
        assert name in schemas.__all__


def test_a_v5_request_keeps_its_priority_and_tenant() -> None:
    request = _request(priority="batch", tenant="team-a")
    data = encode_request(CODEC, request)
    assert CODEC.writer_of(data).version == 5
    assert decode_request(CODEC, data) == request


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_an_old_request_reads_as_interactive_without_a_tenant(version: int) -> None:
    old = Codec.from_directory(pin={"InferenceRequest": version})
    request = decode_request(CODEC, encode_request(old, _request(priority="batch", tenant="team-a")))
    assert (request.priority, request.tenant) == ("interactive", None)
    assert request.tenant_or_session == "s1"


def test_tenant_or_session_prefers_the_tenant_then_the_key() -> None:
    assert _request(tenant="t", key_name="k").tenant_or_session == "t"
    assert _request(key_name="k").tenant_or_session == "k"
    assert _request().tenant_or_session == "s1"


@pytest.mark.parametrize("status", ["ok", "error", "expired", "cancelled"])
def test_a_v6_response_carries_every_status_and_the_queue_time(status: str) -> None:
    response = _response(status, error=None if status == "ok" else "why", queue_ms=1500, priority="batch",
                         tenant="team-a", output="partial" if status == "cancelled" else "")
    data = encode_response(CODEC, response)
    assert CODEC.writer_of(data).version == 6
    assert decode_response(CODEC, data) == response


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5])
def test_an_old_response_reads_with_the_defaults(version: int) -> None:
    old = Codec.from_directory(pin={"InferenceResponse": version})
    response = decode_response(CODEC, encode_response(old, _response("error", error="boom")))
    assert (response.status, response.queue_ms, response.priority, response.tenant) == ("error", 0, "interactive", None)


def test_an_app_built_for_v5_reads_ok_and_error_but_not_the_new_statuses() -> None:
    """Avro enums grow only with a default: v5's ResponseStatus has none, so an app pinned to it fails
    on an expired or cancelled answer (docs/schemas.md); ok and error read as before."""
    v5_app = Codec.from_directory(pin={"InferenceResponse": 5})
    assert decode_response(v5_app, encode_response(CODEC, _response("ok", queue_ms=3))).status == "ok"
    with pytest.raises(MalformedRecordError, match="expired"):
        decode_response(v5_app, encode_response(CODEC, _response("expired", error="deadline passed")))


def test_v6_status_has_a_default_so_a_later_symbol_reads_as_error(tmp_path: Path) -> None:
    directory = tmp_path / "avro"
    shutil.copytree(SCHEMA_DIR, directory)
    schema = json.loads((SCHEMA_DIR / "InferenceResponse.v6.avsc").read_text())
    status = next(f for f in schema["fields"] if f["name"] == "status")
    assert status["type"]["symbols"] == ["ok", "error", "expired", "cancelled"]
    assert status["type"]["default"] == "error"
    status["type"]["symbols"].append("throttled")
    (directory / "InferenceResponse.v7.avsc").write_text(json.dumps(schema))
    future = Codec.from_directory(directory)
    data = future.encode("InferenceResponse", {**_response("error", error="x").to_avro(), "status": "throttled"})
    v6_app = Codec.from_directory(directory, pin={"InferenceResponse": 6})  # holds the v7 file, reads as v6
    assert decode_response(v6_app, data).status == "error"


def test_a_cancel_round_trips_and_is_its_own_record() -> None:
    cancel = InferenceCancel("r1", AT, "client disconnected", "team-a")
    data = encode_cancel(CODEC, cancel)
    assert CODEC.writer_of(data).name == "InferenceCancel"
    assert decode_cancel(CODEC, data) == cancel
    assert InferenceCancel("r2").reason == "" and InferenceCancel("r2").key_name is None
    assert cancel.to_json()["requested_at"] == "2025-01-31T14:00:00+00:00"
    with pytest.raises(UnknownSchemaError, match="expected a InferenceCancel record"):
        decode_cancel(CODEC, encode_request(CODEC, _request()))
    with pytest.raises(UnknownSchemaError, match="expected a InferenceRequest record"):
        decode_request(CODEC, data)


def test_the_request_and_response_json_forms_show_the_new_fields() -> None:
    assert {k: _request(priority="batch", tenant="t").to_json()[k] for k in ("priority", "tenant")} == {
        "priority": "batch", "tenant": "t"}
    out = _response("expired", error="deadline", queue_ms=9).to_json()
    assert (out["status"], out["queue_ms"], out["priority"], out["tenant"]) == ("expired", 9, "interactive", None)


# --- the queue report ------------------------------------------------------------------------------


def _waiting(i: int) -> dict[str, object]:
    return {"id": f"r{i}", "session_id": "s", "tenant": "team-a", "priority": "batch", "position": i,
            "eta_s": 0.5 * i, "waited_s": 1.0}


def test_a_queue_report_round_trips_with_its_key() -> None:
    running = [{"id": "x", "session_id": "s", "tenant": "t", "priority": "interactive", "running_s": 2.5}]
    report = QueueReport("w1", "llama3.1", 1700000000.5, 2.0, [_waiting(0), _waiting(1)], running)
    assert report.key == b"w1|llama3.1"
    assert report.waiting_total == 2 and not report.empty
    assert QueueReport.from_bytes(report.to_bytes()) == report
    assert set(QUEUED_FIELDS) == set(_waiting(0)) and set(RUNNING_FIELDS) == set(running[0])


def test_an_empty_report_is_empty_and_round_trips() -> None:
    report = QueueReport("w1", "m", 1.0)
    assert report.empty and report.rate_per_s == 0.0
    assert QueueReport.from_bytes(report.to_bytes()) == report


def test_a_long_queue_lists_the_first_entries_and_counts_all() -> None:
    report = QueueReport("w", "m", 1.0, 1.0, [_waiting(i) for i in range(MAX_REPORTED + 3)])
    parsed = QueueReport.from_bytes(report.to_bytes())
    assert len(parsed.waiting) == MAX_REPORTED and parsed.waiting_total == MAX_REPORTED + 3
    assert parsed.waiting[0]["position"] == 0


@pytest.mark.parametrize("data, reason", [
    (b"not json", "not a queue record"),
    (b"[]", "expected a JSON object"),
    (b'{"worker": 1, "model": "m", "at": 1}', "worker and model must be strings"),
    (b'{"worker": "w", "model": "m", "at": "now"}', "at and rate_per_s must be numbers"),
    (b'{"worker": "w", "model": "m", "at": 1, "rate_per_s": true}', "at and rate_per_s must be numbers"),
    (b'{"worker": "w", "model": "m", "at": 1, "waiting": {}}', "waiting must be a list of objects"),
    (b'{"worker": "w", "model": "m", "at": 1, "waiting": [{"id": "r"}]}', "a waiting entry has no 'session_id'"),
    (b'{"worker": "w", "model": "m", "at": 1, "running": [{"id": 3, "session_id": "s", "tenant": "t", '
     b'"priority": "batch", "running_s": 1}]}', "a running entry's id must be a string"),
    (b'{"worker": "w", "model": "m", "at": 1, "waiting_total": -1}', "waiting_total must be an integer"),
])
def test_a_bad_queue_record_is_a_schema_error_naming_the_problem(data: bytes, reason: str) -> None:
    with pytest.raises(SchemaError, match=reason):
        QueueReport.from_bytes(data)
