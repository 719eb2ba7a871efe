"""When a request's answer records are written, and when its offset is acked.

At least once (:class:`AtOnce`): records are written as soon as the answer is ready, and the
request is acked once they are durable and every earlier request of its partition is acked.

Exactly once (:class:`InCommittedPrefix`): Kafka commits a transaction whole, records and offsets
together, so an answer may enter its partition's transaction only when its offset enters it too.
The records wait with their request until it joins the answered prefix of its partition
(streams/acks.py); then they go into the transaction of the *request's* partition and the request
is acked, under a gate that the commit also takes. Faust's own rule (the transaction of the
record's destination partition, and records written whenever they are ready) commits answers of
requests past the offset and leaves answers in transactions that never commit
(docs/reliability.md). Token chunks are not answers: they stay outside, so streaming stays live.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import faust
from faust.types import TP, EventT

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]] | None
Ack = Callable[[EventT], Awaitable[Any]]
# Queues one record outside any transaction; returns the future of its acknowledgement.
Send = Callable[[faust.TopicT, bytes | None, bytes, Headers], Awaitable[Any]]


class Outbox(Protocol):
    async def write(self, event: EventT, topic: faust.TopicT, key: bytes | None, value: bytes,
                    headers: Headers = None) -> None:
        """A record of ``event``'s answer."""

    async def release(self, events: list[EventT]) -> None:
        """``events`` (in offset order) and every earlier one of their partitions are answered."""


async def until_sent(what: str, send: Callable[[], Awaitable[Any]]) -> None:
    """Retry until Kafka acknowledged: the broker being away holds the batch and loses nothing."""
    delay = 0.1
    while True:
        try:
            await (await send())
            return
        except Exception as exc:
            log.warning("producing to %s failed (%r); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class AtOnce:
    """At least once: write now, ack in order once durable."""

    def __init__(self, send: Send, ack: Ack) -> None:
        self._send = send
        self._ack = ack

    async def write(self, event: EventT, topic: faust.TopicT, key: bytes | None, value: bytes,
                    headers: Headers = None) -> None:
        await until_sent(topic.get_topic_name(), lambda: self._send(topic, key, value, headers))

    async def release(self, events: list[EventT]) -> None:
        for event in events:
            await self._ack(event)


class InCommittedPrefix:
    """Exactly once: hold the records until the request is ackable, then write and ack them atomically."""

    def __init__(self, app: faust.App, ack: Ack) -> None:
        self._app = app
        self._ack = ack
        self._held: dict[tuple[TP, int], list[tuple[str, bytes | None, bytes, Headers]]] = {}
        self._gate = asyncio.Lock()

    async def write(self, event: EventT, topic: faust.TopicT, key: bytes | None, value: bytes,
                    headers: Headers = None) -> None:
        message = event.message
        self._held.setdefault((message.tp, message.offset), []).append(
            (topic.get_topic_name(), key, value, headers)
        )

    async def release(self, events: list[EventT]) -> None:
        sends = []
        for event in events:
            message = event.message
            transaction = self._transactional_id(message.tp)
            for topic, key, value, headers in self._held.pop((message.tp, message.offset), []):
                sends.append((topic, lambda t=topic, k=key, v=value, h=headers, tid=transaction:
                              self._app.producer.send(t, k, v, None, None, h, transactional_id=tid)))
        async with self._gate:  # no commit between the writes and their acks
            await asyncio.gather(*(until_sent(topic, send) for topic, send in sends))
            for event in events:
                await self._ack(event)

    async def commit(self) -> None:
        """Commit the acked offsets with the records written for them; Faust's own commit timer is off."""
        async with self._gate:
            await self._app.consumer.commit()

    def _transactional_id(self, tp: TP) -> str:
        """The id Faust gives the transactional producer of a consumed partition (faust/transport/consumer.py)."""
        return f"{self._app.conf.id}-{self._app.assignor.group_for_topic(tp.topic)}-{tp.partition}"
