"""Create Nexus's topics with the configured partitions and an audit-log policy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from nexus.errors import NexusError
from nexus.kafka.clients import client_options, refusal
from nexus.logs import muted
from nexus.settings import KafkaSettings

log = logging.getLogger(__name__)


def topic_config(kafka: KafkaSettings) -> dict[str, str]:
    """The topics are an audit log: records are deleted only by age, never compacted, and
    stamped with the broker's append time so that time ranges (``nexus replay --since``)
    map to offsets exactly and no producer clock can place a record in the wrong hour."""
    return {
        "cleanup.policy": "delete",
        "retention.ms": str(kafka.retention_ms),
        "message.timestamp.type": "LogAppendTime",
        **replication_config(kafka),
    }


def replication_config(kafka: KafkaSettings) -> dict[str, str]:
    """``min.insync.replicas`` for every topic Nexus creates, the worker's table topics included.

    With 3+ replicas an acks=all write must reach a majority before it is acknowledged,
    so a 202 survives losing any minority of brokers, whatever the broker default is
    (Kafka's is 1: the leader alone, lost with it). Below 3 replicas the broker default
    stays: requiring both of 2 would stop all writes when one broker is down.
    """
    if kafka.replication_factor < 3:
        return {}
    return {"min.insync.replicas": str(kafka.replication_factor // 2 + 1)}


class KafkaUnavailableError(NexusError, RuntimeError):
    """The brokers at the bootstrap address did not answer in time."""


class TopicCreationError(NexusError, RuntimeError):
    """Kafka refused to create a topic (not because it exists: that is fine)."""


def topic_names(kafka: KafkaSettings) -> list[str]:
    """The audit-log topics: both request lanes, the answers, the tokens, the dead letters and the
    cancels (a cancel is part of its request's history)."""
    return [kafka.requests_topic, kafka.batch_requests_topic, kafka.responses_topic, kafka.tokens_topic,
            kafka.dlq_topic, kafka.cancels_topic]


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create when missing: its name, partition count and topic configs."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def nexus_topics(kafka: KafkaSettings) -> list[TopicSpec]:
    """Every topic Nexus's roles share: the audit-log topics, the endpoint-state and queue topics."""
    audit = [TopicSpec(name, kafka.partitions, topic_config(kafka)) for name in topic_names(kafka)]
    # Not part of the audit log: only the latest state per worker (per worker and model) matters.
    compacted = {"cleanup.policy": "compact", **replication_config(kafka)}
    state = TopicSpec(kafka.state_topic, 1, compacted)
    queue = TopicSpec(kafka.queue_topic, 1, dict(compacted))
    return [*audit, state, queue]


async def ensure_topics(
    kafka: KafkaSettings, timeout_s: float | None = None, *, extra: Iterable[TopicSpec] = ()
) -> list[str]:
    """Create the missing topics; return the names created. Safe to call concurrently.

    Waits up to ``timeout_s`` (default: ``kafka.connect_timeout_s``) for a broker to answer.
    ``extra`` adds topics of one role's own (the worker's cache topics), created the same way,
    with their own partitions and configs, on the same wait for the broker.
    """
    admin = AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=10_000)
    await _start_with_retry(admin, kafka, kafka.connect_timeout_s if timeout_s is None else timeout_s)
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(spec.name, spec.partitions, kafka.replication_factor, topic_configs=spec.config)
            for spec in [*nexus_topics(kafka), *extra]
            if spec.name not in existing
        ]
        if not new:
            return []
        result = await admin.create_topics(new)
        created = []
        for name, code, *_ in result.topic_errors:
            if code == 0:
                created.append(name)
            elif code != TopicAlreadyExistsError.errno:
                raise TopicCreationError(
                    f"creating topic {name!r} failed with Kafka error code {code}: check that the "
                    f"principal may create topics and that {kafka.replication_factor} replicas "
                    "(kafka.replication_factor) fit the cluster, or create it by hand"
                )
        if created:
            log.info("created topics %s (%d partitions)", created, kafka.partitions)
        return created
    finally:
        await admin.close()


async def _start_with_retry(admin: AIOKafkaAdminClient, kafka: KafkaSettings, timeout_s: float) -> None:
    """Wait for a broker that is not up yet; fail at once if one is up but refuses us."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    waiting = False
    while True:
        try:
            with muted("aiokafka"):  # its error line per failed attempt; this loop reports the outcome
                await admin.start()
            return
        except KafkaConnectionError as exc:
            refused = await refusal(kafka)
            if refused is not None:
                await admin.close()
                raise refused from None
            if not waiting:
                waiting = True
                log.info("waiting up to %gs for a Kafka broker at %s", timeout_s, kafka.bootstrap)
            if asyncio.get_running_loop().time() >= deadline:
                raise KafkaUnavailableError(
                    f"no Kafka broker answered at {kafka.bootstrap} within {timeout_s:g}s (kafka.connect_timeout_s; {exc}); "
                    "start one with `nexus kafka` or pass --bootstrap; if one runs there, check that "
                    f"kafka.security_protocol ({kafka.security_protocol}) matches its listener"
                ) from None
            await asyncio.sleep(0.5)


async def partitions_of(admin: AIOKafkaAdminClient, topic: str) -> list[int]:
    """The partition numbers of ``topic``, from the cluster (empty if it does not exist)."""
    [description] = await admin.describe_topics([topic])
    return sorted(p["partition"] for p in description.get("partitions", []))
