"""Produce errors: the broker being away is waited out, a record Kafka refuses for good (too large,
not authorized) is given up on, and the worker answers the request with an error response and a
dead letter saying why, so its partition's commits go on past it."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError, KafkaTimeoutError, MessageSizeTooLargeError, NotLeaderForPartitionError,
    ProducerFenced, RequestTimedOutError, TopicAuthorizationFailedError, UnknownTopicOrPartitionError,
)
from faust.exceptions import ProducerSendError

from nexus.settings import Settings
from schemas import Codec, InferenceRequest, InferenceResponse, ModelContext, decode_response, headers, utcnow
from streams.answering.responses import Answer
from streams.commits import outbox
from streams.commits.outbox import REFUSALS_BELIEVED, Retrying, Undeliverable, undeliverable_reason, until_sent
from streams.worker import Worker, WorkerTopics
from tests.eventually import eventually

CODEC = Codec.from_directory()


def wrapped(exc: Exception) -> ProducerSendError:
    """As Faust raises an aiokafka error met at send time."""
    try:
        raise ProducerSendError(f"Error while sending: {exc!r}") from exc
    except ProducerSendError as outer:
        return outer


# ----------------------------------------------------------------------------- the decision (pure)


@pytest.mark.parametrize("error", [
    KafkaTimeoutError(), RequestTimedOutError(), NotLeaderForPartitionError(), KafkaConnectionError(),
    UnknownTopicOrPartitionError(), RuntimeError("anything unknown"), wrapped(KafkaTimeoutError()),
])
def test_the_broker_being_away_is_retried_for_ever_with_a_capped_backoff(error: Exception) -> None:
    retrying = Retrying()
    pauses = [retrying.after(error) for _ in range(50)]
    assert None not in pauses
    assert pauses[:4] == [0.1, 0.2, 0.4, 0.8] and max(pauses) == outbox.LONGEST_PAUSE_S


@pytest.mark.parametrize("error", [
    MessageSizeTooLargeError(), TopicAuthorizationFailedError(), wrapped(MessageSizeTooLargeError("client side")),
])
def test_a_refusal_for_good_is_believed_after_a_few_tries_in_a_row(error: Exception) -> None:
    retrying = Retrying()
    pauses = [retrying.after(error) for _ in range(REFUSALS_BELIEVED)]
    assert pauses[:-1] == [0.1, 0.2] and pauses[-1] is None


def test_a_refusal_between_transient_errors_starts_counting_again() -> None:
    """A small record failed with the too-large batch it shared, then went through: not given up."""
    retrying = Retrying()
    assert retrying.after(MessageSizeTooLargeError()) is not None
    assert retrying.after(KafkaTimeoutError()) is not None
    assert all(retrying.after(MessageSizeTooLargeError()) is not None for _ in range(REFUSALS_BELIEVED - 1))


def test_without_giving_up_a_refusal_is_retried_too() -> None:
    retrying = Retrying(give_up=False)
    assert all(retrying.after(TopicAuthorizationFailedError()) is not None for _ in range(20))


def test_the_reason_says_what_kafka_said_and_what_to_do() -> None:
    too_large = Undeliverable("inference.responses", MessageSizeTooLargeError("the request included a message larger than the max message size the server will accept"))
    assert too_large.too_large
    reason = undeliverable_reason(too_large, 2_000_000)
    assert "the answer (2000000 bytes encoded) exceeds the broker's max message size for inference.responses" in reason
    assert "MessageSizeTooLargeError" in reason and "max.message.bytes" in reason
    denied = Undeliverable("inference.responses", TopicAuthorizationFailedError())
    assert not denied.too_large
    assert "could not be written to inference.responses" in undeliverable_reason(denied, 10)
    assert "TopicAuthorizationFailedError" in undeliverable_reason(denied, 10)


# ----------------------------------------------------------------------------- until_sent


@pytest.fixture()
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pauses of a millisecond (their lengths are the pure tests' business)."""
    monkeypatch.setattr(outbox, "FIRST_PAUSE_S", 0.001)


def sends(*outcomes: Exception | None) -> Any:
    """A send whose acknowledgement fails with each outcome in turn (None: acknowledged)."""
    left = list(outcomes)

    async def send() -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        outcome = left.pop(0)
        if outcome is None:
            future.set_result(None)
        else:
            future.set_exception(outcome)
        return future

    return send


async def test_until_sent_waits_out_the_broker_and_gives_up_on_a_refusal(quick: None) -> None:
    send = sends(KafkaTimeoutError(), NotLeaderForPartitionError(), None)
    await until_sent("t", send)
    with pytest.raises(Undeliverable, match="Kafka refused the record for t: MessageSizeTooLargeError") as refused:
        await until_sent("t", sends(*[MessageSizeTooLargeError()] * REFUSALS_BELIEVED))
    assert refused.value.too_large and isinstance(refused.value.cause, MessageSizeTooLargeError)


async def test_until_sent_raises_the_callers_own_errors_at_once_even_wrapped_by_faust() -> None:
    with pytest.raises(ProducerFenced):
        await until_sent("t", sends(ProducerFenced()), permanent=(ProducerFenced,))
    with pytest.raises(ProducerFenced):
        await until_sent("t", sends(wrapped(ProducerFenced())), permanent=(ProducerFenced,))


# ----------------------------------------------------------------------------- the worker's answer


class Topic:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_topic_name(self) -> str:
        return self.name


class RefusingOutbox:
    """Records as the at-least-once outbox writes them; refuses for good any over ``limit`` bytes,
    or every record of ``denied`` topics."""

    def __init__(self, limit: int, denied: tuple[str, ...] = ()) -> None:
        self.limit = limit
        self.denied = denied
        self.written: list[tuple[str, bytes, dict[str, bytes]]] = []

    async def write(self, event: Any, topic: Topic, key: bytes | None, value: bytes, record_headers: Any = None) -> None:
        if topic.name in self.denied:
            raise Undeliverable(topic.name, TopicAuthorizationFailedError())
        if len(value) > self.limit:
            raise Undeliverable(topic.name, MessageSizeTooLargeError())
        self.written.append((topic.name, value, dict(record_headers or [])))

    async def commit(self, offsets: Any) -> Any:
        return offsets

    def forget(self, keep: Any) -> None:
        pass


class Table(dict):  # type: ignore[type-arg]
    changelog_topic_name = "cache-changelog"

    @property
    def data(self) -> Table:
        return self

    def on_recover(self, fun: Any) -> Any:
        return fun


def worker_with(out: RefusingOutbox) -> Worker:
    topics = WorkerTopics(*(Topic(n) for n in ("responses", "tokens", "dlq", "state", "queue")))
    worker = Worker(SimpleNamespace(), Settings(), topics, Table())  # type: ignore[arg-type]
    worker._outbox = out
    return worker


def event(offset: int = 7) -> Any:
    message = SimpleNamespace(topic="inference.requests", partition=0, offset=offset, key=b"m",
                              value=b"the request record", headers=[], tp=("inference.requests", 0))
    return SimpleNamespace(message=message)


def answer_of(request: InferenceRequest, output: str) -> Answer:
    return Answer(InferenceResponse(id=request.id, model_id=request.model_id, status="ok", output=output,
                                    context=request.context, latency_ms=5, completed_at=utcnow(), reply_to="gw-1"))


async def test_a_response_too_large_for_kafka_becomes_an_error_response_and_a_dead_letter() -> None:
    out = RefusingOutbox(limit=10_000)
    worker = worker_with(out)
    request = InferenceRequest("big", "m", "say a lot", ModelContext("s"), reply_to="gw-1")
    await worker.publish(answer_of(request, "x" * 50_000), event(), request)

    [(topic, value, response_headers), (dlq, dead, dead_headers)] = out.written
    response = decode_response(CODEC, value)
    assert (topic, response.id, response.status, response.output) == ("responses", "big", "error", "")
    assert "exceeds the broker's max message size for responses" in (response.error or "")
    assert response_headers[headers.REPLY_TO] == b"gw-1", "the waiting gateway still finds its answer"
    assert (dlq, dead) == ("dlq", b"the request record")
    assert dead_headers[headers.ERROR_KIND] == b"undeliverable"
    assert b"exceeds the broker's max message size" in dead_headers[headers.ERROR]
    assert dead_headers[headers.SOURCE] == b"inference.requests/0/7"


async def test_a_topic_that_refuses_every_record_gets_no_error_response_only_the_dead_letter() -> None:
    out = RefusingOutbox(limit=10_000, denied=("responses",))
    worker = worker_with(out)
    request = InferenceRequest("denied", "m", "hi", ModelContext("s"))
    await worker.publish(answer_of(request, "fine"), event(), request)
    [(dlq, _, dead_headers)] = out.written
    assert dlq == "dlq" and b"TopicAuthorizationFailedError" in dead_headers[headers.ERROR]


async def test_a_dead_letter_refused_for_good_is_held_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing else would record the request: it stays unanswered (its partition's commit waits)."""
    out = RefusingOutbox(limit=10_000, denied=("responses", "dlq"))
    worker = worker_with(out)
    request = InferenceRequest("nowhere", "m", "hi", ModelContext("s"))
    monkeypatch.setattr("streams.worker.FIRST_HOLD_S", 0.01)
    held = asyncio.ensure_future(worker.publish(answer_of(request, "fine"), event(), request))
    await eventually(lambda: not worker.health_report()[0], "the refused dead letter shows on /health")
    assert not held.done() and out.written == []
    out.denied = ("responses",)  # an operator fixed the dead-letter topic's ACLs
    await asyncio.wait_for(held, 5)
    assert [t for t, _, _ in out.written] == ["dlq"]


async def test_a_failed_answer_refused_keeps_its_own_reason_in_the_dead_letter() -> None:
    out = RefusingOutbox(limit=300)
    worker = worker_with(out)
    request = InferenceRequest("failed", "m", "hi", ModelContext("s"))
    failed = Answer(dataclasses.replace(answer_of(request, "").response, status="error", error="e" * 400),
                    dead_letter_reason="the endpoint said no")
    await worker.publish(failed, event(), request)
    dead_headers = out.written[-1][2]
    assert b"the answer was an error already: the endpoint said no" in dead_headers[headers.ERROR]


async def test_under_exactly_once_a_record_over_the_producers_limit_is_refused_before_its_transaction() -> None:
    """It never enters the partition's transaction (where a refusal would take the others with it)."""
    app = SimpleNamespace(conf=SimpleNamespace(producer_max_request_size=1_000))
    held = outbox.InCommittedPrefix(app)  # type: ignore[arg-type]
    await held.write(event(1), Topic("responses"), b"s", b"x" * 500, [(headers.REPLY_TO, b"gw")])
    with pytest.raises(Undeliverable, match="over the producer's max_request_size") as refused:
        await held.write(event(2), Topic("responses"), b"s", b"x" * 2_000)
    assert refused.value.too_large
    assert [offset for offsets in held._held.values() for offset in offsets] == [1]
