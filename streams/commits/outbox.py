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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import faust
from aiokafka import TopicPartition
from aiokafka.errors import IllegalOperation, ProducerFenced
from faust.types import TP, EventT

log = logging.getLogger(__name__)

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
    what: str, send: Callable[[], Awaitable[Any]], permanent: tuple[type[Exception], ...] = ()
) -> None:
    """Retry until Kafka acknowledged: the broker being away holds the batch and loses nothing.

    ``permanent`` errors are raised at once: retrying cannot help them.
    """
    delay = 0.1
    while True:
        try:
            await (await send())
            return
        except permanent:
            raise
        except Exception as exc:
            log.warning("producing to %s failed (%r); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


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
        message = event.message
        self._held.setdefault(message.tp, {}).setdefault(message.offset, []).append(
            (topic.get_topic_name(), key, value, headers)
        )

    async def commit(self, offsets: dict[TP, int]) -> dict[TP, int]:
        """Write the held records of the requests below ``offsets`` into their partitions'
        transactions, then commit those with the offsets (and Faust's own acked offsets, of the
        cache agent: its commit timer is off under exactly once).

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
            await self._app.consumer.commit()
            return offsets if offsets and await commit_offsets(self._app, offsets) else {}

    async def _write(self, tp: TP, records: list[tuple[str, bytes | None, bytes, Headers]]) -> bool:
        """Write ``records`` in ``tp``'s transaction, retrying while Kafka is away; False if fenced."""
        transaction = self._transactional_id(tp)
        sends = []
        for topic, key, value, headers in records:
            sends.append(until_sent(topic, lambda t=topic, k=key, v=value, h=headers:
                                    self._app.producer.send(t, k, v, None, None, h, transactional_id=transaction),
                                    permanent=(ProducerFenced, IllegalOperation)))
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
