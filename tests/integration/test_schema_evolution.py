"""Schema evolution in both directions, with the real files and through the real broker.

v1 records are read by v2 code (the worker answers a v1 request), and v2 records are
read by a v1 application that holds the v2 ``.avsc`` files (Avro resolution drops what
it does not know). The rules of docs/schemas.md are checked on every version pair.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from schemas import (
    Codec,
    InferenceRequest,
    ModelContext,
    UnknownSchemaError,
    decode_request,
    decode_response,
    encode_request,
)
from schemas.codec import SCHEMA_DIR
from tests.integration.support import TopicReader, wait_for_responses

CURRENT = Codec.from_directory()
REQUEST_VERSIONS = sorted(v.version for v in CURRENT.versions if v.name == "InferenceRequest")
RESPONSE_VERSIONS = sorted(v.version for v in CURRENT.versions if v.name == "InferenceResponse")
V1_APP = Codec.from_directory(pin={"InferenceRequest": 1, "InferenceResponse": 1})


def _fields(name: str, version: int) -> dict[str, dict]:
    schema = json.loads((SCHEMA_DIR / f"{name}.v{version}.avsc").read_text())
    return {f["name"]: f for f in schema["fields"]}


def _version_pairs() -> list[tuple[str, int, int]]:
    versions: dict[str, list[int]] = {}
    for path in SCHEMA_DIR.glob("*.avsc"):
        name, version = path.name.split(".v")
        versions.setdefault(name, []).append(int(version.split(".")[0]))
    return [(name, a, b) for name, vs in sorted(versions.items())
            for a, b in zip(sorted(vs), sorted(vs)[1:])]


def _follows_the_rules(where: str, before: dict[str, dict], after: dict[str, dict]) -> None:
    """New fields have defaults; no field is removed without one; kept fields keep their type,
    a kept nested record (``options``) follows the same rules, field by field, and a kept enum
    keeps its symbols and grows only with a default (rule 5)."""
    added = set(after) - set(before)
    removed = set(before) - set(after)
    assert all("default" in after[f] for f in added), f"{where}: new fields need defaults: {added}"
    assert all("default" in before[f] for f in removed), f"{where}: removed fields had no default"
    for field in set(before) & set(after):
        old_type, new_type = before[field]["type"], after[field]["type"]
        if isinstance(old_type, dict) and old_type.get("type") == "record" and isinstance(new_type, dict):
            assert new_type.get("type") == "record" and new_type["name"] == old_type["name"], f"{where}.{field}"
            _follows_the_rules(f"{where}.{field}", {f["name"]: f for f in old_type["fields"]},
                               {f["name"]: f for f in new_type["fields"]})
        elif isinstance(old_type, dict) and old_type.get("type") == "enum" and isinstance(new_type, dict):
            _enum_grows_by_the_rules(f"{where}.{field}", old_type, new_type)
        else:
            assert old_type == new_type, f"{where}.{field} changed type"


def _enum_grows_by_the_rules(where: str, old: dict, new: dict) -> None:
    assert new.get("type") == "enum" and new["name"] == old["name"], f"{where} changed type"
    assert new["symbols"][: len(old["symbols"])] == old["symbols"], f"{where}: symbols removed or reordered"
    added = new["symbols"][len(old["symbols"]):]
    assert not added or new.get("default") in new["symbols"], f"{where}: new symbols {added} need a default"
    assert old.get("default") in (None, new.get("default")), f"{where}: the default changed"


@pytest.mark.parametrize("name, old, new", _version_pairs())
def test_every_new_version_follows_the_rules(name: str, old: int, new: int) -> None:
    _follows_the_rules(f"{name} v{new}", _fields(name, old), _fields(name, new))


def test_the_rules_catch_a_nested_field_without_a_default() -> None:
    options = {"type": "record", "name": "O", "fields": [{"name": "a", "type": "int", "default": 0}]}
    grown = {**options, "fields": [*options["fields"], {"name": "b", "type": "int"}]}
    with pytest.raises(AssertionError, match=r"R\.options: new fields need defaults"):
        _follows_the_rules("R", {"options": {"name": "options", "type": options}},
                           {"options": {"name": "options", "type": grown}})


def test_the_rules_catch_an_enum_growing_without_a_default() -> None:
    status = {"type": "enum", "name": "S", "symbols": ["ok", "error"]}
    grown = {**status, "symbols": ["ok", "error", "expired"]}
    with pytest.raises(AssertionError, match=r"R\.status: new symbols \['expired'\] need a default"):
        _follows_the_rules("R", {"status": {"name": "status", "type": status}},
                           {"status": {"name": "status", "type": grown}})
    _follows_the_rules("R", {"status": {"name": "status", "type": status}},
                       {"status": {"name": "status", "type": {**grown, "default": "error"}}})
    with pytest.raises(AssertionError, match="symbols removed or reordered"):
        _follows_the_rules("R", {"status": {"name": "status", "type": status}},
                           {"status": {"name": "status", "type": {**status, "symbols": ["error", "ok"]}}})


def test_the_scheduling_versions_are_there() -> None:
    assert REQUEST_VERSIONS[-1] == 5 and RESPONSE_VERSIONS[-1] == 6
    assert [v.version for v in CURRENT.versions if v.name == "InferenceCancel"] == [1]
    assert {"priority", "tenant"} <= set(_fields("InferenceRequest", 5))
    assert {"queue_ms", "priority", "tenant"} <= set(_fields("InferenceResponse", 6))


def test_the_codec_writes_the_highest_version_and_a_pin_writes_an_older_one() -> None:
    request = InferenceRequest("r", "llama3.1", "x", ModelContext("s"))
    assert CURRENT.writer_of(encode_request(CURRENT, request)).version == REQUEST_VERSIONS[-1] >= 3
    assert V1_APP.writer_of(encode_request(V1_APP, request)).version == 1
    known = ", ".join(map(str, REQUEST_VERSIONS))
    with pytest.raises(UnknownSchemaError, match=rf"cannot pin InferenceRequest to v9: known versions \[{known}\]"):
        Codec.from_directory(pin={"InferenceRequest": 9})


def test_a_reader_without_the_new_file_names_the_unknown_fingerprint(tmp_path: Path) -> None:
    for name in ("ModelContext.v1.avsc", "InferenceRequest.v1.avsc", "InferenceResponse.v1.avsc"):
        shutil.copy(SCHEMA_DIR / name, tmp_path / name)
    only_v1 = Codec.from_directory(tmp_path)
    data = encode_request(CURRENT, InferenceRequest("r", "m", "x", ModelContext("s")))
    with pytest.raises(UnknownSchemaError, match=data[2:10].hex()):
        only_v1.decode(data)


async def test_a_v1_request_is_answered_by_the_v2_worker(stack: dict[str, str]) -> None:
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    request = InferenceRequest(f"v1-{uuid.uuid4().hex}", "llama3.1", "old client", ModelContext("v1-session", {"v": "1"}))
    data = encode_request(V1_APP, request)
    v1 = next(v for v in CURRENT.versions if (v.name, v.version) == ("InferenceRequest", 1))
    assert data[2:10] == v1.fingerprint  # the worker knows v1 by its fingerprint
    assert data[2:10] != CURRENT.current("InferenceRequest").fingerprint
    async with TopicReader(bootstrap, "inference.responses") as responses:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait("inference.requests", data, key=b"llama3.1")
        finally:
            await producer.stop()
        answers = await wait_for_responses(responses, {request.id})
    [answer] = answers.by_id[request.id]
    assert (answer.status, answer.output) == ("ok", "[simulated llama3.1] You said: old client")
    assert answer.context == request.context


async def test_v2_records_from_the_broker_are_read_by_a_v1_application(stack: dict[str, str]) -> None:
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    request = InferenceRequest(
        f"v2-{uuid.uuid4().hex}", "mistral", "new client", ModelContext("v2-session"),
        cache="no-store", original_id="earlier", reply_to="gateway-7",
    )
    async with TopicReader(bootstrap, "inference.requests") as requests, TopicReader(
        bootstrap, "inference.responses"
    ) as responses:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait("inference.requests", encode_request(CURRENT, request), key=b"mistral")
        finally:
            await producer.stop()
        await wait_for_responses(responses, {request.id})
        written = [r.value for r in await requests.drain() if request.id.encode() in r.value]

    # The request, as the v1 application sees it: v2's fields are resolved away.
    [data] = written
    assert CURRENT.writer_of(data).version == REQUEST_VERSIONS[-1]
    name, value = V1_APP.decode(data)
    assert set(value) == set(_fields("InferenceRequest", 1))
    assert {k: value[k] for k in ("id", "model_id", "input")} == {"id": request.id, "model_id": "mistral",
                                                                    "input": "new client"}
    assert decode_request(V1_APP, data).original_id is None  # unknown to v1, so the default
    assert decode_request(CURRENT, data).original_id == "earlier"  # while v2 code keeps it

    # The worker's v2 response, as the v1 application sees it.
    [response_bytes] = [r.value for r in responses.records if request.id.encode() in r.value]
    assert CURRENT.writer_of(response_bytes).version == RESPONSE_VERSIONS[-1]
    _, old_view = V1_APP.decode(response_bytes)
    assert set(old_view) == set(_fields("InferenceResponse", 1))
    assert old_view["output"] == "[simulated mistral] You said: new client"
    current = decode_response(CURRENT, response_bytes)
    assert decode_response(V1_APP, response_bytes).output == current.output


async def test_a_request_from_before_scheduling_is_answered_as_interactive(stack: dict[str, str]) -> None:
    """A v4 request (no priority, no tenant) from an old client or the topic's history: the worker
    reads it as interactive and answers with the current response version."""
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    v4_app = Codec.from_directory(pin={"InferenceRequest": 4, "InferenceResponse": 5})
    request = InferenceRequest(f"v4-{uuid.uuid4().hex}", "llama3.1", "before lanes", ModelContext("v4-session"))
    data = encode_request(v4_app, request)
    assert v4_app.writer_of(data).version == 4
    async with TopicReader(bootstrap, "inference.responses") as responses:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait("inference.requests", data, key=b"llama3.1")
        finally:
            await producer.stop()
        answers = await wait_for_responses(responses, {request.id})
    [answer] = answers.by_id[request.id]
    assert (answer.status, answer.priority) == ("ok", "interactive")
    [response_bytes] = [r.value for r in responses.records if request.id.encode() in r.value]
    assert CURRENT.writer_of(response_bytes).version == RESPONSE_VERSIONS[-1]
    assert decode_response(v4_app, response_bytes).output == answer.output  # an ok answer reads in the old app
