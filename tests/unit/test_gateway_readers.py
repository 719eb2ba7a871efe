"""The gateway's background readers restart when they fail, and /health says so meanwhile.

Kafka is replaced by a scripted consumer: each ``getmany`` takes the next item the test
queued (records, or an exception that kills the reader).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, UTC
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from nexus.kafka import readers
from nexus.settings import KafkaSettings, Settings
from nexus.tasks import Background, TaskState
from producers import replies
from producers.gateway.app import reader_checks
from producers.gateway.models import EndpointStateReader
from producers.replies import REPLY_HEADER, ReplyIndex, ReplyReader, ReplyReaderError
from schemas import Codec, InferenceResponse, ModelContext, WorkerReport, encode_response
from schemas.headers import REPLY_TO
from tests.eventually import eventually

KAFKA = KafkaSettings()
CODEC = Codec.from_directory()


class FakeConsumer:
    def __init__(self, **options: Any) -> None:
        self.options = options
        self.feed: asyncio.Queue[dict[TopicPartition, list[Any]] | BaseException] = asyncio.Queue()
        self.started = self.stopped = False
        self.seeks: list[str] = []

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Any]]:
        item = await self.feed.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = tps

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        self.seeks.append("beginning")


class Pauses:
    def __init__(self) -> None:
        self.asked: list[float] = []
        self._go = asyncio.Semaphore(0)

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        await self._go.acquire()

    def end_one(self) -> None:
        self._go.release()


@pytest.fixture()
def consumers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeConsumer]]:
    made: list[FakeConsumer] = []

    def reader(kafka: KafkaSettings, client_id: str = "nexus", **options: Any) -> FakeConsumer:
        consumer = FakeConsumer(client_id=client_id, **options)
        made.append(consumer)
        return consumer

    async def read_from_end(consumer: FakeConsumer, topics: list[str], timeout_s: float = 5.0) -> dict:
        consumer.seeks.append(f"end of {sorted(topics)}")
        return {}

    async def known_partitions(consumer: FakeConsumer, topic: str, timeout_s: float = 5.0) -> list[int]:
        return [0]

    monkeypatch.setattr(replies, "reader", reader)
    monkeypatch.setattr(replies, "read_from_end", read_from_end)
    monkeypatch.setattr(readers, "reader", reader)
    monkeypatch.setattr(readers, "known_partitions", known_partitions)
    yield made


def answer(request_id: str, to: bytes) -> SimpleNamespace:
    response = InferenceResponse(id=request_id, model_id="llama3.1", status="ok", context=ModelContext("s"),
                                 latency_ms=1, completed_at=datetime(2024, 5, 1, tzinfo=UTC), output="hi")
    return SimpleNamespace(headers=[(REPLY_TO, to)], value=encode_response(CODEC, response))


def health(state: TaskState | None) -> dict[str, Any]:
    assert state is not None
    return reader_checks([state])[f"reader:{state.name}"]


def test_the_old_header_name_is_the_contracts() -> None:
    assert REPLY_HEADER == REPLY_TO == "nexus-reply-to"


async def test_a_dead_reply_reader_fails_its_callers_then_follows_from_the_ends_again(consumers: list[FakeConsumer]) -> None:
    pauses, index = Pauses(), ReplyIndex()
    reader = ReplyReader(KAFKA, "gateway-me", index, CODEC, Background((0.5,), sleep=pauses.sleep))
    await reader.start()
    [first] = consumers
    assert first.options == {"client_id": "gateway-me", "fetch_max_wait_ms": 50}
    assert first.seeks == [f"end of {sorted([KAFKA.responses_topic, KAFKA.tokens_topic])}"]
    reader.check()
    assert health(reader.state) == {"status": "ok", "restarts": 0}

    waiting = index.expect("r1", stream=False)
    first.feed.put_nowait(ConnectionResetError("broker went away"))
    await eventually(lambda: waiting.done.done(), "the waiter's failure", interval=0.001)
    with pytest.raises(ReplyReaderError, match="the reply reader stopped"):
        waiting.done.result()
    assert first.stopped and isinstance(reader.failure, ConnectionResetError)
    with pytest.raises(ReplyReaderError, match="being restarted"):
        reader.check()  # new calls are refused (503) instead of waiting in vain
    down = health(reader.state)
    assert down["status"] == "down" and "ConnectionResetError: broker went away" in down["reason"]
    assert down["last_error"] == "ConnectionResetError: broker went away"

    pauses.end_one()
    await eventually(lambda: len(consumers) == 2 and reader.state is not None and reader.state.up, "the restart",
                     interval=0.001)
    second = consumers[1]
    assert second.seeks == first.seeks  # assigned again, at the ends again
    reader.check()
    assert health(reader.state) == {"status": "ok", "restarts": 1, "last_error": "ConnectionResetError: broker went away"}
    again = index.expect("r2", stream=False)
    second.feed.put_nowait({TopicPartition(KAFKA.responses_topic, 0): [answer("r2", b"gateway-me")]})
    assert (await asyncio.wait_for(again.done, 5)).output == "hi"

    await reader.stop()
    assert second.stopped and reader.state is None
    with pytest.raises(ReplyReaderError, match="not running"):
        reader.check()


async def test_a_reply_reader_that_cannot_connect_again_keeps_trying_and_stays_down(
    consumers: list[FakeConsumer], monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses = Pauses()
    reader = ReplyReader(KAFKA, "gateway-me", ReplyIndex(), CODEC, Background((0.5, 1.0), sleep=pauses.sleep))
    await reader.start()

    async def missing(consumer: FakeConsumer, topics: list[str], timeout_s: float = 5.0) -> dict:
        raise replies.TopicMissingError("topic 'inference.responses' does not exist")

    monkeypatch.setattr(replies, "read_from_end", missing)
    consumers[0].feed.put_nowait(OSError("gone"))
    pauses.end_one()  # the first restart cannot connect either
    await eventually(lambda: pauses.asked == [0.5, 1.0], "a second pause", interval=0.001)
    assert "does not exist" in health(reader.state)["reason"]
    assert all(c.stopped for c in consumers)  # no consumer is left behind
    await reader.stop()


async def test_a_dead_endpoint_state_reader_reads_the_topic_from_the_beginning_again(consumers: list[FakeConsumer]) -> None:
    pauses = Pauses()
    reader = EndpointStateReader(Settings(kafka=KAFKA), Background((0.5,), sleep=pauses.sleep))
    await reader.start()
    [first] = consumers
    assert first.seeks == ["beginning"] and first.assigned == [TopicPartition(KAFKA.state_topic, 0)]
    tp = TopicPartition(KAFKA.state_topic, 0)
    first.feed.put_nowait({tp: [SimpleNamespace(value=WorkerReport("w1", 1.0).to_bytes())]})
    await eventually(lambda: "w1" in reader.reports, "the first report", interval=0.001)
    assert health(reader.state)["status"] == "ok"

    first.feed.put_nowait(RuntimeError("fetch failed"))
    await eventually(lambda: health(reader.state)["status"] == "down", "the failure", interval=0.001)
    assert "RuntimeError: fetch failed" in health(reader.state)["reason"]
    assert first.stopped and "w1" in reader.reports  # what was read stays meanwhile

    pauses.end_one()
    await eventually(lambda: health(reader.state)["status"] == "ok", "the restart", interval=0.001)
    assert consumers[1].seeks == ["beginning"]
    await reader.stop()
    assert consumers[1].stopped


async def test_a_gateway_that_cannot_read_the_state_topic_at_start_still_starts(
    consumers: list[FakeConsumer], monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = []

    async def unreachable(consumer: FakeConsumer, topic: str, timeout_s: float = 5.0) -> list[int]:
        attempts.append(topic)
        raise ConnectionRefusedError("no broker")

    monkeypatch.setattr(readers, "known_partitions", unreachable)
    pauses = Pauses()
    reader = EndpointStateReader(Settings(kafka=KAFKA), Background((0.5,), sleep=pauses.sleep))
    await reader.start()  # not fatal
    await eventually(lambda: pauses.asked == [0.5], "the loop's own attempt and its pause", interval=0.001)
    assert len(attempts) == 2 and all(c.stopped for c in consumers)
    assert health(reader.state)["status"] == "down"
    await reader.stop()


def test_health_entries_name_the_reader_and_its_error() -> None:
    up = TaskState("replies")
    failed = TaskState("endpoint-state", status="restarting", restarts=2, last_error="KafkaError: x", failed_at=1.0)
    connecting = TaskState("replies", restarts=1, last_error="OSError: y", ready=lambda: False)
    assert reader_checks([up]) == {"reader:replies": {"status": "ok", "restarts": 0}}
    assert reader_checks([failed]) == {"reader:endpoint-state": {
        "status": "down", "restarts": 2, "last_error": "KafkaError: x",
        "reason": "the endpoint-state reader is restarting; it failed with KafkaError: x"}}
    assert reader_checks([connecting])["reader:replies"]["reason"] == (
        "the replies reader is not following its topic yet; it failed with OSError: y")
