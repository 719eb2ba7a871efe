"""Traces across processes: a gateway and a worker exporting spans over OTLP/HTTP to a receiver here.

The receiver is a small aiohttp server decoding the OTLP protobuf, as a collector would. The
client's trace id must be the one on the worker's model-call span, whose parents lead back to
the gateway's produce; the response record carries it on; a call without a traceparent gets a
new trace, as consistent end to end.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

from localdev.broker import free_port
from nexus.settings import KafkaSettings
from nexus.tracing import TraceContext
from producers import RequestProducer, ResponseTimeoutError
from schemas import InferenceRequest, ModelContext, decode_response, decode_token
from tests.eventually import eventually
from tests.integration.support import CODEC, Role, TopicReader, stack_env, start_gateway

MODEL = "llama3.1"


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    name: str
    kind: int
    attributes: dict[str, Any]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    return getattr(value, kind) if kind else None


@dataclass
class Collector:
    """What an OTLP/HTTP receiver got: every span, decoded."""

    url: str = ""
    spans: list[Span] = field(default_factory=list)
    posts: int = 0

    async def receive(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        self.posts += 1
        for resource in export.resource_spans:
            service = next((_value(a.value) for a in resource.resource.attributes if a.key == "service.name"), "")
            for scope in resource.scope_spans:
                for s in scope.spans:
                    self.spans.append(Span(service, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                                           s.kind, {a.key: _value(a.value) for a in s.attributes}))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def of_trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def find(self, trace_id: str, check: Callable[[Span], bool]) -> Span | None:
        return next((s for s in self.of_trace(trace_id) if check(s)), None)

    def ancestors(self, span: Span) -> list[Span]:
        """``span``'s parents, nearest first, as far as they were exported."""
        by_id = {s.span_id: s for s in self.of_trace(span.trace_id)}
        chain = []
        while span.parent_id in by_id:
            span = by_id[span.parent_id]
            chain.append(span)
        return chain

    def summary(self) -> str:
        return f"{self.posts} exports: " + "; ".join(f"{s.service} {s.name} {s.trace_id[:8]}" for s in self.spans[-30:])


@pytest.fixture(scope="module")
async def collector() -> AsyncIterator[Collector]:
    found = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", found.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    found.url = f"http://127.0.0.1:{port}"
    try:
        yield found
    finally:
        await runner.cleanup()


@dataclass
class Traced:
    kafka: KafkaSettings
    gateway: str
    roles: list[Role]

    def logs(self) -> str:
        return "\n".join(f"--- {r.name}\n{r.log_tail()}" for r in self.roles)


@pytest.fixture(scope="module")
async def traced(bootstrap: str, simulator: str, logs_dir: Path, collector: Collector) -> AsyncIterator[Traced]:
    """A worker and a gateway on topics of their own, exporting to :func:`collector` every 100 ms."""
    run = uuid.uuid4().hex[:8]
    names = ("requests", "cancels", "responses", "dlq", "tokens", "state", "queue")
    topics = {key: f"trace-{run}.{key}" for key in names}
    env = stack_env(bootstrap, simulator, NEXUS_WORKER_APP_ID=f"nexus-trace-{run}",
                    **{f"NEXUS_KAFKA_{key.upper()}_TOPIC": name for key, name in topics.items()})
    env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}  # the standard variables, and only ours
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_BSP_SCHEDULE_DELAY="100")
    worker = Role("worker", ["worker"], env, logs_dir).start()
    roles = [worker]
    try:
        gateway = start_gateway(env, logs_dir)
        roles.append(gateway)
        traced = Traced(KafkaSettings(bootstrap=bootstrap, **{f"{k}_topic": v for k, v in topics.items()}),  # type: ignore[arg-type]
                        gateway.url, roles)
        await _warm_up(traced)
        yield traced
    finally:
        for role in reversed(roles):
            role.stop()


async def _warm_up(traced: Traced) -> None:
    """Once the worker answered one request, it owns the partitions: the tests' waits are for their answer."""
    async with RequestProducer(traced.kafka) as producer:
        warm = InferenceRequest(uuid.uuid4().hex, MODEL, "warm up", ModelContext("warm-up"))
        try:
            await producer.submit_and_wait(warm, timeout_s=180)
        except ResponseTimeoutError as exc:
            raise AssertionError(f"{exc}\n{traced.logs()}") from None


async def _post(traced: Traced, path: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.post(f"{traced.gateway}{path}", json=body, headers=headers)


async def _response_record(reader: TopicReader, request_id: str, traced: Traced) -> Any:
    try:
        records = await reader.read_until(
            lambda rs: any(decode_response(CODEC, r.value).id == request_id for r in rs), timeout=90)
    except TimeoutError as exc:
        raise AssertionError(f"no response to {request_id}: {exc}\n{traced.logs()}") from None
    return next(r for r in records if decode_response(CODEC, r.value).id == request_id)


def _is_model_call(request_id: str) -> Callable[[Span], bool]:
    return lambda s: (s.service == "nexus-worker" and s.kind == SpanProto.SPAN_KIND_CLIENT
                      and s.attributes.get("nexus.request_id") == request_id)


async def _model_call_and_its_chain(collector: Collector, traced: Traced, trace_id: str, request_id: str,
                                    ) -> tuple[Span, list[Span]]:
    """The worker's model-call span of ``request_id`` once it and its parents up to the gateway's
    produce are exported."""
    def complete() -> tuple[Span, list[Span]] | None:
        call = collector.find(trace_id, _is_model_call(request_id))
        if call is None:
            return None
        chain = collector.ancestors(call)
        return (call, chain) if any(s.service == "nexus-gateway" for s in chain) else None

    return await eventually(complete, f"the spans of {request_id} in trace {trace_id}, up to the gateway's",
                            timeout=60, context=lambda: collector.summary() + "\n" + traced.logs())


async def test_the_clients_trace_id_is_on_the_workers_model_call_and_the_response(
    traced: Traced, collector: Collector,
) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    async with TopicReader(traced.kafka.bootstrap, traced.kafka.responses_topic) as responses:
        reply = await _post(traced, "/infer", {"model_id": MODEL, "input": "Follow me", "context": {"session_id": "t1"}},
                            {"traceparent": f"00-{trace_id}-{client_span}-01", "tracestate": "nexus-test=1"})
        assert reply.status_code == 202, reply.text
        request_id = reply.json()["id"]
        record = await _response_record(responses, request_id, traced)
    assert decode_response(CODEC, record.value).status == "ok"

    call, chain = await _model_call_and_its_chain(collector, traced, trace_id, request_id)
    # The model call: the GenAI semantic conventions, with the simulator's token counts.
    assert call.name == f"text_completion {MODEL}"
    assert call.attributes["gen_ai.operation.name"] == "text_completion"
    assert call.attributes["gen_ai.system"] == "ollama"
    assert call.attributes["gen_ai.request.model"] == MODEL
    assert call.attributes["gen_ai.usage.input_tokens"] > 0 and call.attributes["gen_ai.usage.output_tokens"] > 0
    assert call.attributes["server.address"] == "127.0.0.1"
    # Its parents: the worker's process span, then the gateway's produce, a child of the client's span.
    process, produce = chain[0], chain[-1]
    assert (process.service, process.kind, process.name) == (
        "nexus-worker", SpanProto.SPAN_KIND_CONSUMER, f"process {traced.kafka.requests_topic}")
    assert (produce.service, produce.kind, produce.name) == (
        "nexus-gateway", SpanProto.SPAN_KIND_PRODUCER, f"send {traced.kafka.requests_topic}")
    assert produce.parent_id == client_span and produce.attributes["messaging.system"] == "kafka"
    assert produce.attributes["messaging.destination.name"] == traced.kafka.requests_topic
    # The wait before the call, beside it in the process span.
    wait = collector.find(trace_id, lambda s: s.name == f"wait {MODEL}" and s.parent_id == process.span_id)
    assert wait is not None and wait.service == "nexus-worker"

    # The response record carries the trace on (its own produce span is the parent it names).
    carried = TraceContext.from_kafka(record.headers)
    assert carried is not None and carried.trace_id == trace_id and carried.state == "nexus-test=1"
    sent = await eventually(lambda: collector.find(trace_id, lambda s: s.span_id == carried.parent.span_id),
                            "the response's produce span", timeout=30, context=collector.summary)
    assert sent is not None and (sent.service, sent.kind, sent.name) == (
        "nexus-worker", SpanProto.SPAN_KIND_PRODUCER, f"send {traced.kafka.responses_topic}")
    assert sent.parent_id == process.span_id


async def test_a_call_without_traceparent_starts_a_trace_followed_to_the_end(
    traced: Traced, collector: Collector,
) -> None:
    async with TopicReader(traced.kafka.bootstrap, traced.kafka.responses_topic) as responses:
        reply = await _post(traced, "/infer", {"model_id": MODEL, "input": "New trace", "context": {"session_id": "t2"}},
                            {})
        assert reply.status_code == 202, reply.text
        request_id = reply.json()["id"]
        record = await _response_record(responses, request_id, traced)
    carried = TraceContext.from_kafka(record.headers)
    assert carried is not None and carried.state is None

    call, chain = await _model_call_and_its_chain(collector, traced, carried.trace_id, request_id)
    produce = chain[-1]
    assert produce.service == "nexus-gateway" and produce.parent_id == ""  # the trace starts at the gateway
    assert call.attributes["gen_ai.usage.output_tokens"] > 0


async def test_a_streamed_dropin_call_puts_the_trace_on_every_token_chunk(traced: Traced, collector: Collector) -> None:
    trace_id = secrets.token_hex(16)
    async with TopicReader(traced.kafka.bootstrap, traced.kafka.tokens_topic) as tokens:
        reply = await _post(traced, "/api/generate", {"model": MODEL, "prompt": "Stream me", "stream": True},
                            {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
        assert reply.status_code == 200, reply.text
        request_id = reply.headers["x-nexus-request-id"]
        mine = await tokens.read_until(
            lambda rs: any(decode_token(CODEC, r.value).id == request_id for r in rs), timeout=30)
    chunks = [r for r in mine if decode_token(CODEC, r.value).id == request_id]
    assert chunks and {TraceContext.from_kafka(r.headers).trace_id for r in chunks} == {trace_id}  # type: ignore[union-attr]
    call, chain = await _model_call_and_its_chain(collector, traced, trace_id, request_id)
    # The chunks name the worker's process span, the model call's parent.
    assert {TraceContext.from_kafka(r.headers).parent.span_id for r in chunks} == {call.parent_id}  # type: ignore[union-attr]


async def test_the_producer_api_sends_the_traceparent_it_is_given(traced: Traced, collector: Collector) -> None:
    trace_id = secrets.token_hex(16)
    async with RequestProducer(traced.kafka) as producer:
        request = InferenceRequest(uuid.uuid4().hex, MODEL, "From a program", ModelContext("t4"))
        response = await producer.submit_and_wait(request, timeout_s=60,
                                                  traceparent=f"00-{trace_id}-{secrets.token_hex(8)}-01")
    assert response.status == "ok"
    # No provider in this test process: no produce span of its own, the worker's spans still join the trace.
    call = await eventually(lambda: collector.find(trace_id, _is_model_call(request.id)),
                            "the model-call span of the producer's request", timeout=60, context=collector.summary)
    assert call is not None and call.attributes["gen_ai.request.model"] == MODEL
    assert os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") is None  # the test process itself exports nothing


async def test_without_an_endpoint_the_traceparent_is_carried_as_it_came(stack: dict[str, str]) -> None:
    """The shared stack exports nothing: no span is made, the worker copies the request's header."""
    assert not any(k.startswith("OTEL_EXPORTER") for k in stack)
    traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    kafka = KafkaSettings(bootstrap=stack["NEXUS_KAFKA_BOOTSTRAP"])
    async with TopicReader(kafka.bootstrap, kafka.responses_topic) as responses, \
            TopicReader(kafka.bootstrap, kafka.tokens_topic) as tokens:
        async with httpx.AsyncClient(timeout=60) as http:
            reply = await http.post(f"{stack['GATEWAY_URL']}/infer", headers={"traceparent": traceparent}, json={
                "model_id": MODEL, "input": "As it came", "stream": True, "context": {"session_id": "t5"}})
        assert reply.status_code == 202, reply.text
        request_id = reply.json()["id"]
        records = await responses.read_until(
            lambda rs: any(decode_response(CODEC, r.value).id == request_id for r in rs), timeout=60)
        chunks = await tokens.read_until(
            lambda rs: any(decode_token(CODEC, r.value).id == request_id for r in rs), timeout=30)
    response = next(r for r in records if decode_response(CODEC, r.value).id == request_id)
    assert dict(response.headers)["traceparent"] == traceparent.encode()
    mine = [r for r in chunks if decode_token(CODEC, r.value).id == request_id]
    assert {dict(r.headers)["traceparent"] for r in mine} == {traceparent.encode()}
