"""End to end on the real broker: gateway -> inference.requests -> worker -> inference.responses."""

from __future__ import annotations

import json
import uuid

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from nexus.kafka.topics import partitions_of
from nexus.settings import KafkaSettings
from producers.client import RequestProducer
from schemas import InferenceRequest, ModelContext, decode_request
from tests.eventually import eventually
from tests.integration.support import CODEC, TopicReader, wait_for_responses

SEED_BODY = {
    "id": "test1",
    "model_id": "llama3.1",
    "input": "Hello, world!",
    "context": {"session_id": "session123", "metadata": {"user": "alice", "lang": "en"}},
}


def simulated(model: str, prompt: str) -> str:
    return f"[simulated {model}] You said: {prompt}"


async def test_seed_example_is_acknowledged_then_answered_with_its_context(
    stack: dict[str, str], gateway_url: str
) -> None:
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    async with TopicReader(bootstrap, "inference.requests") as requests, TopicReader(
        bootstrap, "inference.responses"
    ) as responses:
        async with httpx.AsyncClient() as http:
            reply = await http.post(f"{gateway_url}/infer", json=SEED_BODY)
        assert reply.status_code == 202
        assert reply.json() == {"id": "test1", "status": "submitted"}

        # 202 came after the broker acknowledged: the record is already below the end offset.
        written = [decode_request(CODEC, r.value) for r in await requests.drain()]
        assert "test1" in [r.id for r in written]
        record = next(r for r in requests.records if decode_request(CODEC, r.value).id == "test1")
        assert record.key == b"llama3.1"

        answers = await wait_for_responses(responses, {"test1"})
    [response] = answers.by_id["test1"]
    assert response.status == "ok"
    assert response.output == simulated("llama3.1", "Hello, world!")
    assert response.context == ModelContext("session123", {"user": "alice", "lang": "en"})
    assert response.endpoint == stack["OLLAMA_HOST"]
    assert response.completion_tokens > 0 and response.prompt_tokens > 0
    key = next(r.key for r in responses.records if r.value and b"test1" in r.value)
    assert key == b"session123"


async def test_two_hundred_requests_over_two_models_each_answered_once(stack: dict[str, str]) -> None:
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    run = uuid.uuid4().hex[:8]
    requests = [
        InferenceRequest(
            id=f"{run}-{i}",
            model_id=("llama3.1", "mistral")[i % 2],
            input=f"question {i}",
            context=ModelContext(f"session-{run}-{i % 7}", {"user": f"u{i}", "n": str(i)}),
        )
        for i in range(200)
    ]
    async with TopicReader(bootstrap, "inference.responses") as responses:
        async with RequestProducer(KafkaSettings(bootstrap=bootstrap)) as producer:
            ids = await producer.submit_many(requests)
        assert ids == [r.id for r in requests]
        answers = await wait_for_responses(responses, set(ids))

    assert answers.duplicates() == 0
    for request in requests:
        [response] = answers.by_id[request.id]
        assert response.status == "ok", response.error
        assert response.model_id == request.model_id
        assert response.context == request.context
        assert response.output == simulated(request.model_id, request.input)


async def test_garbage_goes_to_dlq_and_unknown_model_gets_an_error_while_neighbours_are_answered(
    stack: dict[str, str],
) -> None:
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    run = uuid.uuid4().hex[:8]
    garbage = b"\x00not avro at all " + run.encode()
    before = InferenceRequest(f"{run}-before", "llama3.1", "before", ModelContext(f"s-{run}"))
    unknown = InferenceRequest(f"{run}-unknown", "no-such-model", "hi", ModelContext(f"s-{run}"))
    after = InferenceRequest(f"{run}-after", "llama3.1", "after", ModelContext(f"s-{run}"))
    async with TopicReader(bootstrap, "inference.responses") as responses, TopicReader(
        bootstrap, "inference.dlq"
    ) as dlq:
        # A plain Kafka client, all on one partition (same key) so the order is fixed.
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for value in (
                CODEC.encode("InferenceRequest", before.to_avro()),
                garbage,
                CODEC.encode("InferenceRequest", unknown.to_avro()),
                CODEC.encode("InferenceRequest", after.to_avro()),
            ):
                await producer.send_and_wait("inference.requests", value, key=b"llama3.1")
        finally:
            await producer.stop()

        answers = await wait_for_responses(responses, {before.id, unknown.id, after.id})
        dead = await dlq.read_until(lambda records: len(_ours(records, run)) >= 2, timeout=60)

    assert answers.by_id[before.id][0].status == "ok"
    assert answers.by_id[after.id][0].status == "ok"
    [error] = answers.by_id[unknown.id]
    assert error.status == "error"
    assert "no-such-model" in (error.error or "")
    assert error.context == unknown.context

    by_value = {r.value: dict(r.headers) for r in _ours(dead, run)}
    garbage_headers = by_value[garbage]
    assert garbage_headers["nexus-error-kind"] == b"undecodable"
    assert b"single-object" in garbage_headers["nexus-error"]
    assert garbage_headers["nexus-source"].startswith(b"inference.requests/")
    unknown_headers = by_value[CODEC.encode("InferenceRequest", unknown.to_avro())]
    assert unknown_headers["nexus-error-kind"] == b"failed"
    assert b"no-such-model" in unknown_headers["nexus-error"]


def _ours(records, run: str):  # type: ignore[no-untyped-def]
    return [r for r in records if run.encode() in r.value]


async def test_gateway_rejects_bad_input_with_json_errors(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        cases = [
            (b'{"model_id": "llama3.1", "input": ', 400, "JSON"),
            (json.dumps({"model_id": "llama3.1"}).encode(), 400, "input"),
            (json.dumps({"input": "x"}).encode(), 400, "model_id"),
            (json.dumps({"model_id": "gpt-17", "input": "x"}).encode(), 404, "gpt-17"),
            (json.dumps({"model_id": "llama3.1", "input": "x" * (1024 * 1024)}).encode(), 413, "limit"),
        ]
        for body, status, mentions in cases:
            reply = await http.post("/infer", content=body, headers={"Content-Type": "application/json"})
            assert reply.status_code == status, reply.text
            assert mentions in reply.json()["error"]


async def test_id_and_context_are_generated_when_absent(stack: dict[str, str], gateway_url: str) -> None:
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    async with TopicReader(bootstrap, "inference.responses") as responses:
        async with httpx.AsyncClient() as http:
            reply = await http.post(f"{gateway_url}/infer", json={"model_id": "mistral", "input": "hey"})
        assert reply.status_code == 202
        request_id = reply.json()["id"]
        answers = await wait_for_responses(responses, {request_id})
    [response] = answers.by_id[request_id]
    assert response.output == simulated("mistral", "hey")
    assert response.context.session_id  # a fresh session was made for it


async def test_health_metrics_and_models(stack: dict[str, str], gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        await http.post("/infer", json={"model_id": "no-such-model", "input": "x"})
        health = await http.get("/health")
        models = await http.get("/models")
        metrics = await http.get("/metrics")
    assert health.status_code == 200
    assert health.json()["checks"]["kafka"]["status"] == "ok"
    assert health.json()["checks"]["model:llama3.1"]["status"] == "ok"
    assert [m["id"] for m in models.json()["models"]] == ["llama3.1", "mistral"]
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'nexus_gateway_requests_total{code="404",model=""}' in metrics.text
    async with httpx.AsyncClient() as http:
        worker = await http.get(f"http://127.0.0.1:{stack['NEXUS_WORKER_WEB_PORT']}/metrics")

        async def health_with_partitions() -> httpx.Response | None:
            reply = await http.get(f"http://127.0.0.1:{stack['NEXUS_WORKER_WEB_PORT']}/health")
            return reply if reply.json().get("partitions") else None

        # The worker joins its group a few seconds after it starts.
        worker_health = await eventually(health_with_partitions, "the worker's /health lists its partitions",
                                         timeout=60, interval=0.2)
    assert worker.status_code == 200
    assert "nexus_worker_batch_size_bucket" in worker.text
    assert "nexus_worker_task_failures_total 0.0" in worker.text
    # The worker's own health: no failed task, and the ledger of each requests partition it owns.
    assert worker_health.status_code == 200, worker_health.text
    body = worker_health.json()
    assert body["status"] == "ok" and body["task_failures_total"] == 0
    requests_partitions = [p for p in body["partitions"] if p.startswith(stack.get("NEXUS_KAFKA_REQUESTS_TOPIC", "inference.requests") + "/")]
    assert requests_partitions, body
    assert all(state["answered_below"] is not None and state["revoked"] is False
               for state in body["partitions"].values()), body


async def test_models_show_each_endpoints_live_state_from_the_workers(
    stack: dict[str, str], gateway_url: str
) -> None:
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    request = InferenceRequest(uuid.uuid4().hex, "llama3.1", "state?", ModelContext("state"))
    async with TopicReader(bootstrap, "inference.responses") as responses:
        async with RequestProducer(KafkaSettings(bootstrap=bootstrap)) as producer:
            await producer.submit(request)
        await wait_for_responses(responses, {request.id})
    async with httpx.AsyncClient() as http:

        async def models_once_served() -> list[dict] | None:
            models = (await http.get(f"{gateway_url}/models")).json()["models"]
            return models if models[0]["endpoints"][0]["live"].get("served", 0) >= 1 else None

        # Workers publish their state every 2 s.
        models = await eventually(models_once_served, "/models shows the endpoint served a request",
                                  timeout=30, interval=0.2)
        live = models[0]["endpoints"][0]["live"]
    assert models[0]["id"] == "llama3.1"
    assert models[0]["endpoints"][0]["url"] == stack["OLLAMA_HOST"]
    assert live["workers_reporting"] == 1
    assert live["served"] >= 1
    assert live["circuit"] == "closed" and live["healthy"] is True
    assert live["ewma_seconds_per_request"] is not None


async def test_offsets_are_committed_once_the_answers_are_durable(stack: dict[str, str]) -> None:
    """Out-of-order answers still get acked: the worker group's commits reach the end."""
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    run = uuid.uuid4().hex[:8]
    requests = [
        InferenceRequest(f"{run}-{i}", ("llama3.1", "mistral")[i % 2], f"c{i}", ModelContext(f"s{i}"))
        for i in range(40)
    ]
    async with TopicReader(bootstrap, "inference.responses") as responses:
        async with RequestProducer(KafkaSettings(bootstrap=bootstrap)) as producer:
            await producer.submit_many(requests)
        await wait_for_responses(responses, {r.id for r in requests})
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        tps = [TopicPartition("inference.requests", p) for p in await partitions_of(admin, "inference.requests")]
        ends = await consumer.end_offsets(tps)
        behind: dict = {}

        async def caught_up() -> bool:
            nonlocal behind
            committed = await admin.list_consumer_group_offsets("nexus-worker")
            behind = {tp: ends[tp] - committed[tp].offset for tp in tps if ends[tp] and
                      (tp not in committed or committed[tp].offset < ends[tp])}
            return not behind

        # The worker commits answered offsets every commit_interval_s.
        await eventually(caught_up, "the worker group's commits reach the end of every partition",
                         timeout=30, interval=0.2, context=lambda: f"behind: {behind}")
    finally:
        await consumer.stop()
        await admin.close()


async def test_consumer_lag_is_measured_per_partition(stack: dict[str, str]) -> None:
    from streams.lag import consumer_lag

    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    request = InferenceRequest(uuid.uuid4().hex, "mistral", "lag?", ModelContext("lag"))
    async with TopicReader(bootstrap, "inference.responses") as responses:  # the group exists
        async with RequestProducer(KafkaSettings(bootstrap=bootstrap)) as producer:
            await producer.submit(request)
        await wait_for_responses(responses, {request.id})
    lag = await consumer_lag(KafkaSettings(bootstrap=stack["NEXUS_KAFKA_BOOTSTRAP"]), "nexus-worker", "inference.requests")
    assert sorted(lag) == list(range(8))
    assert all(isinstance(v, int) and v >= 0 for v in lag.values())
