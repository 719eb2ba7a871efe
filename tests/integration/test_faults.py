"""Failures the foundation must survive: a killed worker, a model endpoint down."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import ollama

from localdev.broker import free_port
from nexus.settings import KafkaSettings
from nexus.kafka.topics import ensure_topics
from producers.client import RequestProducer
from schemas import InferenceRequest, ModelContext, decode_response
from tests.integration.support import CODEC, Role, TopicReader, stack_env, start_gateway, start_simulator, wait_for_responses


async def test_health_is_503_while_the_model_endpoint_is_down(bootstrap: str, logs_dir: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = start_gateway(stack_env(bootstrap, dead), logs_dir)
    try:
        async with httpx.AsyncClient() as http:
            reply = await http.get(f"{gateway.url}/health")
    finally:
        gateway.stop()
    assert reply.status_code == 503
    checks = reply.json()["checks"]
    assert checks["kafka"]["status"] == "ok"
    assert checks["model:llama3.1"]["status"] == "down"
    assert dead in checks["model:llama3.1"]["reason"]


async def test_backend_down_answers_every_request_with_an_error(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    dead = f"http://127.0.0.1:{free_port()}"
    # A short deadline: 1 s per attempt, 2 attempts. Without it requests wait for the endpoint.
    config = tmp_path / "nexus.toml"
    config.write_text(f'[models."llama3.1"]\nendpoints = ["{dead}"]\ntimeout_s = 1\nretries = 1\n')
    env = {**_isolated_env(bootstrap, dead, run), "NEXUS_CONFIG": str(config)}
    kafka = KafkaSettings(bootstrap=bootstrap, requests_topic=env["NEXUS_KAFKA_REQUESTS_TOPIC"],
                          responses_topic=env["NEXUS_KAFKA_RESPONSES_TOPIC"],
                          dlq_topic=env["NEXUS_KAFKA_DLQ_TOPIC"], partitions=2)
    await ensure_topics(kafka)
    worker = Role("worker-dead-backend", ["worker"], env, logs_dir).start()
    try:
        async with TopicReader(bootstrap, kafka.responses_topic) as responses, TopicReader(
            bootstrap, kafka.dlq_topic
        ) as dlq:
            async with RequestProducer(kafka) as producer:
                # Wait until the worker answers at all, so deadlines start counting then.
                warm_up = InferenceRequest(f"{run}-warm-up", "no-such-model", "", ModelContext("w"))
                await producer.submit(warm_up)
                await wait_for_responses(responses, {warm_up.id})
                requests = [
                    InferenceRequest(f"{run}-{i}", "llama3.1", f"q{i}", ModelContext(f"s{i}")) for i in range(10)
                ]
                await producer.submit_many(requests)
            answers = await wait_for_responses(responses, {r.id for r in requests})
            dead_letters = await dlq.read_until(lambda records: len(records) >= 11, timeout=30)
    finally:
        worker.stop()
    for request in requests:
        [response] = answers.by_id[request.id]
        # Either its attempts failed (error), or it waited for the open circuit until its deadline
        # (expired); either way the reason names the endpoint and what was wrong with it.
        assert response.status in ("error", "expired"), response
        assert dead in (response.error or "") and "unreachable" in (response.error or "")
        assert response.latency_ms < 10_000
    assert {dict(r.headers)["nexus-error-kind"] for r in dead_letters} == {b"failed"}


async def test_workers_killed_repeatedly_mid_run_lose_nothing(bootstrap: str, logs_dir: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    run = uuid.uuid4().hex[:8]
    # Slow enough that requests are in flight whenever a worker dies.
    simulator = start_simulator(logs_dir, ["--ttft-ms", "150", "--tokens-per-s", "0", "--parallel", "16"])
    env = _isolated_env(bootstrap, simulator.url, run)
    kafka = KafkaSettings(bootstrap=bootstrap, requests_topic=env["NEXUS_KAFKA_REQUESTS_TOPIC"],
                          responses_topic=env["NEXUS_KAFKA_RESPONSES_TOPIC"],
                          dlq_topic=env["NEXUS_KAFKA_DLQ_TOPIC"], partitions=2)
    await ensure_topics(kafka)
    total = 160
    requests = [
        InferenceRequest(f"{run}-{i}", ("llama3.1", "mistral")[i % 2], f"q{i}", ModelContext(f"s{i % 5}"))
        for i in range(total)
    ]

    def answered(records: list) -> set[str]:  # type: ignore[type-arg]
        return {decode_response(CODEC, r.value).id for r in records}

    kills: list[tuple[int, int]] = []  # (requests answered, response records written) at each kill
    worker = Role("worker-0", ["worker"], env, logs_dir).start()
    try:
        async with TopicReader(bootstrap, kafka.responses_topic) as responses:
            async with RequestProducer(kafka) as producer:
                await producer.submit_many(requests)
            for threshold in (30, 75, 120):  # SIGKILL three times, each with answers in flight
                await responses.read_until(lambda records: len(answered(records)) >= threshold, timeout=90)  # noqa: B023
                worker.kill()
                # Everything the dead worker wrote is below the end offsets now: read all of it.
                await responses.drain()
                kills.append((len(answered(responses.records)), len(responses.records)))
                assert kills[-1][0] < total, "the worker finished before it could be killed"
                worker = Role(f"worker-{len(kills)}", ["worker"], env, logs_dir).start()
            answers = await wait_for_responses(responses, {r.id for r in requests}, timeout=120)
    finally:
        worker.stop()
        simulator.stop()

    assert set(answers.by_id) == {r.id for r in requests}
    assert all(rs[0].status == "ok" for rs in answers.by_id.values())
    duplicates = answers.duplicates()
    record_property("duplicates_after_sigkills", duplicates)
    print(f"\nSIGKILL x{len(kills)}: {total} requests, answered at each kill {[k[0] for k in kills]}, "
          f"{duplicates} answered twice")
    # Only answers written before a kill can be written again after it.
    assert duplicates <= sum(written for _, written in kills)


async def test_exactly_once_read_committed_readers_see_each_request_answered_once_despite_sigkills(
    bootstrap: str, logs_dir: Path, tmp_path: Path, record_property  # type: ignore[no-untyped-def]
) -> None:
    run = uuid.uuid4().hex[:8]
    # One partition, llama3.1 seven times slower than mistral: answers finish out of offset order,
    # so at every commit some answers wait for an earlier, slower request of their partition.
    slow = start_simulator(logs_dir, ["--ttft-ms", "1000", "--tokens-per-s", "0", "--parallel", "16"])
    fast = start_simulator(logs_dir, ["--ttft-ms", "150", "--tokens-per-s", "0", "--parallel", "16"])
    config = tmp_path / "nexus.toml"
    config.write_text(f'[models."llama3.1"]\nendpoints = [{{ url = "{slow.url}", max_concurrency = 8 }}]\n'
                      f'[models."mistral"]\nendpoints = ["{fast.url}"]\n')
    env = {**_isolated_env(bootstrap, fast.url, run), "NEXUS_CONFIG": str(config),
           "NEXUS_KAFKA_PARTITIONS": "1", "NEXUS_KAFKA_PROCESSING_GUARANTEE": "exactly_once"}
    kafka = KafkaSettings(bootstrap=bootstrap, requests_topic=env["NEXUS_KAFKA_REQUESTS_TOPIC"],
                          responses_topic=env["NEXUS_KAFKA_RESPONSES_TOPIC"],
                          dlq_topic=env["NEXUS_KAFKA_DLQ_TOPIC"], partitions=1,
                          processing_guarantee="exactly_once")
    await ensure_topics(kafka)
    total = 160
    requests = [
        InferenceRequest(f"{run}-{i}", ("llama3.1", "mistral")[i % 2], f"q{i}", ModelContext(f"s{i % 5}"))
        for i in range(total)
    ]

    def answered(records: list) -> int:  # type: ignore[type-arg]
        return len({decode_response(CODEC, r.value).id for r in records})

    kills: list[int] = []
    worker = Role("eos-worker-0", ["worker"], env, logs_dir).start()
    try:
        async with TopicReader(bootstrap, kafka.responses_topic, kafka.isolation_level) as committed, TopicReader(
            bootstrap, kafka.responses_topic, "read_uncommitted"
        ) as uncommitted:
            async with RequestProducer(kafka) as producer:
                await producer.submit_many(requests)
            for threshold in (30, 75, 120):
                await uncommitted.read_until(lambda records: answered(records) >= threshold, timeout=90)  # noqa: B023
                worker.kill()
                # The successor starts at once: its transactional producers abort what the dead
                # one left open, which read_committed readers wait for.
                worker = Role(f"eos-worker-{len(kills) + 1}", ["worker"], env, logs_dir).start()
                kills.append(answered(uncommitted.records))
                assert kills[-1] < total, "the worker finished before it could be killed"
            answers = await wait_for_responses(committed, {r.id for r in requests}, timeout=120)
            seen_uncommitted = await wait_for_responses(uncommitted, {r.id for r in requests}, timeout=30)
    finally:
        worker.stop()
        slow.stop()
        fast.stop()

    assert {id_: len(rs) for id_, rs in answers.by_id.items()} == {r.id: 1 for r in requests}
    assert all(rs[0].status == "ok" for rs in answers.by_id.values())
    record_property("read_uncommitted_duplicates_after_sigkills", seen_uncommitted.duplicates())
    print(f"\nexactly once, SIGKILL x{len(kills)} at {kills} answered: {total} requests; read_committed "
          f"saw each once, read_uncommitted saw {seen_uncommitted.duplicates()} duplicates")


async def test_exactly_once_gateway_answers_and_streams_through_read_committed_readers(
    bootstrap: str, simulator: str, logs_dir: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    env = {**_isolated_env(bootstrap, simulator, run), "NEXUS_KAFKA_PROCESSING_GUARANTEE": "exactly_once"}
    await ensure_topics(KafkaSettings(bootstrap=bootstrap, requests_topic=env["NEXUS_KAFKA_REQUESTS_TOPIC"],
                                      responses_topic=env["NEXUS_KAFKA_RESPONSES_TOPIC"],
                                      tokens_topic=env["NEXUS_KAFKA_TOKENS_TOPIC"],
                                      dlq_topic=env["NEXUS_KAFKA_DLQ_TOPIC"], partitions=2))
    worker = Role("eos-worker", ["worker"], env, logs_dir).start()
    gateway = start_gateway(env, logs_dir)
    try:
        client = ollama.AsyncClient(host=gateway.url, timeout=60)
        prompt = f"exactly once {run}"
        # The answer is written in a transaction: the reply reader (read_committed) sees it at the commit.
        whole = await client.generate(model="llama3.1", prompt=prompt)
        # Token chunks are written outside the transactions, so streaming still works.
        stream = await client.generate(model="llama3.1", prompt=prompt, stream=True)
        chunks = [part.response async for part in stream]
    finally:
        gateway.stop()
        worker.stop()
    assert whole.response == f"[simulated llama3.1] You said: {prompt}"
    assert "".join(chunks) == whole.response


def _isolated_env(bootstrap: str, ollama: str, run: str) -> dict[str, str]:
    """A worker on topics and a group of its own, so other tests' traffic doesn't mix in."""
    return stack_env(
        bootstrap,
        ollama,
        NEXUS_KAFKA_REQUESTS_TOPIC=f"t{run}.requests",
        NEXUS_KAFKA_RESPONSES_TOPIC=f"t{run}.responses",
        NEXUS_KAFKA_DLQ_TOPIC=f"t{run}.dlq",
        NEXUS_KAFKA_TOKENS_TOPIC=f"t{run}.tokens",
        NEXUS_KAFKA_PARTITIONS="2",
        NEXUS_WORKER_APP_ID=f"nexus-test-{run}",
    )


async def test_gateway_answers_503_quickly_never_202_when_kafka_is_away(
    logs_dir: Path, tmp_path: Path
) -> None:
    from localdev.broker import LocalKafka

    kafka = LocalKafka(port=free_port(), data_dir=tmp_path / "kafka")
    kafka.start()
    env = stack_env(kafka.bootstrap, f"http://127.0.0.1:{free_port()}", NEXUS_KAFKA_PRODUCE_TIMEOUT_S="2")
    gateway = start_gateway(env, logs_dir)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            before = await http.post("/infer", json={"model_id": "llama3.1", "input": "up"})
            assert before.status_code == 202
            kafka.stop()
            for i in range(3):
                started = asyncio.get_running_loop().time()
                reply = await http.post("/infer", json={"model_id": "llama3.1", "input": f"down {i}"})
                elapsed = asyncio.get_running_loop().time() - started
                assert reply.status_code == 503, reply.text
                assert "did not acknowledge" in reply.json()["error"]
                assert elapsed < 5, f"503 took {elapsed:.1f}s; the produce timeout is 2 s"
            health = await http.get("/health")
            assert health.status_code == 503
            assert health.json()["checks"]["kafka"]["status"] == "down"
    finally:
        gateway.stop()
        kafka.stop()
