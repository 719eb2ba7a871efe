"""Admission on a real broker: 429 with Retry-After for each limit, in each API's shape; where a request
stands (GET /infer/{id}) and each model's queue (/models) from queue reports; DELETE /infer/{id}.

A gateway of its own, with tenant limits from NEXUS_TENANTS and a queue topic of its own, so the
queue reports this test publishes (as a worker would) are the only ones it reads. No worker is
needed: the limits act at the gateway.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from aiokafka import AIOKafkaProducer

from nexus.kafka.clients import client_options
from nexus.settings import KafkaSettings
from schemas import decode_cancel, decode_request
from schemas.queue_state import QueueReport
from tests.eventually import eventually
from tests.integration.support import CODEC, TopicReader, stack_env, start_gateway

TENANTS = ("rpm:requests_per_minute=2; chat:requests_per_minute=1; tpm:tokens_per_minute=600; "
           "conc:max_concurrent=2; gen:max_concurrent=1")


@pytest.fixture(scope="module")
def limited(bootstrap: str, simulator: str, logs_dir: Path) -> Iterator[dict[str, str]]:
    queue_topic = f"nexus.queue.test-{uuid.uuid4().hex[:8]}"
    env = stack_env(bootstrap, simulator, NEXUS_TENANTS=TENANTS, NEXUS_KAFKA_QUEUE_TOPIC=queue_topic)
    gateway = start_gateway(env, logs_dir)
    try:
        yield {"url": gateway.url, "queue_topic": queue_topic, "bootstrap": bootstrap}
    finally:
        gateway.stop()


@pytest.fixture()
async def publish(limited: dict[str, str]) -> AsyncIterator[Any]:
    """Publish queue reports as a worker would; each is emptied again at the end."""
    producer = AIOKafkaProducer(**client_options(KafkaSettings(bootstrap=limited["bootstrap"])))
    await producer.start()
    sent: list[QueueReport] = []

    async def send(report: QueueReport) -> None:
        await producer.send_and_wait(limited["queue_topic"], key=report.key, value=report.to_bytes())
        sent.append(report)

    yield send
    for report in sent:
        empty = QueueReport(worker=report.worker, model=report.model, at=time.time())
        await producer.send_and_wait(limited["queue_topic"], key=empty.key, value=empty.to_bytes())
    await producer.stop()


def waiting(request_id: str, position: int, tenant: str, rate: float = 1.0) -> dict[str, Any]:
    return {"id": request_id, "session_id": f"s-{tenant}", "tenant": tenant, "priority": "interactive",
            "position": position, "eta_s": position / rate, "waited_s": 0.1}


def report(*entries: dict[str, Any], model: str = "llama3.1", rate: float = 1.0, worker: str = "") -> QueueReport:
    return QueueReport(worker=worker or f"fake-{uuid.uuid4().hex[:6]}", model=model, at=time.time(),
                       rate_per_s=rate, waiting=list(entries))


def assert_retry_after(reply: httpx.Response, low: int, high: int) -> int:
    assert reply.status_code == 429, reply.text
    seconds = int(reply.headers["Retry-After"])
    assert low <= seconds <= high, seconds
    return seconds


def infer(url: str, tenant: str, **fields: Any) -> httpx.Response:
    return httpx.post(f"{url}/infer", json={"model_id": "llama3.1", "input": "hi", **fields},
                      headers={"X-Nexus-Tenant": tenant})


def test_requests_per_minute_on_infer_and_openais_api(limited: dict[str, str]) -> None:
    url = limited["url"]
    assert [infer(url, "rpm").status_code for _ in range(2)] == [202, 202]
    reply = infer(url, "rpm")
    seconds = assert_retry_after(reply, 50, 60)
    assert reply.json()["retry_after_s"] == seconds and "2 requests per minute" in reply.json()["error"]
    assert infer(url, "someone-else").status_code == 202  # the "*" default: unlimited

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10,
                           default_headers={"X-Nexus-Tenant": "chat", "X-Nexus-Timeout-Ms": "300"})
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.APIStatusError) as first:  # taken; no worker here answers it in 300 ms: 504
        client.chat.completions.create(model="llama3.1", messages=messages)  # type: ignore[arg-type]
    assert first.value.status_code == 504
    with pytest.raises(openai.RateLimitError) as limited_error:
        client.chat.completions.create(model="llama3.1", messages=messages)  # type: ignore[arg-type]
    error = limited_error.value
    assert error.code == "rate_limit_exceeded" and error.type == "rate_limit_error" and error.param is None
    assert 50 <= int(error.response.headers["retry-after"]) <= 60


def test_tokens_per_minute_on_infer_and_ollamas_api(limited: dict[str, str]) -> None:
    url = limited["url"]
    options = {"max_tokens": 250}
    assert [infer(url, "tpm", options=options).status_code for _ in range(2)] == [202, 202]  # 500 of 600
    reply = infer(url, "tpm", options=options)
    assert_retry_after(reply, 50, 60)
    assert "600 tokens per minute" in reply.json()["error"]
    assert infer(url, "tpm", options={"max_tokens": 90}).status_code == 202  # still fits
    too_big = infer(url, "tpm", options={"max_tokens": 700})
    assert too_big.status_code == 413 and "Retry-After" not in too_big.headers

    client = ollama.Client(host=url, headers={"X-Nexus-Tenant": "tpm"})
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="llama3.1", prompt="hi", options={"num_predict": 50}, stream=False)
    assert refused.value.status_code == 429 and "tokens per minute" in refused.value.error


async def test_max_concurrent_counts_what_the_workers_report(limited: dict[str, str], publish: Any) -> None:
    url = limited["url"]
    worker = f"fake-{uuid.uuid4().hex[:6]}"
    await publish(report(waiting("c1", 0, "conc"), waiting("c2", 1, "conc"), waiting("o1", 2, "other"), rate=2.0,
                         worker=worker))
    await eventually(lambda: httpx.get(f"{url}/infer/c2").status_code == 200, "the gateway read the report")
    where = httpx.get(f"{url}/infer/c2").json()
    assert where["state"] == "queued" and where["position"] == 1 and where["tenant"] == "conc"
    assert where["model"] == "llama3.1" and 0 <= where["eta_ms"] <= 1000
    reply = infer(url, "conc")
    assert_retry_after(reply, 1, 5)
    assert "has 2 requests waiting or running, its limit is 2" in reply.json()["error"]
    (model,) = [m for m in httpx.get(f"{url}/models").json()["models"] if m["id"] == "llama3.1"]
    assert model["queue"]["waiting"]["interactive"] >= 3 and model["queue"]["rate_per_s"] >= 2.0

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           default_headers={"X-Nexus-Tenant": "conc"})
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model="llama3.1", prompt="hi")
    assert int(refused.value.response.headers["retry-after"]) >= 1

    await publish(report(waiting("c2", 0, "conc"), rate=2.0, worker=worker))  # its next report: one left
    await eventually(lambda: infer(url, "conc").status_code == 202, "room again once the report says so")


async def test_a_deadline_shorter_than_the_estimated_wait(limited: dict[str, str], publish: Any) -> None:
    url = limited["url"]
    await publish(report(*(waiting(f"d{i}", i, "dl") for i in range(30)), model="mistral", rate=1.0))
    await eventually(lambda: httpx.get(f"{url}/infer/d29").status_code == 200, "the gateway read the report")
    late = httpx.post(f"{url}/infer", json={"model_id": "mistral", "input": "hi", "tenant": "dl", "timeout_ms": 5000})
    seconds = assert_retry_after(late, 24, 26)
    assert late.json()["retry_after_s"] == seconds and "estimated wait of 30.0 s" in late.json()["error"]
    patient = httpx.post(f"{url}/infer", json={"model_id": "mistral", "input": "hi", "tenant": "dl",
                                               "timeout_ms": 60_000})
    assert patient.status_code == 202
    # Another tenant is not behind the whole backlog: fair share puts it after one of dl's.
    other = httpx.post(f"{url}/infer", json={"model_id": "mistral", "input": "hi", "tenant": "x", "timeout_ms": 5000})
    assert other.status_code == 202


async def test_delete_writes_a_cancel_and_unknown_ids_are_404(limited: dict[str, str]) -> None:
    url = limited["url"]
    request_id = f"del-{uuid.uuid4().hex[:8]}"
    async with TopicReader(limited["bootstrap"], "inference.cancels") as cancels:
        reply = httpx.delete(f"{url}/infer/{request_id}")
        assert reply.status_code == 202 and reply.json() == {"id": request_id, "status": "cancelling"}
        records = await cancels.read_until(lambda rs: any(r.key == request_id.encode() for r in rs), timeout=10)
    cancel = next(decode_cancel(CODEC, r.value) for r in records if r.key == request_id.encode())
    assert cancel.id == request_id and cancel.key_name is None and "DELETE" in cancel.reason
    unknown = httpx.get(f"{url}/infer/{request_id}")
    assert unknown.status_code == 404 and unknown.json()["state"] == "unknown"


async def test_a_drop_in_client_that_disconnects_cancels_its_request(limited: dict[str, str]) -> None:
    """The real gateway (handler cancellation on): a client that gives up while its call waits for the
    answer gets its request cancelled. No worker answers here, so the call waits until the client leaves."""
    url = limited["url"]
    prompts = {"/api/generate": f"give up {uuid.uuid4().hex[:8]}", "/v1/completions": f"leave {uuid.uuid4().hex[:8]}"}
    async with TopicReader(limited["bootstrap"], "inference.requests") as requests, \
            TopicReader(limited["bootstrap"], "inference.cancels") as cancels:
        for path, prompt in prompts.items():
            with pytest.raises(httpx.ReadTimeout):  # the client stops waiting and closes its connection
                httpx.post(f"{url}{path}", json={"model": "llama3.1", "prompt": prompt}, timeout=1.0)
        records = await requests.read_until(
            lambda rs: {decode_request(CODEC, r.value).input for r in rs} >= set(prompts.values()), timeout=10)
        ids = {decode_request(CODEC, r.value).id for r in records
               if decode_request(CODEC, r.value).input in prompts.values()}
        found = await cancels.read_until(lambda rs: ids <= {r.key.decode() for r in rs}, timeout=10)
    reasons = {decode_cancel(CODEC, r.value).reason for r in found if r.key.decode() in ids}
    assert reasons == {"client disconnected"}
