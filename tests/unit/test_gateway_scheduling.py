"""The gateway's scheduling surface without Kafka: POST /infer's priority and tenant, 429 from admission,
GET and DELETE /infer/{id}, each model's queue on /models and the queue reader on /health."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from nexus.settings import AccessSettings, ApiKey, EndpointSettings, KafkaSettings, ModelSettings, Settings, \
    TenantSettings
from producers.client import SubmitError
from producers.gateway import app as gateway_app
from producers.gateway.models import EndpointStateReader
from producers.queue import QueueReader
from producers import replies
from schemas import Codec, InferenceRequest
from schemas.queue_state import QueueReport

MODELS = (ModelSettings("llama3.1", (EndpointSettings("http://127.0.0.1:9"),)),)
TOKEN = "team-a-token"
TEAM_A = ApiKey("team-a", hashlib.sha256(TOKEN.encode()).digest(), ())
OTHER_TOKEN = "team-b-token"
TEAM_B = ApiKey("team-b", hashlib.sha256(OTHER_TOKEN.encode()).digest(), ())


class FakeProducer:
    """The gateway's producer without Kafka: keeps what it is given; ``refuse`` makes it fail."""

    instances: list[FakeProducer] = []

    def __init__(self, kafka: KafkaSettings, codec: Codec | None = None) -> None:
        self.submitted: list[InferenceRequest] = []
        self.cancels: list[tuple[str, str, str | None]] = []
        self.refuse: Exception | None = None
        FakeProducer.instances.append(self)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, request: InferenceRequest) -> str:
        if self.refuse is not None:
            raise self.refuse
        self.submitted.append(request)
        return request.id

    async def cancel(self, request_id: str, reason: str = "", key_name: str | None = None) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.cancels.append((request_id, reason, key_name))


class Gateway:
    def __init__(self, client: TestClient, producer: FakeProducer, queue: QueueReader) -> None:
        self.client, self.producer, self.queue = client, producer, queue


@pytest.fixture
async def gateway_with(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    async def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    readers: list[QueueReader] = []

    async def keep(self: QueueReader) -> None:
        readers.append(self)

    monkeypatch.setattr(gateway_app, "ensure_topics", nothing)
    monkeypatch.setattr(gateway_app, "RequestProducer", FakeProducer)
    monkeypatch.setattr(EndpointStateReader, "start", nothing)
    monkeypatch.setattr(EndpointStateReader, "stop", nothing)
    monkeypatch.setattr(QueueReader, "start", keep)
    monkeypatch.setattr(QueueReader, "stop", nothing)
    monkeypatch.setattr(replies.ReplyReader, "start", nothing)
    monkeypatch.setattr(replies.ReplyReader, "stop", nothing)
    clients: list[TestClient] = []

    async def start(**settings: Any) -> Gateway:
        FakeProducer.instances.clear()
        client = TestClient(TestServer(gateway_app.create_app(Settings(models=MODELS, **settings))))
        await client.start_server()
        clients.append(client)
        return Gateway(client, FakeProducer.instances[-1], readers[-1])

    yield start
    for client in clients:
        await client.close()


def queue_report(*waiting: dict[str, Any], running: list[dict[str, Any]] | None = None) -> QueueReport:
    return QueueReport(worker="w1", model="llama3.1", at=time.time(), rate_per_s=2.0, waiting=list(waiting),
                       running=running or [])


def entry(request_id: str, position: int, tenant: str = "t", priority: str = "interactive") -> dict[str, Any]:
    return {"id": request_id, "session_id": "s", "tenant": tenant, "priority": priority, "position": position,
            "eta_s": position / 2.0, "waited_s": 1.0}


async def test_priority_and_tenant_come_from_the_body_or_the_headers(gateway_with) -> None:
    gw = await gateway_with()
    body = {"model_id": "llama3.1", "input": "hi", "context": {"session_id": "s1"}}
    assert (await gw.client.post("/infer", json=body)).status == 202
    assert (await gw.client.post("/infer", json=body, headers={"X-Nexus-Priority": "batch",
                                                               "X-Nexus-Tenant": "team-x"})).status == 202
    both = {**body, "priority": "interactive", "tenant": "from-body"}
    assert (await gw.client.post("/infer", json=both, headers={"X-Nexus-Priority": "batch",
                                                               "X-Nexus-Tenant": "team-x"})).status == 202
    first, second, third = gw.producer.submitted
    assert (first.priority, first.tenant) == ("interactive", "s1")  # no tenant: the session
    assert (second.priority, second.tenant) == ("batch", "team-x")
    assert (third.priority, third.tenant) == ("interactive", "from-body")  # the body wins


@pytest.mark.parametrize("headers, body, words", [
    ({"X-Nexus-Priority": "urgent"}, {}, "'X-Nexus-Priority' must be one of interactive, batch"),
    ({"X-Nexus-Tenant": ""}, {}, "'X-Nexus-Tenant' must be a non-empty string"),
    ({"X-Nexus-Tenant": "t" * 257}, {}, "'X-Nexus-Tenant' is longer than 256"),
    ({}, {"priority": "later"}, "'priority' must be one of interactive, batch"),
    ({}, {"tenant": 7}, "'tenant' must be a non-empty string"),
])
async def test_bad_priorities_and_tenants_are_400_naming_the_field(gateway_with, headers: dict[str, str],
                                                                   body: dict[str, Any], words: str) -> None:
    gw = await gateway_with()
    reply = await gw.client.post("/infer", json={"model_id": "llama3.1", "input": "hi", **body}, headers=headers)
    assert reply.status == 400 and words in (await reply.json())["error"]
    assert gw.producer.submitted == []


async def test_with_api_keys_the_keys_name_is_the_tenant(gateway_with) -> None:
    gw = await gateway_with(access=AccessSettings(keys=(TEAM_A,)))
    reply = await gw.client.post("/infer", json={"model_id": "llama3.1", "input": "hi", "tenant": "someone-else"},
                                 headers={"Authorization": f"Bearer {TOKEN}", "X-Nexus-Tenant": "another"})
    assert reply.status == 202
    (request,) = gw.producer.submitted
    assert request.tenant == "team-a" and request.key_name == "team-a"


async def test_over_a_limit_is_429_with_retry_after(gateway_with) -> None:
    gw = await gateway_with(tenants={"t": TenantSettings(requests_per_minute=1)})
    body = {"model_id": "llama3.1", "input": "hi", "tenant": "t"}
    assert (await gw.client.post("/infer", json=body)).status == 202
    reply = await gw.client.post("/infer", json=body)
    answer = await reply.json()
    assert reply.status == 429 and answer["retry_after_s"] in range(59, 61)
    assert reply.headers["Retry-After"] == str(answer["retry_after_s"])
    assert "over its limit of 1 requests per minute" in answer["error"] and set(answer) == {"error", "retry_after_s"}
    assert len(gw.producer.submitted) == 1
    metrics = await (await gw.client.get("/metrics")).text()
    assert ('nexus_gateway_rejected_total{limit="requests_per_minute",model="llama3.1",priority="interactive",'
            'tenant="t"} 1.0') in metrics
    assert (await gw.client.post("/infer", json={**body, "tenant": "u"})).status == 202  # another tenant


async def test_a_request_kafka_refused_does_not_count_against_the_limit(gateway_with) -> None:
    gw = await gateway_with(tenants={"t": TenantSettings(requests_per_minute=1)})
    body = {"model_id": "llama3.1", "input": "hi", "tenant": "t"}
    gw.producer.refuse = SubmitError("Kafka is down")
    assert (await gw.client.post("/infer", json=body)).status == 503
    gw.producer.refuse = None
    assert (await gw.client.post("/infer", json=body)).status == 202


async def test_a_deadline_shorter_than_the_queue_is_429(gateway_with) -> None:
    gw = await gateway_with()
    gw.queue.board.ingest(queue_report(*(entry(f"q{i}", i, tenant="t") for i in range(20))))  # 10 s at 2/s
    reply = await gw.client.post("/infer", json={"model_id": "llama3.1", "input": "hi", "tenant": "t",
                                                 "timeout_ms": 2000})
    answer = await reply.json()
    assert reply.status == 429 and answer["retry_after_s"] == 8 and reply.headers["Retry-After"] == "8"
    assert "estimated wait of 10.0 s" in answer["error"]
    ok = await gw.client.post("/infer", json={"model_id": "llama3.1", "input": "hi", "tenant": "t",
                                              "timeout_ms": 60_000})
    assert ok.status == 202


async def test_get_infer_id_says_where_a_request_stands(gateway_with) -> None:
    gw = await gateway_with()
    running = {"id": "r0", "session_id": "s", "tenant": "t", "priority": "batch", "running_s": 3.0}
    gw.queue.board.ingest(queue_report(entry("r1", 4, priority="batch"), running=[running]))
    reply = await gw.client.get("/infer/r1")
    body = await reply.json()
    assert reply.status == 200 and body["state"] == "queued" and body["position"] == 4
    assert {k: body[k] for k in ("id", "model", "priority", "tenant", "worker")} == {
        "id": "r1", "model": "llama3.1", "priority": "batch", "tenant": "t", "worker": "w1"}
    assert 1900 <= body["eta_ms"] <= 2000 and body["waited_ms"] >= 1000
    body = await (await gw.client.get("/infer/r0")).json()
    assert body["state"] == "running" and body["running_ms"] >= 3000
    reply = await gw.client.get("/infer/nope")
    body = await reply.json()
    assert reply.status == 404 and body["id"] == "nope" and body["state"] == "unknown" and "nope" in body["error"]
    assert (await gw.client.get(f"/infer/{'x' * 257}")).status == 400


async def test_delete_infer_id_produces_a_cancel(gateway_with) -> None:
    gw = await gateway_with()
    reply = await gw.client.delete("/infer/r1")
    assert reply.status == 202 and await reply.json() == {"id": "r1", "status": "cancelling"}
    assert gw.producer.cancels == [("r1", "cancelled by the client (DELETE /infer)", None)]
    gw.producer.refuse = SubmitError("Kafka did not acknowledge")
    reply = await gw.client.delete("/infer/r2")
    assert reply.status == 503 and "did not acknowledge" in (await reply.json())["error"]


async def test_with_api_keys_a_key_sees_and_cancels_as_itself(gateway_with) -> None:
    gw = await gateway_with(access=AccessSettings(keys=(TEAM_A, TEAM_B)))
    gw.queue.board.ingest(queue_report(entry("mine", 0, tenant="team-a")))
    assert (await gw.client.get("/infer/mine")).status == 401
    assert (await gw.client.delete("/infer/mine")).status == 401
    mine = {"Authorization": f"Bearer {TOKEN}"}
    theirs = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    assert (await gw.client.get("/infer/mine", headers=mine)).status == 200
    reply = await gw.client.get("/infer/mine", headers=theirs)  # not told another key's request exists
    assert reply.status == 404 and "to this API key" in (await reply.json())["error"]
    assert (await gw.client.delete("/infer/mine", headers=theirs)).status == 202
    assert gw.producer.cancels[-1][2] == "team-b"  # the worker ignores a cancel of another key


async def test_models_show_each_models_queue(gateway_with) -> None:
    gw = await gateway_with()
    gw.queue.board.ingest(queue_report(entry("a", 0), entry("b", 1, priority="batch"), entry("c", 2, priority="batch")))
    (model,) = (await (await gw.client.get("/models")).json())["models"]
    assert model["queue"] == {"waiting": {"interactive": 1, "batch": 2}, "waiting_total": 3, "running": 0,
                              "rate_per_s": 2.0, "workers_reporting": 1}
