"""What the broker says about the requests partitions, asked on a connection of the worker's own.

The ledger (streams/commits/ledger.py) starts each newly owned partition's run at its committed offset
(or, never committed, at its log start), not at whatever Faust delivers first, and asks whether
a hole in the run holds records (read them again) or none (transaction markers, deleted log).
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from nexus.kafka.clients import client_options
from nexus.kafka.readers import reader
from nexus.settings import KafkaSettings

PROBE_TIMEOUT_S = 5.0


class PartitionOffsets:
    """Committed offsets of the worker group, log starts and first records, per partition."""

    def __init__(self, kafka: KafkaSettings, group: str) -> None:
        self._kafka = kafka
        self._group = group
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._consumer is None:
            admin = AIOKafkaAdminClient(**client_options(self._kafka))
            # A reader reads as the worker reads (read_committed under exactly once), or it would
            # see aborted records.
            consumer = reader(self._kafka, "nexus-worker-offsets")
            await admin.start()
            await consumer.start()
            self._admin, self._consumer = admin, consumer
        return self._admin, self._consumer

    async def start_of_run(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Where each partition's unanswered requests begin: its committed offset, else its log start."""
        if not partitions:
            return {}
        async with self._lock:
            admin, consumer = await self._clients()
            tps = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
            committed = await admin.list_consumer_group_offsets(self._group, partitions=tps)
            starts = {tp: meta.offset for tp, meta in committed.items() if meta is not None and meta.offset >= 0}
            never = [tp for tp in tps if tp not in starts]
            if never:
                starts.update(await consumer.beginning_offsets(never))
            return starts

    async def first_record(self, tp: TopicPartition, start: int, end: int) -> int | None:
        """The offset of the first record of ``tp`` in [start, end), or None if there is none."""
        async with self._lock:
            _, consumer = await self._clients()
            tp = TopicPartition(tp.topic, tp.partition)
            log_start = (await consumer.beginning_offsets([tp]))[tp]
            if log_start >= end:
                return None
            consumer.assign([tp])
            consumer.seek(tp, max(start, log_start))
            deadline = asyncio.get_running_loop().time() + PROBE_TIMEOUT_S
            while asyncio.get_running_loop().time() < deadline:
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=1)
                for record in batch.get(tp, []):
                    return record.offset if record.offset < end else None
            raise TimeoutError(f"no record of {tp.topic}/{tp.partition} from {start} within {PROBE_TIMEOUT_S}s")

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()
