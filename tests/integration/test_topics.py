"""The topics are an audit log: delete-only, configurable retention, broker timestamps."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from nexus.settings import ConfigError, KafkaSettings, load_settings
from nexus.kafka.topics import ensure_topics, topic_names


def _kafka(bootstrap: str, **overrides: object) -> KafkaSettings:
    run = uuid.uuid4().hex[:8]
    return KafkaSettings(
        bootstrap=bootstrap,
        partitions=2,
        requests_topic=f"t-{run}.requests",
        responses_topic=f"t-{run}.responses",
        dlq_topic=f"t-{run}.dlq",
        tokens_topic=f"t-{run}.tokens",
        batch_requests_topic=f"t-{run}.requests.batch",
        cancels_topic=f"t-{run}.cancels",
        state_topic=f"t-{run}.state",
        queue_topic=f"t-{run}.queue",
        **overrides,  # type: ignore[arg-type]
    )


async def _configs(bootstrap: str, topics: list[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in topics]
        )
    finally:
        await admin.close()
    out: dict[str, dict[str, str]] = {}
    for _code, _message, _type, name, entries in response.resources:
        out[name] = {entry[0]: entry[1] for entry in entries}
    return out


def test_default_retention_is_seven_days() -> None:
    assert KafkaSettings().retention_ms == 604_800_000


@pytest.mark.parametrize("value, ok", [("-1", True), ("1", True), ("0", False), ("-2", False)])
def test_retention_must_be_positive_or_minus_one(tmp_path: Path, value: str, ok: bool) -> None:
    env = {"NEXUS_KAFKA_RETENTION_MS": value}
    config = tmp_path / "nexus.toml"
    config.write_text("")
    if ok:
        assert load_settings(config, environ=env).kafka.retention_ms == int(value)
    else:
        with pytest.raises(ConfigError, match="NEXUS_KAFKA_RETENTION_MS.*-1 to keep records forever"):
            load_settings(config, environ=env)


async def test_topics_are_created_as_an_audit_log(bootstrap: str) -> None:
    kafka = _kafka(bootstrap, retention_ms=3_600_000)
    created = await ensure_topics(kafka)
    assert set(topic_names(kafka)) <= set(created)
    configs = await _configs(bootstrap, topic_names(kafka))
    for name in topic_names(kafka):
        assert configs[name]["cleanup.policy"] == "delete"
        assert configs[name]["retention.ms"] == "3600000"
        assert configs[name]["message.timestamp.type"] == "LogAppendTime"
    assert {kafka.batch_requests_topic, kafka.cancels_topic} <= set(topic_names(kafka))
    # The queue reports, like the endpoint state, keep only the latest record per key.
    for name in (kafka.state_topic, kafka.queue_topic):
        assert (await _configs(bootstrap, [name]))[name]["cleanup.policy"] == "compact"
    assert await ensure_topics(kafka) == []  # idempotent


async def test_forever_retention_and_broker_timestamps(bootstrap: str) -> None:
    kafka = _kafka(bootstrap, retention_ms=-1)
    await ensure_topics(kafka)
    assert (await _configs(bootstrap, [kafka.requests_topic]))[kafka.requests_topic]["retention.ms"] == "-1"
    # A producer's own timestamp (here: the year 2001) is replaced by the broker's append time.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        metadata = await producer.send_and_wait(kafka.requests_topic, b"x", timestamp_ms=1_000_000_000_000)
    finally:
        await producer.stop()
    assert metadata.timestamp > 1_700_000_000_000
