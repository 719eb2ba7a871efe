"""When a request's answer records are written, and how its partition's offsets are committed.

At least once (:class:`AtOnce`): records are written as soon as the answer is ready; the worker
commits each partition up to its lowest unanswered request (streams/commits/ledger.py), so a committed
offset always has its answers durably written.

Exactly once (:class:`InCommittedPrefix`): Kafka commits a transaction whole, records and offsets
together, so an answer may enter its partition's transaction only when its offset enters it too.
The records wait with their request until the commit covers it; then they go into the transaction
of the *request's* partition, which commits them with the offset, under a gate. Faust's own rule
(the transaction of the record's destination partition, and records written whenever they are
ready) commits answers of requests past the offset and leaves answers in transactions that never
commit (docs/reliability.md). Token chunks are not answers: they stay outside, so streaming stays
live.

Produce errors (:class:`Retrying`): the broker being away is waited out; a record Kafka refuses for
good (too large, not authorized) raises :class:`Undeliverable`, and the worker answers the request
with an error response and a dead letter instead (streams/worker.py, ``publish_undeliverable``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import faust
from aiokafka import TopicPartition
from aiokafka.errors import (
    ClusterAuthorizationFailedError, IllegalOperation, InvalidTimestampError, InvalidTopicError,
    MessageSizeTooLargeError, ProducerFenced, RecordListTooLargeError, TopicAuthorizationFailedError,
    UnsupportedForMessageFormatError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from faust.types import TP, EventT

from nexus.errors import NexusError

log = logging.getLogger(__name__)

# Errors no retry can fix: the record is over a size limit (the producer's max_request_size, the
# topic's max.message.bytes), or the topic refuses this worker or any record. aiokafka's own
# ``retriable`` flag is not the rule: it calls KafkaTimeoutError (the broker away for a while,
# which retrying outlasts) not retriable too. Anything else is retried. UnknownTopicOrPartition
# is retried as well: a topic being created (or recreated by an operator) is a wait, not a loss.
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
REFUSED_FOR_GOOD = (
    *TOO_LARGE, TopicAuthorizationFailedError, ClusterAuthorizationFailedError, InvalidTopicError,
    UnsupportedForMessageFormatError, InvalidTimestampError,
)
# A refusal is believed after this many tries in a row: aiokafka fails a whole batch for its
# too-large record, so a small record that shared its batch succeeds when tried again alone.
REFUSALS_BELIEVED = 3
FIRST_PAUSE_S = 0.1
LONGEST_PAUSE_S = 5.0


class Undeliverable(NexusError):
    """Kafka refused a record for good (too large, not authorized, an invalid topic): retrying
    cannot help. ``too_large`` says whether a smaller record may still go to the same topic."""

    def __init__(self, topic: str, cause: BaseException) -> None:
        self.topic = topic
        self.cause = cause
        self.too_large = isinstance(cause, TOO_LARGE)
        super().__init__(f"Kafka refused the record for {topic}: {type(cause).__name__}: {cause}")


def undeliverable_reason(refused: Undeliverable, size: int) -> str:
    """Why a request's response was not delivered, for its error response and its dead letter:
    what Kafka said, and what an operator can do about it."""
    if refused.too_large:
        return (f"the answer ({size} bytes encoded) exceeds the broker's max message size for {refused.topic} "
                f"({type(refused.cause).__name__}: {refused.cause}); raise the topic's max.message.bytes (and "
                f"the producer's max_request_size), or ask for a shorter answer")
    return (f"the answer could not be written to {refused.topic}: Kafka refused it for good "
            f"({type(refused.cause).__name__}: {refused.cause})")


def kafka_cause(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """``exc`` or what caused it, when one is of ``kinds``: Faust wraps aiokafka's errors at send
    time (``ProducerSendError ... from exc``); the acknowledgement's own errors are aiokafka's."""
    seen: BaseException | None = exc
    for _ in range(8):  # a cause chain is short; a cycle is not followed forever
        if seen is None:
            return None
        if isinstance(seen, kinds):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class Retrying:
    """After each failed produce: how long to pause before trying again, or give up. No I/O.

    The broker being away (timeouts, no leader, connection errors, anything unknown) is waited
    out with a backoff, however long it takes: the records wait with their request, the commit
    stays below it, nothing is lost. A refusal for good (:data:`REFUSED_FOR_GOOD`), met
    :data:`REFUSALS_BELIEVED` times in a row, gives up, unless ``give_up`` is false.
    """

    def __init__(self, give_up: bool = True) -> None:
        self._give_up = give_up
        self._pause = FIRST_PAUSE_S
        self.refusals = 0

    def after(self, exc: BaseException) -> float | None:
        """The pause before the next try after ``exc``; None: give up (raise :class:`Undeliverable`)."""
        if kafka_cause(exc, REFUSED_FOR_GOOD) is not None:
            self.refusals += 1
            if self._give_up and self.refusals >= REFUSALS_BELIEVED:
                return None
        else:
            self.refusals = 0
        pause = self._pause
        self._pause = min(self._pause * 2, LONGEST_PAUSE_S)
        return pause

Headers = list[tuple[str, bytes]] | None
# Queues one record outside any transaction; returns the future of its acknowledgement.
Send = Callable[[faust.TopicT, bytes | None, bytes, Headers], Awaitable[Any]]


class Outbox(Protocol):
    async def write(self, event: EventT, topic: faust.TopicT, key: bytes | None, value: bytes,
                    headers: Headers = None) -> None:
        """A record of ``event``'s answer; returns once it counts as answered."""

    async def commit(self, offsets: dict[TP, int]) -> dict[TP, int]:
        """Commit ``offsets`` (every request below each is answered); returns those Kafka accepted."""

    def forget(self, keep: set[TP]) -> None:
        """Partitions other than ``keep`` were lost: drop what is held for them."""


async def until_sent(
    what: str, send: Callable[[], Awaitable[Any]], permanent: tuple[type[Exception], ...] = (),
    give_up: bool = True,
) -> None:
    """Retry until Kafka acknowledged: the broker being away holds the batch and loses nothing.

    ``permanent`` errors are raised at once (as aiokafka raised them): the caller knows what
    they mean. A record Kafka refuses for good raises :class:`Undeliverable` (see
    :class:`Retrying`); with ``give_up`` false it is retried too, and logged as an error.
    """
    retrying = Retrying(give_up)
    while True:
        try:
            await (await send())
            return
        except Exception as exc:
            known = kafka_cause(exc, permanent) if permanent else None
            if known is exc:
                raise
            if known is not None:
                raise known from None  # unwrapped from Faust's ProducerSendError
            pause = retrying.after(exc)
            if pause is None:
                raise Undeliverable(what, kafka_cause(exc, REFUSED_FOR_GOOD) or exc) from exc
            level = logging.ERROR if retrying.refusals else logging.WARNING
            log.log(level, "producing to %s failed (%r); retrying in %.1fs", what, exc, pause)
            await asyncio.sleep(pause)


async def commit_offsets(app: faust.App, offsets: dict[TP, int]) -> bool:
    """Commit exactly ``offsets`` through Faust's consumer (in the partitions' transactions
    under exactly once). The requests topic is read without Faust's acks, whose commit can pass
    an unacked offset (docs/reliability.md); this is the one place its offsets are committed."""
    consumer: Any = app.consumer
    # aiokafka's transactional commit wants its own TopicPartition, not Faust's TP tuple.
    return bool(await consumer._commit_offsets({TopicPartition(tp.topic, tp.partition): o for tp, o in offsets.items()}))


class AtOnce:
    """At least once: write now; commit what the ledger says is answered."""

    def __init__(self, app: faust.App, send: Send) -> None:
        self._app = app
        self._send = send
        self._gate = asyncio.Lock()

    async def write(self, event: EventT, topic: faust.TopicT, key: bytes | None, value: bytes,
                    headers: Headers = None) -> None:
        await until_sent(topic.get_topic_name(), lambda: self._send(topic, key, value, headers))

    async def commit(self, offsets: dict[TP, int]) -> dict[TP, int]:
        async with self._gate:
            return offsets if await commit_offsets(self._app, offsets) else {}

    def forget(self, keep: set[TP]) -> None:
        pass


class InCommittedPrefix:
    """Exactly once: hold the records until the commit covers their request, then write and commit
    them in one transaction."""

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._held: dict[TP, dict[int, list[tuple[str, bytes | None, bytes, Headers]]]] = {}
        self._gate = asyncio.Lock()

    async def write(self, event: EventT, topic: faust.TopicT, key: bytes | None, value: bytes,
                    headers: Headers = None) -> None:
        """Hold the record; raise :class:`Undeliverable` now for one over the producer's size limit.

        A refusal met only inside the transaction (a topic's max.message.bytes below the producer's
        limit, authorization) is not given up on: the transaction holds other requests' records.
        """
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers or [])
        limit = self._app.conf.producer_max_request_size
        if size > limit:
            raise Undeliverable(topic.get_topic_name(), MessageSizeTooLargeError(
                f"the record is {size} bytes, over the producer's max_request_size ({limit})"))
        message = event.message
        self._held.setdefault(message.tp, {}).setdefault(message.offset, []).append(
            (topic.get_topic_name(), key, value, headers)
        )

    async def commit(self, offsets: dict[TP, int]) -> dict[TP, int]:
        """Write the held records of the requests below ``offsets`` into their partitions'
        transactions, then commit those with the offsets.

        A partition whose transactional producer was fenced (another worker owns it now, this one
        was out of the group) is left to its new owner: its held records are dropped, its offset
        is not committed, and the new owner answers those requests.
        """
        async with self._gate:
            offsets = dict(offsets)
            for tp, below in list(offsets.items()):
                held = self._held.get(tp, {})
                records = [r for offset in sorted(o for o in held if o < below) for r in held.pop(offset)]
                if not await self._write(tp, records):
                    self._held.pop(tp, None)
                    del offsets[tp]
            return offsets if offsets and await commit_offsets(self._app, offsets) else {}

    async def _write(self, tp: TP, records: list[tuple[str, bytes | None, bytes, Headers]]) -> bool:
        """Write ``records`` in ``tp``'s transaction, retrying while Kafka is away; False if fenced."""
        transaction = self._transactional_id(tp)
        sends = []
        for topic, key, value, headers in records:
            # The defaults bind this record's values; mypy cannot type such a lambda as Callable[[], ...].
            sends.append(until_sent(topic, lambda t=topic, k=key, v=value, h=headers:  # type: ignore[misc]
                                    self._app.producer.send(t, k, v, None, None, h, transactional_id=transaction),
                                    permanent=(ProducerFenced, IllegalOperation), give_up=False))
        try:
            await asyncio.gather(*sends)
        except (ProducerFenced, IllegalOperation) as exc:
            log.warning("the transaction of %s/%s is fenced (%r): another worker owns the partition; "
                        "it answers the requests held here", tp.topic, tp.partition, exc)
            return False
        return True

    def forget(self, keep: set[TP]) -> None:
        for tp in [tp for tp in self._held if tp not in keep]:
            del self._held[tp]

    def _transactional_id(self, tp: TP) -> str:
        """The id Faust gives the transactional producer of a consumed partition (faust/transport/consumer.py)."""
        return f"{self._app.conf.id}-{self._app.assignor.group_for_topic(tp.topic)}-{tp.partition}"
