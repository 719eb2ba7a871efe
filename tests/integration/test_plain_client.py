"""A request from a plain Kafka client, built as docs/producing.md says, with no Nexus code at all.

Only aiokafka, fastavro and the ``.avsc`` files: the header (C3 01 + CRC-64-AVRO of the
schema's parsing canonical form, little-endian) is computed here from the Avro spec.
"""

from __future__ import annotations

import io
import json
import struct
import time
import uuid
from pathlib import Path

import fastavro
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from fastavro.schema import to_parsing_canonical_form

AVRO_DIR = Path(__file__).resolve().parents[2] / "schemas" / "avro"
EMPTY = 0xC15D213AA4D7A795  # the Avro spec's CRC-64-AVRO seed


def crc64_avro(data: bytes) -> int:
    """The Avro specification's 64-bit Rabin fingerprint, bit by bit."""
    fp = EMPTY
    for byte in data:
        fp ^= byte
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1)) & 0xFFFFFFFFFFFFFFFF
    return fp


def load(file: str) -> dict:
    """An .avsc with its reference to nexus.inference.ModelContext replaced by the record."""
    context = json.loads((AVRO_DIR / "ModelContext.v1.avsc").read_text())
    schema = json.loads((AVRO_DIR / file).read_text())
    for field in schema["fields"]:
        if field["type"] == "nexus.inference.ModelContext":
            field["type"] = context
    return schema


def header(schema: dict) -> bytes:
    return b"\xc3\x01" + struct.pack("<Q", crc64_avro(to_parsing_canonical_form(schema).encode()))


def test_crc64_matches_the_avro_spec() -> None:
    assert crc64_avro(b'"int"') == 0x7275D51A3F395C8F


async def test_a_hand_built_request_from_a_plain_client_is_answered(stack: dict[str, str]) -> None:
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    request_schema = load("InferenceRequest.v2.avsc")
    response_schemas = {header(s): s for s in (load(f.name) for f in AVRO_DIR.glob("InferenceResponse.v*.avsc"))}
    request_id = f"plain-{uuid.uuid4().hex}"
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(request_schema), {
        "id": request_id,
        "model_id": "mistral",
        "input": "from a plain client",
        "context": {"session_id": "plain-session", "metadata": {"client": "aiokafka+fastavro"}},
        "created_at": int(time.time() * 1000),
        # options, stream, cache, deadline, original_id, reply_to: the schema's defaults
    })

    # Read responses from their end before producing, with no consumer group.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    try:
        await consumer._client.force_metadata_update()  # for every topic: this consumer subscribes to none
        tps = [TopicPartition("inference.responses", p) for p in consumer.partitions_for_topic("inference.responses")]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        await producer.send_and_wait("inference.requests", header(request_schema) + body.getvalue(), key=b"mistral")

        answer = None
        deadline = time.monotonic() + 60
        while answer is None and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    writer = response_schemas[record.value[:10]]  # every response is a known version
                    value = fastavro.schemaless_reader(io.BytesIO(record.value[10:]), fastavro.parse_schema(writer), None)
                    if value["id"] == request_id:
                        answer = value
    finally:
        await producer.stop()
        await consumer.stop()
    assert answer is not None, "no answer within 60 s"
    assert answer["status"] == "ok"
    assert answer["output"] == "[simulated mistral] You said: from a plain client"
    assert answer["context"] == {"session_id": "plain-session", "metadata": {"client": "aiokafka+fastavro"}}
