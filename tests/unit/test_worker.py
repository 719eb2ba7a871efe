"""The worker's pure pieces: batch grouping, which answers may be cancelled, lag, topic specs,
and the Kafka adapters Inference writes through (with in-memory sends)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import namedtuple
from typing import Any

from aiokafka import TopicPartition

from nexus.kafka.topics import nexus_topics, topic_names
from nexus.settings import KafkaSettings, Settings
from schemas import (
    Codec, InferenceCancel, InferenceOptions, InferenceRequest, ModelContext, ToolCall, decode_token, headers,
)
from streams.app import cache_changelog_topic, internal_topics
from streams.lag import lag_per_partition
from streams.cancels import CancelBook
from streams.sinks import KafkaTokenSink
from streams.worker import Answering, share_groups, waiting

CODEC = Codec.from_directory()


def _request(id_: str, text: str = "hi", *, seed: int | None = 1, stream: bool = False,
             reply_to: str | None = None) -> InferenceRequest:
    return InferenceRequest(id_, "mistral", text, ModelContext("s"), InferenceOptions(seed=seed),
                            stream=stream, reply_to=reply_to)


def test_identical_deterministic_requests_share_a_group_and_the_rest_go_alone() -> None:
    a1, a2, b = _request("a1"), _request("a2"), _request("b", "other")
    random1, random2 = _request("r1", seed=None), _request("r2", seed=None)
    streamed1, streamed2 = _request("s1", stream=True), _request("s2", stream=True)
    batch = [(0, a1), (1, random1), (2, None), (3, b), (4, a2), (5, random2), (6, streamed1), (7, streamed2)]
    groups = share_groups(batch)
    assert [[offset for offset, _ in g] for g in groups] == [[0, 4], [1], [3], [5], [6], [7]]
    assert groups[0] == [(0, a1), (4, a2)]


def test_only_answers_that_called_no_model_yet_are_waiting() -> None:
    called, idle, other_idle = Answering(["p0:1"]), Answering(["p0:2", "p1:3"]), Answering(["p1:4"])
    called.calls()
    running = [("t1", called), ("t2", idle), ("t3", other_idle)]
    assert waiting(running) == ["t2", "t3"]
    assert waiting(running, lambda e: e.startswith("p0:")) == ["t2"]
    assert waiting(running, lambda e: e.startswith("p2:")) == []


def test_lag_is_end_minus_committed_and_the_whole_log_when_never_committed() -> None:
    Meta = namedtuple("Meta", "offset metadata")
    p0, p1, p2 = (TopicPartition("inference.requests", p) for p in range(3))
    ends = {p0: 10, p1: 5, p2: 7}
    assert lag_per_partition(ends, {p0: Meta(4, ""), p2: Meta(-1, "")}) == {0: 6, 1: 5, 2: 7}


def test_the_worker_creates_its_cache_changelog_with_the_shared_topics() -> None:
    settings = Settings()
    kafka = settings.kafka
    specs = {spec.name: spec for spec in internal_topics(settings)}
    app_id = settings.worker.app_id
    assert list(specs) == [cache_changelog_topic(app_id)]
    changelog = specs[cache_changelog_topic(app_id)]
    assert changelog.partitions == kafka.partitions and changelog.config == {"cleanup.policy": "compact"}
    shared = {spec.name: spec for spec in nexus_topics(KafkaSettings(replication_factor=3))}
    assert set(shared) == {*topic_names(kafka), kafka.state_topic, kafka.queue_topic}
    assert shared[kafka.state_topic].partitions == 1
    assert shared[kafka.state_topic].config == {"cleanup.policy": "compact", "min.insync.replicas": "2"}
    assert shared[kafka.requests_topic].config["cleanup.policy"] == "delete"


async def test_token_chunks_go_out_in_order_with_the_reply_header_and_close_waits_for_acks() -> None:
    sent: list[tuple[bytes | None, bytes, Any]] = []
    acks: list[asyncio.Future[None]] = []

    async def send(key: bytes | None, value: bytes, record_headers: Any) -> asyncio.Future[None]:
        sent.append((key, value, record_headers))
        acks.append(asyncio.get_running_loop().create_future())
        return acks[-1]

    sink = KafkaTokenSink(send, CODEC, _request("r", stream=True, reply_to="gw-1"))
    await sink.chunk("a")
    assert len(sent) == 1, "the first chunk goes out at once: it is the time to first token"
    await sink.chunk("b")
    await sink.chunk("c", flush=True)  # now, with what was batched before it
    await sink.chunk("d")
    closing = asyncio.ensure_future(sink.close())
    while len(sent) < 3:  # close() flushes the rest at once
        await asyncio.sleep(0)
    assert not closing.done()  # until Kafka acknowledged every chunk
    for ack in acks:
        ack.set_result(None)
    await closing
    tokens = [decode_token(CODEC, value) for _, value, _ in sent]
    assert [(t.seq, t.text) for t in tokens] == [(0, "a"), (1, "bc"), (2, "d")]
    assert all(key == b"s" for key, _, _ in sent)
    assert all(h == [(headers.REPLY_TO, b"gw-1")] for _, _, h in sent)
    assert sink.sent == 3 and sink.started


async def test_tool_calls_go_out_in_the_token_of_their_chunk() -> None:
    sent: list[bytes] = []

    async def send(key: bytes | None, value: bytes, record_headers: Any) -> asyncio.Future[None]:
        sent.append(value)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    lyon, nice = ToolCall("get_weather", '{"city": "Lyon"}'), ToolCall("get_weather", '{"city": "Nice"}', "c2")
    sink = KafkaTokenSink(send, CODEC, _request("r", stream=True))
    await sink.chunk("Checking", flush=True)
    await sink.chunk("", (lyon,))
    await sink.chunk("", (nice,), flush=True)  # batched with the one before
    await sink.chunk(".")
    await sink.close()
    tokens = [decode_token(CODEC, value) for value in sent]
    assert [(t.seq, t.text, t.tool_calls) for t in tokens] == [(0, "Checking", ()), (1, "", (lyon, nice)), (2, ".", ())]


def test_a_cancel_is_remembered_for_its_request_and_only_honoured_from_the_same_key() -> None:
    book = CancelBook(keep_s=600)
    book.add(InferenceCancel("r1", reason="user left"), now=0.0)
    book.add(InferenceCancel("r2", key_name="team-a"), now=1.0)
    assert book.reason(_request("r1")) == "cancelled: user left"
    assert book.reason(_request("other")) is None
    keyed = dataclasses.replace(_request("r2"), key_name="team-a")
    assert book.reason(keyed) == "cancelled by its sender"
    assert book.reason(dataclasses.replace(keyed, key_name="team-b")) is None, "another key cannot cancel it"
    book.add(InferenceCancel("r3"), now=700.0)
    assert book.reason(_request("r1")) is None and len(book) == 1, "older than the look-back: forgotten"
