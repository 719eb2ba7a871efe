"""Group-less Kafka readers: one way to build them and to place them in a log.

Every Nexus role that reads a topic without taking part in a consumer group (the
gateway's reply and model readers, the bridge, replay, the worker's offset probes)
builds its consumer with :func:`reader` and positions it with the helpers below:
from the end (:func:`read_from_end`, for live answers), from a time
(:func:`read_from_time`, for history) or over a fixed range. Why group-less: these
readers must never join the workers' group nor move its committed offsets.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from nexus.errors import NexusError
from nexus.kafka.clients import client_options
from nexus.settings import KafkaSettings
from nexus.tasks import Background, TaskState

__all__ = [
    "CompactedTopicReader", "TopicMissingError", "known_partitions", "read_from_end", "read_from_time", "reader",
]

log = logging.getLogger(__name__)


def reader(kafka: KafkaSettings, client_id: str = "nexus", **options: Any) -> AIOKafkaConsumer:
    """A consumer in no group that commits nothing and reads what the settings' isolation level allows.

    ``options`` override or extend aiokafka's (``fetch_max_wait_ms``, ``auto_offset_reset``...).
    """
    settings: dict[str, Any] = {
        **client_options(kafka),
        "group_id": None,
        "enable_auto_commit": False,
        "client_id": client_id,
        "isolation_level": kafka.isolation_level,
    }
    settings.update(options)
    return AIOKafkaConsumer(**settings)


class TopicMissingError(NexusError):
    """A topic Nexus reads does not exist (yet) on the cluster."""


async def known_partitions(consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 5.0) -> list[int]:
    """The partitions of ``topic`` as a started, group-less consumer can see them.

    A consumer that subscribes to nothing learns a topic's partitions only when it
    asks; aiokafka has no public refresh, hence the private call. Waits up to
    ``timeout_s`` for a topic being created.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return sorted(partitions)
        if loop.time() > deadline:
            raise TopicMissingError(
                f"topic {topic!r} does not exist: start a Nexus worker or gateway there first "
                "(they create the topics)"
            )
        await consumer._client.force_metadata_update()
        if not consumer.partitions_for_topic(topic):
            await asyncio.sleep(0.2)  # the topic may be being created


async def read_from_end(consumer: AIOKafkaConsumer, topics: list[str], timeout_s: float = 5.0) -> dict[TopicPartition, int]:
    """Assign every partition of ``topics`` and fix the positions at their current ends.

    Positions are resolved now, not lazily, so every record produced after this
    returns is read: start readers before producing what they wait for. Returns
    the position of each partition.
    """
    tps = [TopicPartition(t, p) for t in topics for p in await known_partitions(consumer, t, timeout_s)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    return {tp: await consumer.position(tp) for tp in tps}


async def read_from_time(consumer: AIOKafkaConsumer, tps: list[TopicPartition], since_ms: int) -> dict[TopicPartition, int | None]:
    """Assign ``tps`` and place each at its first record stamped ``since_ms`` or later.

    Returns each partition's start offset, or ``None`` where no record is that recent
    (the partition is left at its end).
    """
    consumer.assign(tps)
    found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
    starts: dict[TopicPartition, int | None] = {}
    ends = await consumer.end_offsets(tps)
    for tp in tps:
        at = found.get(tp)
        if at is None:
            consumer.seek(tp, ends[tp])
            starts[tp] = None
        else:
            consumer.seek(tp, at.offset)
            starts[tp] = at.offset
    return starts


class CompactedTopicReader:
    """Follows a compacted topic (the latest record per key is what counts) from its beginning, in
    the background, giving each record's value to :meth:`ingest`.

    The loop runs under ``background`` as the task :attr:`TASK`; when it fails it is started
    again, reading the topic from the beginning again (what was read so far stays until newer
    records replace it). Subclasses name :attr:`TASK` and :attr:`topic` and define :meth:`ingest`.
    """

    TASK = "compacted-topic"

    def __init__(self, kafka: KafkaSettings, background: Background | None, client_id: str) -> None:
        self._kafka = kafka
        self._background = background or Background()
        self._client_id = client_id
        self._consumer: AIOKafkaConsumer | None = None
        self._state: TaskState | None = None
        self._following = False

    @property
    def topic(self) -> str:
        raise NotImplementedError

    def ingest(self, value: bytes | None) -> bool:
        """Take one record's value; False when it was skipped."""
        raise NotImplementedError

    @property
    def state(self) -> TaskState | None:
        """The reading task as ``/health`` reports it; ``None`` before :meth:`start`."""
        return self._state

    async def start(self) -> None:
        """Connect now if Kafka lets us (so ``/health`` is green from the start), then follow in the
        background. A failure to connect is not fatal: the loop keeps trying, and ``/health`` says so."""
        try:
            self._consumer = await self._connect()
            self._following = True
        except Exception as exc:  # noqa: BLE001 - retried, with the traceback, by the loop
            log.warning("cannot read %s yet (%s); retrying in the background", self.topic, exc)
        self._state = self._background.start(self.TASK, self._follow, ready=lambda: self._following)

    async def stop(self) -> None:
        self._following = False
        await self._background.stop(self.TASK)
        self._state = None
        if self._consumer is not None:  # stopped before its loop ever ran
            await self._consumer.stop()
            self._consumer = None

    async def _connect(self) -> AIOKafkaConsumer:
        """A started consumer assigned every partition of the topic, at its beginning."""
        consumer = reader(self._kafka, client_id=self._client_id, fetch_max_wait_ms=200)
        try:
            await consumer.start()
            tps = [TopicPartition(self.topic, p) for p in await known_partitions(consumer, self.topic)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def _follow(self) -> None:
        """The supervised loop: read until cancelled; a failure propagates (logged, restarted)."""
        try:
            if self._consumer is None:  # a restart: from the beginning again
                self._consumer = await self._connect()
                self._following = True
            consumer = self._consumer
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        self.ingest(record.value)
        finally:
            self._following = False
            consumer, self._consumer = self._consumer, None
            if consumer is not None:
                await consumer.stop()
