"""How far the worker group is behind on the requests topic, per partition (a metric)."""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from nexus.kafka.clients import client_options
from nexus.kafka.readers import reader
from nexus.kafka.topics import partitions_of
from nexus.settings import KafkaSettings


def lag_per_partition(ends: Mapping[TopicPartition, int], committed: Mapping[TopicPartition, object]) -> dict[int, int]:
    """End offset minus committed offset; a partition never committed lags by its whole end offset.

    ``committed`` maps to aiokafka's ``OffsetAndMetadata`` (its ``offset`` is -1 when none).
    """
    lag = {}
    for tp, end in ends.items():
        meta = committed.get(tp)
        offset = getattr(meta, "offset", -1) if meta is not None else -1
        lag[tp.partition] = end - (offset if offset >= 0 else 0)
    return lag


async def consumer_lag(kafka: KafkaSettings, group: str, topic: str) -> dict[int, int]:
    """End offset minus committed offset, per partition of ``topic``, for the worker group."""
    admin = AIOKafkaAdminClient(**client_options(kafka))
    # The high watermark, whatever kafka.isolation_level says: records not consumed yet, in a
    # transaction or not.
    consumer = reader(kafka, "nexus-worker-lag", isolation_level="read_uncommitted")
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        tps = [TopicPartition(topic, p) for p in await partitions_of(admin, topic)]
        return lag_per_partition(await consumer.end_offsets(tps), committed)
    finally:
        await consumer.stop()
        await admin.close()
