"""Real-broker tests for localdev.broker: a KRaft broker on free ports with data in tmp_path.

Why real: the point of LocalKafka is that clients see a genuine broker (acks=all,
restarts keeping data), which a mock cannot prove.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from localdev.broker import KafkaError, LocalKafka, free_port


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    broker = LocalKafka(port=free_port(), data_dir=tmp_path_factory.mktemp("kafka"))
    broker.start(timeout=60)
    try:
        yield broker
    finally:
        broker.stop()


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()


async def _read_all(bootstrap: str, topic: str, expected: int) -> list[bytes]:
    """Read partition 0 from the beginning until ``expected`` records arrived (or time out)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        values: list[bytes] = []
        async with asyncio.timeout(20):
            while len(values) < expected:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                values.extend(msg.value for msg in batch.get(tp, []) if msg.value is not None)
        return values
    finally:
        await consumer.stop()


async def test_produce_consume_round_trip(kafka: LocalKafka) -> None:
    assert kafka.is_running()
    assert kafka.bootstrap == f"127.0.0.1:{kafka.port}"
    await _create_topic(kafka.bootstrap, "roundtrip")
    await _produce(kafka.bootstrap, "roundtrip", b"hello nexus")
    assert await _read_all(kafka.bootstrap, "roundtrip", expected=1) == [b"hello nexus"]


async def test_restart_keeps_data_and_cluster(kafka: LocalKafka) -> None:
    await _create_topic(kafka.bootstrap, "durable")
    await _produce(kafka.bootstrap, "durable", b"before restart")
    cluster_id, controller_port = kafka.cluster_id, kafka.controller_port
    kafka.stop()
    assert not kafka.is_running()

    # A fresh object on the same data dir must find the saved controller port and cluster id.
    restarted = LocalKafka(port=kafka.port, data_dir=kafka.data_dir)
    restarted.start(timeout=60)
    try:
        assert restarted.controller_port == controller_port
        assert restarted.cluster_id == cluster_id
        assert await _read_all(restarted.bootstrap, "durable", expected=1) == [b"before restart"]
    finally:
        restarted.stop()
    kafka.start(timeout=60)  # leave the module fixture as we found it


def test_port_in_use_fails_fast(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = LocalKafka(port=port, data_dir=tmp_path / "kafka")
        with pytest.raises(KafkaError, match=rf"port {port} is already in use"):
            broker.start(timeout=30)
        assert not broker.is_running()


def test_context_manager_stops_broker(tmp_path: Path) -> None:
    with LocalKafka(port=free_port(), data_dir=tmp_path / "kafka") as broker:
        assert broker.is_running()
        pid = broker.pid
    assert pid is not None and not broker.is_running()
    assert broker.wait() is None  # already reaped
