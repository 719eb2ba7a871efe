"""``nexus replay`` on the real broker: exact ranges, filters and join; no group; resubmission."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import uuid
from datetime import datetime, UTC

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.consumer import AIOKafkaConsumer

from consumers.replay.audit import RecordFilter, iso
from consumers.replay.reader import ReplayOptions, join_report, replay_records, resubmit
from localdev.broker import free_port
from nexus.kafka.topics import ensure_topics, partitions_of
from nexus.settings import KafkaSettings
from producers.client import RequestProducer
from schemas import InferenceCancel, InferenceRequest, InferenceResponse, ModelContext
from tests.eventually import eventually
from tests.integration.support import CODEC, REPO, TopicReader, wait_for_responses

WORKER_GROUP = "nexus-worker"


def _kafka(bootstrap: str) -> KafkaSettings:
    run = uuid.uuid4().hex[:8]
    return KafkaSettings(
        bootstrap=bootstrap, partitions=3, requests_topic=f"audit-{run}.requests",
        responses_topic=f"audit-{run}.responses", dlq_topic=f"audit-{run}.dlq", tokens_topic=f"audit-{run}.tokens",
        batch_requests_topic=f"audit-{run}.requests.batch", cancels_topic=f"audit-{run}.cancels",
    )


def _request(i: str, model: str = "llama3.1", session: str = "s-a", **kw: object) -> InferenceRequest:
    return InferenceRequest(i, model, f"question {i}", ModelContext(session, {"n": i}), **kw)  # type: ignore[arg-type]


def _response(i: str, latency: int, model: str = "llama3.1", session: str = "s-a", status: str = "ok") -> InferenceResponse:
    return InferenceResponse(
        id=i, model_id=model, status=status, context=ModelContext(session, {"n": i}),  # type: ignore[arg-type]
        latency_ms=latency, completed_at=datetime.now(UTC).replace(microsecond=0),
        output=f"answer {i}" if status == "ok" else "", error=None if status == "ok" else "endpoint down",
    )


class Writer:
    """Writes records like the gateway and the worker would, and notes the broker's timestamps."""

    def __init__(self, kafka: KafkaSettings, producer: AIOKafkaProducer) -> None:
        self.kafka = kafka
        self.producer = producer
        self.timestamps: list[int] = []

    async def send(self, *values: InferenceRequest | InferenceResponse | bytes) -> None:
        futures = []
        for value in values:
            if isinstance(value, InferenceRequest):
                topic, key, data = self.kafka.requests_topic, value.model_id, CODEC.encode("InferenceRequest", value.to_avro())
            elif isinstance(value, InferenceResponse):
                topic, key, data = self.kafka.responses_topic, value.context.session_id, CODEC.encode(
                    "InferenceResponse", value.to_avro())
            else:
                topic, key, data = self.kafka.requests_topic, "garbage", value
            futures.append(await self.producer.send(topic, data, key=key.encode()))
        for metadata in await asyncio.gather(*futures):
            self.timestamps.append(metadata.timestamp)  # LogAppendTime: the broker's clock

    async def next_millisecond(self) -> None:
        """Let the broker's clock pass the last timestamp, so batches never share a millisecond."""
        last = max(self.timestamps)
        while time.time() * 1000 <= last + 1:
            await asyncio.sleep(0.002)


async def _write_known_hour(kafka: KafkaSettings) -> tuple[int, int]:
    """Three batches: before, the range, after. Returns ``(since, until)`` around the middle one."""
    await ensure_topics(kafka)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        before = Writer(kafka, producer)
        await before.send(*(_request(f"b{i}") for i in range(4)), *(_response(f"b{i}", 1) for i in range(4)))
        await before.next_millisecond()

        hour = Writer(kafka, producer)
        await hour.send(
            *(_request(f"l{i}", session=("s-a", "s-b")[i % 2]) for i in range(10)),  # llama3.1, l0..l9
            *(_request(f"m{i}", model="mistral", session="s-c") for i in range(3)),  # m0..m2
            _request("l0"),  # written twice
            b"\x00 not avro",
        )
        await hour.send(
            *(_response(f"l{i}", latency=10 * (i + 1), session=("s-a", "s-b")[i % 2]) for i in range(8)),
            _response("l8", latency=500, session="s-a", status="error"),  # l9: never answered
            _response("l1", latency=777, session="s-b"),  # answered twice
            _response("m0", latency=7, model="mistral", session="s-c"),
            _response("m1", latency=9, model="mistral", session="s-c"),
            _response("orphan", latency=1),  # no such request anywhere
        )
        await hour.next_millisecond()

        after = Writer(kafka, producer)
        await after.send(
            _response("m2", latency=3000, model="mistral", session="s-c"),  # late answer, inside --grace
            *(_request(f"a{i}") for i in range(4)), *(_response(f"a{i}", 1) for i in range(4)),
        )
    finally:
        await producer.stop()
    assert max(before.timestamps) < min(hour.timestamps) and max(hour.timestamps) < min(after.timestamps)
    return min(hour.timestamps), max(hour.timestamps) + 1


async def _ids(kafka: KafkaSettings, **selection: object) -> list[str]:
    options = ReplayOptions(selection=RecordFilter(**selection))  # type: ignore[arg-type]
    return sorted([f"{r.kind[:3]}:{r.id}" async for r in replay_records(kafka, options)])


async def test_replay_of_a_known_hour_is_exact(bootstrap: str) -> None:
    kafka = _kafka(bootstrap)
    since, until = await _write_known_hour(kafka)
    rng = {"since_ms": since, "until_ms": until}

    records = [r async for r in replay_records(kafka, ReplayOptions(selection=RecordFilter(**rng)))]
    assert len(records) == 15 + 13  # 13 requests + l0 again + garbage; 13 responses
    assert all(since <= r.timestamp < until for r in records)
    [garbage] = [r for r in records if r.value is None]
    assert garbage.raw == b"\x00 not avro" and "NotAvroError" in (garbage.error or "")
    assert not {r.id for r in records} & {f"{batch}{i}" for batch in "ba" for i in range(4)}
    assert [r.kind for r in records if r.id == "m2"] == ["request"]  # its answer came after the range
    # Everything, with no range: before + hour + after.
    assert len([r async for r in replay_records(kafka, ReplayOptions())]) == 8 + 28 + 9

    # Filters are exact.
    assert await _ids(kafka, **rng, models=frozenset({"mistral"})) == [
        "req:m0", "req:m1", "req:m2", "res:m0", "res:m1"]
    assert await _ids(kafka, **rng, sessions=frozenset({"s-b"})) == sorted(
        [f"req:l{i}" for i in (1, 3, 5, 7, 9)] + [f"res:l{i}" for i in (1, 1, 3, 5, 7)])
    assert await _ids(kafka, **rng, request_ids=frozenset({"l0", "l8"})) == [
        "req:l0", "req:l0", "req:l8", "res:l0", "res:l8"]
    assert await _ids(kafka, **rng, statuses=frozenset({"error"})) == ["res:l8"]
    assert await _ids(kafka, since_ms=until) == sorted(
        ["res:m2"] + [f"req:a{i}" for i in range(4)] + [f"res:a{i}" for i in range(4)])

    # The join report: every number known in advance.
    report = await join_report(kafka, ReplayOptions(selection=RecordFilter(**rng)))
    assert (report.requests, report.answered, report.responses) == (13, 12, 13)
    assert report.unanswered == ["l9"] and not report.complete
    assert report.responses_without_request == ["orphan"]
    assert report.duplicate_requests == {"l0": 2}
    assert report.duplicate_responses == {"l1": 2}
    assert report.statuses == {"ok": 11, "error": 1}
    llama, mistral = report.models
    assert (llama.requests, llama.answered, llama.statuses) == (10, 9, {"ok": 8, "error": 1})
    # latencies 10..80 and 500 (l1's first answer, 20, counts; its duplicate 777 does not)
    assert llama.latency_ms == {"p50": 50, "p90": 500, "p99": 500, "max": 500}
    assert (mistral.requests, mistral.answered) == (3, 3)
    assert mistral.latency_ms == {"p50": 9, "p90": 3000, "p99": 3000, "max": 3000}
    # Without a grace period, m2's late answer is not seen.
    strict = await join_report(kafka, ReplayOptions(selection=RecordFilter(**rng), grace_ms=0))
    assert strict.unanswered == ["l9", "m2"]


def _nexus(bootstrap: str, kafka: KafkaSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "NEXUS_KAFKA_REQUESTS_TOPIC": kafka.requests_topic, "NEXUS_KAFKA_RESPONSES_TOPIC": kafka.responses_topic,
        "NEXUS_KAFKA_DLQ_TOPIC": kafka.dlq_topic, "NEXUS_KAFKA_TOKENS_TOPIC": kafka.tokens_topic,
        "NEXUS_KAFKA_BATCH_REQUESTS_TOPIC": kafka.batch_requests_topic,
        "NEXUS_KAFKA_CANCELS_TOPIC": kafka.cancels_topic,
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run([sys.executable, "-m", "nexus", *args, "--bootstrap", bootstrap], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


async def test_replay_command_prints_jsonl_table_and_join(bootstrap: str) -> None:
    kafka = _kafka(bootstrap)
    since, until = await _write_known_hour(kafka)
    # ISO-8601 for --since, epoch ms for --until.
    done = _nexus(bootstrap, kafka, "replay", "--since", iso(since), "--until", str(until), "--format", "jsonl",
                  "--model", "mistral", "--topics", "requests,responses,dlq")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted((x["kind"], x["value"]["id"]) for x in lines) == [
        ("request", "m0"), ("request", "m1"), ("request", "m2"), ("response", "m0"), ("response", "m1")]
    first = lines[0]
    assert set(first) >= {"topic", "partition", "offset", "timestamp", "time", "key", "value"}
    assert first["key"] in ("mistral", "s-c")

    table = _nexus(bootstrap, kafka, "replay", "--since", str(since), "--until", str(until), "--format", "table",
                   "--status", "error")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["time", "where", "kind", "id"]
    assert "l8" in row and "endpoint down" in row

    join = _nexus(bootstrap, kafka, "replay", "--since", str(since), "--until", str(until), "--join",
                  "--format", "table", "--progress")
    assert join.returncode == 1, join.stderr  # l9 has no response
    assert "requests without a response: 1\n    l9" in join.stdout
    assert "records" in join.stderr  # the progress bar
    as_json = _nexus(bootstrap, kafka, "replay", "--since", str(since), "--until", str(until), "--join",
                     "--format", "jsonl")
    assert json.loads(as_json.stdout)["unanswered"] == ["l9"]

    bad = _nexus(bootstrap, kafka, "replay", "--since", "yesterday")
    assert bad.returncode == 2 and "ISO-8601" in bad.stderr
    missing = _nexus(bootstrap, _kafka(bootstrap), "replay")  # topics never created
    assert missing.returncode == 3 and "does not exist" in missing.stderr
    away = subprocess.run([sys.executable, "-m", "nexus", "replay", "--bootstrap", f"127.0.0.1:{free_port()}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert away.returncode == 3 and "cannot reach Kafka" in away.stderr
    assert _nexus(bootstrap, kafka, "replay", "--join", "--status", "ok").returncode == 2


async def _worker_offsets(admin: AIOKafkaAdminClient, topic: str) -> dict[TopicPartition, int]:
    committed = await admin.list_consumer_group_offsets(WORKER_GROUP)
    return {tp: meta.offset for tp, meta in committed.items() if tp.topic == topic}


async def _wait_worker_caught_up(admin: AIOKafkaAdminClient, bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    """Poll until the worker group committed every request written so far."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        # A fresh consumer knows no partitions yet: ask the cluster.
        tps = [TopicPartition(topic, p) for p in await partitions_of(admin, topic)]
        assert tps, f"{topic} has no partitions"
        seen: dict = {}

        async def caught_up() -> dict | None:
            ends = await consumer.end_offsets(tps)
            committed = await _worker_offsets(admin, topic)
            seen.update(committed=committed, ends=ends)
            return committed if all(committed.get(tp, 0) >= ends[tp] for tp in tps if ends[tp]) else None

        return await eventually(caught_up, f"the worker's commits reach the end of {topic}",
                                timeout=60, interval=0.2, context=lambda: str(seen))
    finally:
        await consumer.stop()


async def test_replay_beside_a_live_worker_moves_no_offsets(stack: dict[str, str]) -> None:
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    kafka = KafkaSettings(bootstrap=bootstrap)
    run = uuid.uuid4().hex[:8]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        since = int(time.time() * 1000) - 1
        async with RequestProducer(kafka) as producer:
            first = [_request(f"{run}-{i}", session=f"live-{run}") for i in range(30)]
            answers = await producer.submit_many_and_wait(first, timeout_s=60)
            assert [a.id for a in answers] == [r.id for r in first]
            groups_before = sorted(g[0] for g in await admin.list_consumer_groups())
            committed = await _wait_worker_caught_up(admin, bootstrap, kafka.requests_topic)

            # A replay while the worker is idle: its committed offsets do not move.
            selection = RecordFilter(since_ms=since, sessions=frozenset({f"live-{run}"}))
            report = await join_report(kafka, ReplayOptions(selection=selection))
            assert (report.requests, report.answered, report.duplicate_responses) == (30, 30, {})
            assert await _worker_offsets(admin, kafka.requests_topic) == committed

            # A replay while the worker is busy: the replay stops at its snapshot, the worker answers.
            second = [_request(f"{run}-x{i}", session=f"live-{run}") for i in range(20)]
            report, answered = await asyncio.gather(
                join_report(kafka, ReplayOptions(selection=selection)),
                producer.submit_many_and_wait(second, timeout_s=60),
            )
        assert report.requests >= 30 and not set(report.unanswered) & {r.id for r in first}
        assert {a.id for a in answered} == {r.id for r in second}
        await _wait_worker_caught_up(admin, bootstrap, kafka.requests_topic)
        # The replays registered no consumer group and committed nothing.
        assert sorted(g[0] for g in await admin.list_consumer_groups()) == groups_before
        assert "nexus-replay" not in groups_before and WORKER_GROUP in groups_before
    finally:
        await admin.close()


async def test_resubmitted_requests_are_answered_and_link_to_their_originals(stack: dict[str, str]) -> None:
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    kafka = KafkaSettings(bootstrap=bootstrap)
    session = f"resubmit-{uuid.uuid4().hex[:8]}"
    originals = [_request(f"{session}-{i}", model=("llama3.1", "mistral")[i % 2], session=session) for i in range(3)]
    async with RequestProducer(kafka) as producer:
        recorded = {r.id: r for r in await producer.submit_many_and_wait(originals, timeout_s=60)}

    selection = RecordFilter(sessions=frozenset({session}))
    async with TopicReader(bootstrap, kafka.responses_topic) as responses:
        copies = await resubmit(kafka, ReplayOptions(selection=selection))
        assert sorted(c.original_id for c in copies) == sorted(recorded)
        assert not {c.id for c in copies} & set(recorded)
        answers = await wait_for_responses(responses, {c.id for c in copies})
    for copy in copies:
        [answer] = answers.by_id[copy.id]
        assert answer.status == "ok" and answer.output == recorded[copy.original_id].output

    # The copies are in the requests topic, linking back; the join compares the answers.
    written = {
        r.id: r.value async for r in replay_records(
            kafka, ReplayOptions(topics=("requests",), selection=RecordFilter(request_ids=frozenset(c.id for c in copies))))
    }
    assert {i: v.original_id for i, v in written.items()} == {c.id: c.original_id for c in copies}  # type: ignore[union-attr]
    report = await join_report(kafka, ReplayOptions(selection=selection))
    assert report.complete and report.requests == 6
    r = report.resubmissions
    assert (r.resubmitted, r.answered, r.compared, r.same_output) == (3, 3, 3, 3)

    # The command prints "new-id<TAB>original-id"; --resubmit-model sends the copies elsewhere.
    done = subprocess.run(
        [sys.executable, "-m", "nexus", "replay", "--bootstrap", bootstrap, "--resubmit", "--format", "table",
         "--request-id", originals[0].id, "--resubmit-model", "mistral"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    [(new_id, original_id)] = [line.split("\t") for line in done.stdout.splitlines()]
    assert original_id == originals[0].id
    [copy] = [r async for r in replay_records(
        kafka, ReplayOptions(topics=("requests",), selection=RecordFilter(request_ids=frozenset({new_id}))))]
    request = copy.value
    assert (request.model_id, request.original_id, request.cache) == ("mistral", originals[0].id, "no-cache")  # type: ignore[union-attr]

    refused = subprocess.run([sys.executable, "-m", "nexus", "replay", "--bootstrap", bootstrap, "--resubmit"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "refusing to resubmit every request" in refused.stderr


async def test_replay_reads_the_batch_lane_and_the_cancels(bootstrap: str) -> None:
    kafka = _kafka(bootstrap)
    await ensure_topics(kafka)
    since = int(time.time() * 1000) - 1
    async with RequestProducer(kafka) as producer:
        await producer.submit_many([_request("i1", session="s-lanes"),
                                    _request("b1", session="s-lanes", priority="batch", tenant="team-a")])
        await producer.cancel("i1", reason="client disconnected")
    cancelled = dataclasses.replace(_response("i1", 5, session="s-lanes", status="cancelled"), error="cancelled by client")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        writer = Writer(kafka, producer)
        await writer.send(cancelled, _response("b1", 50, session="s-lanes"))
    finally:
        await producer.stop()

    every = [r async for r in replay_records(kafka, ReplayOptions(topics=("requests", "responses", "cancels")))]
    assert sorted((r.topic, r.kind, r.id) for r in every) == [
        (kafka.cancels_topic, "cancel", "i1"), (kafka.requests_topic, "request", "i1"),
        (kafka.batch_requests_topic, "request", "b1"), (kafka.responses_topic, "response", "b1"),
        (kafka.responses_topic, "response", "i1")]
    [cancel] = [r.value for r in every if r.kind == "cancel"]
    assert isinstance(cancel, InferenceCancel) and cancel.reason == "client disconnected"
    assert await _ids(kafka, sessions=frozenset({"s-lanes"})) == ["req:b1", "req:i1", "res:b1", "res:i1"]
    assert await _ids(kafka, statuses=frozenset({"cancelled"})) == ["res:i1"]

    report = await join_report(kafka, ReplayOptions(selection=RecordFilter(since_ms=since)))
    assert (report.requests, report.answered, report.complete) == (2, 2, True)
    assert report.statuses == {"ok": 1, "cancelled": 1}

    # A resubmitted batch request goes back to the batch lane, tenant and all.
    [copy] = await resubmit(kafka, ReplayOptions(selection=RecordFilter(request_ids=frozenset({"b1"}))))
    [written] = [r async for r in replay_records(kafka, ReplayOptions(
        topics=("requests",), selection=RecordFilter(request_ids=frozenset({copy.id}))))]
    assert written.topic == kafka.batch_requests_topic
    assert (written.value.priority, written.value.tenant, written.value.original_id) == ("batch", "team-a", "b1")

    done = _nexus(bootstrap, kafka, "replay", "--topics", "requests,cancels", "--format", "table")
    assert done.returncode == 0, done.stderr
    assert "[batch] question b1" in done.stdout and "client disconnected" in done.stdout


async def test_replay_of_a_cluster_without_the_new_topics_reads_the_old_ones(bootstrap: str) -> None:
    """Roles older than the scheduler never created the batch lane or the cancels topic."""
    kafka = _kafka(bootstrap)
    elsewhere = {name: f"{getattr(kafka, name)}.elsewhere" for name in ("batch_requests_topic", "cancels_topic")}
    await ensure_topics(dataclasses.replace(kafka, **elsewhere))  # every topic but these two
    async with RequestProducer(kafka) as producer:
        await producer.submit(_request("old1"))
    records = [r async for r in replay_records(kafka, ReplayOptions(topics=("requests", "cancels")))]
    assert [(r.topic, r.id) for r in records] == [(kafka.requests_topic, "old1")]
