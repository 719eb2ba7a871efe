"""Nexus on a real 3-broker KRaft cluster: replicated topics, and the requests partition's
leader SIGKILLed mid-run with nothing accepted lost.

    .venv/bin/python -m pytest tests/integration/test_cluster_faults.py -s

The cluster, a worker and a gateway (replication factor 3) are shared by the module; the
simulator is the session's zero-latency one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from localdev.cluster import LocalKafkaCluster
from nexus.kafka.topics import topic_config
from nexus.settings import KafkaSettings, load_settings
from streams.app import cache_changelog_topic
from tests.eventually import eventually
from tests.integration.support import (
    Role,
    TopicReader,
    stack_env,
    start_gateway,
    wait_for_responses,
)

TOTAL = 240  # requests submitted during the fault run
RATE = 30.0  # per second: a steady stream of 8 s, the failover in the middle of it
KILL_AT = 60  # requests answered when the leader is killed
TOPIC_CONFIG = 1  # DescribeConfigs' config source DYNAMIC_TOPIC_CONFIG: set on the topic itself


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafkaCluster]:
    kafka = LocalKafkaCluster(tmp_path_factory.mktemp("cluster"), nodes=3)
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="module")
def replicated_stack(cluster: LocalKafkaCluster, simulator: str, logs_dir: Path) -> Iterator[dict[str, str]]:
    """A worker and a gateway with replication factor 3 on topics of their own, one partition
    each, so every request goes through one leader.

    The requests and responses partitions are placed to be led by the node that coordinates the
    worker's consumer group: killing it loses the requests leader, the responses leader and the
    group coordinator at once (``VICTIM`` in the returned environment), the hardest single-broker
    failure, and the same one on every run.
    """
    run = uuid.uuid4().hex[:8]
    env = stack_env(
        cluster.bootstrap,
        simulator,
        NEXUS_KAFKA_REPLICATION_FACTOR="3",
        NEXUS_KAFKA_PARTITIONS="1",
        NEXUS_KAFKA_REQUESTS_TOPIC=f"c{run}.requests",
        NEXUS_KAFKA_RESPONSES_TOPIC=f"c{run}.responses",
        NEXUS_KAFKA_DLQ_TOPIC=f"c{run}.dlq",
        NEXUS_KAFKA_TOKENS_TOPIC=f"c{run}.tokens",
        NEXUS_KAFKA_STATE_TOPIC=f"c{run}.state",
        NEXUS_WORKER_APP_ID=f"nexus-cluster-{run}",
    )
    victim = asyncio.run(_place_leaders_on_the_coordinator(cluster, load_settings(environ=env).kafka, run))
    gateway = start_gateway(env, logs_dir)  # creates the other topics before the worker subscribes
    worker = Role("worker-cluster", ["worker"], env, logs_dir).start()
    try:
        yield {**env, "GATEWAY_URL": gateway.url, "VICTIM": str(victim)}
    finally:
        worker.stop()
        gateway.stop()


async def _place_leaders_on_the_coordinator(cluster: LocalKafkaCluster, kafka: KafkaSettings, run: str) -> int:
    """Create the requests and responses topics with the worker group's coordinator as their
    preferred leader; return that node's id."""
    group = f"nexus-cluster-{run}"
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        # The first lookup creates __consumer_offsets; it answers once that has a leader
        # (until then it raises CoordinatorNotAvailableError, which eventually() retries).
        async def find() -> tuple[int]:  # a tuple: node 0 is a coordinator too
            return (await admin.find_coordinator(group),)

        (coordinator,) = await eventually(find, "a group coordinator", timeout=30, interval=0.2)
        replicas = [coordinator] + [n.node_id for n in cluster.nodes if n.node_id != coordinator]
        result = await admin.create_topics([
            NewTopic(topic, -1, -1, replica_assignments={0: replicas}, topic_configs=topic_config(kafka))
            for topic in (kafka.requests_topic, kafka.responses_topic)
        ])
        assert all(code == 0 for _topic, code, *_ in result.topic_errors), result.topic_errors
    finally:
        await admin.close()
    return coordinator


async def _warm_up(stack: dict[str, str]) -> None:
    """One request answered end to end: the worker has joined its group and reads."""
    async with TopicReader(stack["NEXUS_KAFKA_BOOTSTRAP"], stack["NEXUS_KAFKA_RESPONSES_TOPIC"]) as responses:
        async with httpx.AsyncClient(base_url=stack["GATEWAY_URL"], timeout=30) as http:
            reply = await http.post("/infer", json={"model_id": "llama3.1", "input": "warm up"})
        assert reply.status_code == 202, reply.text
        await wait_for_responses(responses, {reply.json()["id"]}, timeout=120)


async def test_every_topic_is_replicated_three_ways_with_min_isr_two(
    cluster: LocalKafkaCluster, replicated_stack: dict[str, str]
) -> None:
    """Nexus's topics and the worker's Faust topics alike: losing one broker loses no acknowledged
    record and does not stop acks=all writes. ``min.insync.replicas`` must be set on the topics
    Nexus creates, not inherited: a production broker's default is 1."""
    await _warm_up(replicated_stack)  # the worker has created its Faust topics by now
    app_id = replicated_stack["NEXUS_WORKER_APP_ID"]
    ours = [replicated_stack[f"NEXUS_KAFKA_{name}_TOPIC"] for name in ("REQUESTS", "RESPONSES", "DLQ", "TOKENS", "STATE")]
    ours.append(cache_changelog_topic(app_id))
    topics = [*ours, f"{app_id}-__assignor-__leader"]  # Faust's own: replicas from topic_replication_factor
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        described = {d["topic"]: d for d in await admin.describe_topics(topics)}
        [configs] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in ours])
    finally:
        await admin.close()
    # DescribeConfigs v1+ entries: (name, value, read_only, source, sensitive, synonyms); source 1 = set on the topic
    min_isr = {name: {e[0]: (e[1], e[3]) for e in entries}["min.insync.replicas"]
               for _code, _msg, _type, name, entries in configs.resources}
    for topic in topics:
        assert described[topic]["error_code"] == 0, f"{topic} missing: {described[topic]}"
        for partition in described[topic]["partitions"]:
            assert len(partition["replicas"]) == 3, (topic, partition)
    assert min_isr == {topic: ("2", TOPIC_CONFIG) for topic in ours}


@dataclass
class Submissions:
    """What a well-behaved client saw: 202s (accepted), 503s it retried with the same id."""

    accepted: list[str] = field(default_factory=list)
    unavailable: int = 0
    slowest_s: float = 0.0  # the longest a client waited for its 202, retries included


async def _submit(http: httpx.AsyncClient, run: str, i: int, seen: Submissions) -> None:
    """POST one request until it is accepted: a 503 means Kafka did not acknowledge it, so
    the client sends it again, with the same id (the answer's readers key on it)."""
    body = {"id": f"{run}-{i}", "model_id": ("llama3.1", "mistral")[i % 2], "input": f"q{i}",
            "context": {"session_id": f"s{i % 7}", "metadata": {}}}
    started = asyncio.get_running_loop().time()
    while True:
        reply = await http.post("/infer", json=body)
        if reply.status_code == 202:
            seen.accepted.append(body["id"])
            seen.slowest_s = max(seen.slowest_s, asyncio.get_running_loop().time() - started)
            return
        assert reply.status_code == 503, reply.text
        seen.unavailable += 1


async def test_the_requests_leader_killed_mid_run_loses_no_accepted_request(
    cluster: LocalKafkaCluster, replicated_stack: dict[str, str], record_property  # type: ignore[no-untyped-def]
) -> None:
    stack = replicated_stack
    requests_topic, responses_topic = stack["NEXUS_KAFKA_REQUESTS_TOPIC"], stack["NEXUS_KAFKA_RESPONSES_TOPIC"]
    await _warm_up(stack)
    victim = int(stack["VICTIM"])
    assert await cluster.leader(requests_topic, 0) == victim
    assert await cluster.leader(responses_topic, 0) == victim
    assert await cluster.leader("__consumer_offsets", 0) == victim
    run = uuid.uuid4().hex[:8]
    seen = Submissions()
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=50)
    async with TopicReader(cluster.bootstrap, responses_topic) as responses, httpx.AsyncClient(
        base_url=stack["GATEWAY_URL"], timeout=60, limits=limits
    ) as http:

        async def steady_stream() -> None:
            """RATE requests a second, each retried until accepted; a slow one holds no other."""
            started = loop.time()
            tasks = []
            for i in range(TOTAL):
                await asyncio.sleep(max(0.0, started + i / RATE - loop.time()))  # the pace, not a wait for a state
                tasks.append(asyncio.create_task(_submit(http, run, i, seen)))
            await asyncio.gather(*tasks)

        stream = asyncio.create_task(steady_stream())
        await responses.read_until(lambda records: len(records) >= KILL_AT, timeout=60)
        await loop.run_in_executor(None, cluster.kill, victim)
        accepted_before, answered_before = len(seen.accepted), len(responses.records)
        await asyncio.wait_for(stream, timeout=120)
        new_leader = await cluster.leader(requests_topic, 0)
        answers = await wait_for_responses(responses, set(seen.accepted), timeout=120)

    assert new_leader != victim
    assert accepted_before < TOTAL, "every request was accepted before the kill: nothing went through the failover"
    assert len(set(seen.accepted)) == TOTAL
    assert set(answers.by_id) == set(seen.accepted), "an accepted request was never answered"
    assert all(rs[0].status == "ok" for rs in answers.by_id.values())
    duplicates = answers.duplicates()
    record_property("unavailable_503", seen.unavailable)
    record_property("duplicates_after_leader_kill", duplicates)
    print(f"\nleader kill: node {victim} (requests and responses leader, group coordinator) killed after {accepted_before} "
          f"accepted and {answered_before} answered; {TOTAL} accepted, {seen.unavailable} 503s retried, "
          f"slowest 202 after {seen.slowest_s:.1f}s; all {len(answers.by_id)} answered, {duplicates} answered "
          f"twice; new leader node {new_leader}")

    # The killed broker comes back with its data and catches up: back in the partition's ISR.
    await loop.run_in_executor(None, cluster.restart, victim)
    await _until_in_sync(cluster, requests_topic, victim)


async def _until_in_sync(cluster: LocalKafkaCluster, topic: str, node_id: int, timeout: float = 60) -> None:
    seen: list = []

    async def in_sync() -> bool:
        seen[:] = [partition := await cluster.describe(topic, 0)]
        return node_id in partition["isr"]

    await eventually(in_sync, f"node {node_id} rejoins the ISR of {topic}/0", timeout=timeout,
                     interval=0.2, context=lambda: str(seen))
