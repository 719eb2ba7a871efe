"""A response Kafka refuses for good, on the real broker: the requester gets an error response saying
why, the request goes to the dead-letter topic with the reason, and the worker goes on answering
(its partition's commits pass the refused request)."""

from __future__ import annotations

from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from nexus.kafka.clients import client_options
from tests.eventually import eventually
from tests.integration.support import TopicReader, wait_for_responses
from tests.integration.test_orchestration import endpoint, endpoint_toml, nexus, simulators

RESPONSES_MAX_MESSAGE_BYTES = 20_000


async def test_a_response_over_the_topics_max_message_bytes_is_answered_with_an_error_and_dead_lettered(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    [sim] = simulators(logs_dir, ["--models", "m", "--ttft-ms", "0", "--tokens-per-s", "0"])
    async with nexus(bootstrap, logs_dir, tmp_path, endpoint_toml("m", endpoint(sim)), [sim]) as nx:
        kafka = nx.kafka
        admin = AIOKafkaAdminClient(**client_options(kafka))
        await admin.start()
        try:
            # The worker's private responses topic takes records of 20 kB at most, from now on.
            await admin.alter_configs([ConfigResource(
                ConfigResourceType.TOPIC, kafka.responses_topic, configs={"max.message.bytes": str(RESPONSES_MAX_MESSAGE_BYTES)},
            )])
            async with TopicReader(bootstrap, kafka.dlq_topic) as dlq:
                # The simulator echoes the prompt: a 40 kB prompt makes a 40 kB answer, twice the limit.
                big = nx.request("big", input="x" * 40_000)
                after = nx.request("after", input="a short one")
                answers = await nx.ask([big, after], timeout=60)
                # One response per request: the refused answer was not retried into a duplicate.
                assert (await wait_for_responses(nx.responses, {big.id, after.id})).duplicates() == 0
                dead = await dlq.read_until(lambda rs: any(nx.run.encode() + b"-big" in r.value for r in rs), 60)
            group = f"nexus-orch-{nx.run}"
            requests = [TopicPartition(kafka.requests_topic, p) for p in range(kafka.partitions)]

            async def everything_committed() -> bool:
                committed = await admin.list_consumer_group_offsets(group, partitions=requests)
                ends = await _end_offsets(bootstrap, requests)
                # A partition no request went to has nothing committed, and nothing to commit.
                return all(max(committed[tp].offset if tp in committed else 0, 0) == ends[tp] for tp in requests)

            await eventually(everything_committed, "the worker's commits pass the refused request", timeout=30,
                             context=nx.worker.log_tail)
        finally:
            await admin.close()

    error = answers[big.id]
    assert (error.status, error.output) == ("error", "")
    assert "exceeds the broker's max message size" in (error.error or ""), error.error
    assert kafka.responses_topic in (error.error or "") and "max.message.bytes" in (error.error or "")
    assert answers[after.id].status == "ok", "the next request is answered"
    [record] = [r for r in dead if nx.run.encode() + b"-big" in r.value]
    dead_headers = dict(record.headers)
    assert dead_headers["nexus-error-kind"] == b"undeliverable"
    assert b"MessageSizeTooLargeError" in dead_headers["nexus-error"]
    assert dead_headers["nexus-source"].startswith(kafka.requests_topic.encode() + b"/")


async def _end_offsets(bootstrap: str, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
