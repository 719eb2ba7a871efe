"""Traces (nexus/tracing.py): the W3C trace context on the wire, the spans' shape and attributes.

The wire part is pure; the spans are checked with an in-memory exporter of a private provider
(the process-wide one stays unset, as in a role without an OTLP endpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace as otel
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from consumers.bridge import BridgeCore
from consumers.bridge.frames import result_frame
from nexus import tracing
from nexus.access import AccessPolicy
from nexus.settings import AccessSettings, KafkaSettings
from nexus.tracing import TraceContext, TraceParent, parse_traceparent
from producers.client import RequestProducer
from schemas import (
    Codec, InferenceRequest, InferenceResponse, Message, ModelContext, InferenceOptions, encode_response, headers,
)

CODEC = Codec.from_directory()
TRACE_ID, SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
PARENT = TraceContext(TraceParent(TRACE_ID, SPAN_ID))


def _request(messages: tuple[Message, ...] = (), **options: Any) -> InferenceRequest:
    return InferenceRequest("r1", "llama3.1", "" if messages else "hi", ModelContext("s1"), messages=messages,
                            options=InferenceOptions(**options))


def _response(**fields: Any) -> InferenceResponse:
    base: dict[str, Any] = dict(id="r1", model_id="llama3.1", status="ok", context=ModelContext("s1"), latency_ms=5,
                                completed_at=datetime(2024, 5, 1, tzinfo=UTC), output="hello",
                                endpoint="http://gpu-3:11434", prompt_tokens=12, completion_tokens=7,
                                done_reason="stop", queue_ms=40)
    base.update(fields)
    return InferenceResponse(**base)


# -- the wire format --------------------------------------------------------------------------


def test_a_traceparent_is_parsed_and_formatted_back_as_it_came() -> None:
    parsed = parse_traceparent(TRACEPARENT)
    assert parsed == TraceParent(TRACE_ID, SPAN_ID, 1) and parsed.sampled
    assert str(parsed) == TRACEPARENT
    assert parse_traceparent(TRACEPARENT.encode()) == parsed  # as a Kafka header value
    assert parse_traceparent(f"  {TRACEPARENT} ") == parsed
    unsampled = parse_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-00")
    assert unsampled is not None and not unsampled.sampled and str(unsampled).endswith("-00")


@pytest.mark.parametrize("value", [
    None, "", "garbage", TRACEPARENT.upper(),  # hex is lowercase
    f"00-{'0' * 32}-{SPAN_ID}-01", f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero ids are invalid
    f"ff-{TRACE_ID}-{SPAN_ID}-01",  # version ff is forbidden
    f"00-{TRACE_ID}-{SPAN_ID}-01-extra",  # version 00 has exactly four fields
    f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01", f"00-{TRACE_ID}-{SPAN_ID}-1", b"\xff\xfe",
])
def test_an_invalid_traceparent_is_none_so_a_new_trace_starts(value: str | bytes | None) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_is_read_for_its_first_four_fields() -> None:
    assert parse_traceparent(f"01-{TRACE_ID}-{SPAN_ID}-01-what-comes-later") == TraceParent(TRACE_ID, SPAN_ID, 1)


def test_tracestate_is_passed_on_unchanged_when_it_is_sane() -> None:
    assert tracing.valid_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE") == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert tracing.valid_tracestate(b"a=1") == "a=1"
    for bad in (None, "", "x" * 513, "a=\u00e9", "a=1\nb=2", b"\xff"):
        assert tracing.valid_tracestate(bad) is None
    # No valid traceparent: its state goes with it.
    assert TraceContext.parse("nonsense", "a=1") is None


def test_the_context_round_trips_through_kafka_headers() -> None:
    context = TraceContext.parse(TRACEPARENT, "a=1")
    assert context is not None and context.trace_id == TRACE_ID
    on_the_wire = [(headers.REPLY_TO, b"gateway-x"), *context.kafka_headers()]
    assert on_the_wire[1:] == [("traceparent", TRACEPARENT.encode()), ("tracestate", b"a=1")]
    assert TraceContext.from_kafka(on_the_wire) == context
    assert tracing.trace_id_of(on_the_wire) == TRACE_ID
    assert TraceContext.parse(TRACEPARENT).kafka_headers() == [("traceparent", TRACEPARENT.encode())]  # type: ignore[union-attr]
    assert TraceContext.from_kafka(None) is None and tracing.trace_id_of([("traceparent", b"bad")]) is None


def test_a_call_without_traceparent_gets_a_new_valid_random_trace() -> None:
    first, second = tracing.new_trace(), tracing.new_trace()
    assert parse_traceparent(str(first.parent)) == first.parent and first.parent.sampled
    assert first.trace_id != second.trace_id
    assert tracing.call_trace({}) == {}
    assert tracing.call_trace({"traceparent": TRACEPARENT}) == {"traceparent": TRACEPARENT}
    assert tracing.call_trace({"traceparent": TRACEPARENT, "tracestate": "a=1"}) == {
        "traceparent": TRACEPARENT, "tracestate": "a=1"}


def test_a_record_without_trace_headers_gets_one_trace_derived_from_its_request_id() -> None:
    """Records from a producer older than tracing: every record of one answer names the same trace."""
    legacy = tracing.record_trace([(headers.REPLY_TO, b"gw")], "request-1")
    assert legacy == tracing.record_trace(None, "request-1") != tracing.record_trace(None, "request-2")
    assert parse_traceparent(str(legacy.parent)) == legacy.parent
    assert tracing.record_trace([("traceparent", TRACEPARENT.encode())], "request-1").trace_id == TRACE_ID


def test_exporting_follows_the_standard_variables() -> None:
    assert not tracing.exporting({})
    assert tracing.exporting({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.exporting({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not tracing.exporting({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.exporting({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})


def test_without_an_endpoint_setup_makes_no_spans() -> None:
    assert tracing.setup("nexus-worker", {}) is tracing.DISABLED and not tracing.DISABLED.enabled
    assert not tracing.library().enabled  # no provider set up in this process


@pytest.mark.parametrize(("variables", "service"), [
    ({}, "nexus-worker"),
    ({"OTEL_SERVICE_NAME": "inference-eu"}, "inference-eu"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attributes,deployment.environment=prod"}, "from-attributes"),
])
def test_with_an_endpoint_setup_exports_under_the_roles_name_unless_one_is_given(
    variables: dict[str, str], service: str,
) -> None:
    """In a fresh interpreter: setting up installs the process-wide provider."""
    script = (
        "from opentelemetry import trace; from nexus import tracing\n"
        "t = tracing.setup('nexus-worker')\n"
        "print(t.enabled, tracing.setup('nexus-other') is t, trace.get_tracer_provider().resource.attributes['service.name'])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", **variables)  # nothing is sent: no span is made
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", service]


def test_the_model_call_attributes_follow_the_genai_conventions() -> None:
    request = _request(max_tokens=64, temperature=0.2)
    attributes = tracing.genai_attributes(request, _response())
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.system"] == "ollama"
    assert attributes["gen_ai.request.model"] == "llama3.1"
    assert attributes["gen_ai.usage.input_tokens"] == 12 and attributes["gen_ai.usage.output_tokens"] == 7
    assert attributes["gen_ai.request.max_tokens"] == 64 and attributes["gen_ai.request.temperature"] == 0.2
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert (attributes["server.address"], attributes["server.port"]) == ("gpu-3", 11434)
    assert "error.type" not in attributes
    chat = tracing.genai_attributes(_request((Message("user", "hi"),)), _response(
        status="error", error="boom", endpoint="https://api.example", error_kind=None), system="openai")
    assert (chat["gen_ai.operation.name"], chat["gen_ai.system"], chat["server.port"]) == ("chat", "openai", 443)
    assert chat["error.type"] == "error"


# -- spans ------------------------------------------------------------------------------------


@pytest.fixture()
def spans() -> tuple[tracing.Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracing.Tracing(provider.get_tracer("test")), exporter


def _by_name(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return {span.name: span for span in exporter.get_finished_spans()}


def test_a_produce_span_is_the_childs_parent_and_the_records_header(spans: tuple[tracing.Tracing, Any]) -> None:
    tracer, exporter = spans
    parent = TraceContext.parse(TRACEPARENT, "a=1")
    with tracer.sending("inference.requests", parent, "r1", "llama3.1") as sending:
        sending.sent(3, 42)
    span = _by_name(exporter)["send inference.requests"]
    assert span.kind is SpanKind.PRODUCER
    assert f"{span.context.trace_id:032x}" == TRACE_ID and f"{span.parent.span_id:016x}" == SPAN_ID
    assert span.attributes["messaging.system"] == "kafka"
    assert span.attributes["messaging.destination.name"] == "inference.requests"
    assert span.attributes["messaging.destination.partition.id"] == "3"
    assert span.attributes["messaging.kafka.offset"] == 42 and span.attributes["nexus.request_id"] == "r1"
    carried = TraceContext.from_kafka(sending.headers)
    assert carried == TraceContext(TraceParent(TRACE_ID, f"{span.context.span_id:016x}", 1), "a=1")

    with pytest.raises(RuntimeError), tracer.sending("inference.requests", None, "r2"):
        raise RuntimeError("kafka said no")
    failed = [s for s in exporter.get_finished_spans() if s.attributes["nexus.request_id"] == "r2"][0]
    assert failed.parent is None and not failed.status.is_ok  # a new trace, marked failed


def test_the_worker_spans_wait_then_call_inside_the_process_span(spans: tuple[tracing.Tracing, Any]) -> None:
    tracer, exporter = spans
    request = _request()
    answer = tracer.answering(PARENT, request, "inference.requests", 2, 7, "nexus-worker")
    answer.dispatched()
    answer.dispatched()  # a retry: one call span, an event on it
    answer.answered(_response())
    answer.end()
    found = _by_name(exporter)
    process, wait, call = found["process inference.requests"], found["wait llama3.1"], found["text_completion llama3.1"]
    assert process.kind is SpanKind.CONSUMER and f"{process.parent.span_id:016x}" == SPAN_ID
    assert wait.parent.span_id == call.parent.span_id == process.context.span_id
    assert {f"{s.context.trace_id:032x}" for s in (process, wait, call)} == {TRACE_ID}
    assert wait.end_time <= call.start_time and process.attributes["nexus.queue_ms"] == 40
    assert call.kind is SpanKind.CLIENT and [e.name for e in call.events] == ["retry"]
    assert call.attributes["gen_ai.usage.output_tokens"] == 7 and call.attributes["server.address"] == "gpu-3"
    assert process.attributes["messaging.consumer.group.name"] == "nexus-worker"
    assert answer.context.parent.span_id == f"{process.context.span_id:016x}"  # what its records carry


def test_an_answer_without_a_model_call_has_no_call_span(spans: tuple[tracing.Tracing, Any]) -> None:
    tracer, exporter = spans
    answer = tracer.answering(PARENT, _request(), "inference.requests", 0, 0)
    answer.answered(_response(cached=True))
    answer.end()
    assert sorted(_by_name(exporter)) == ["process inference.requests", "wait llama3.1"]
    assert _by_name(exporter)["wait llama3.1"].attributes["nexus.outcome"] == "cached"

    exporter.clear()
    failing = tracer.answering(PARENT, _request(), "inference.requests", 0, 1)
    failing.dispatched()
    failing.end(RuntimeError("the worker stopped"))
    found = _by_name(exporter)
    assert found["wait llama3.1"].status.is_ok  # it was dispatched: the wait itself went well
    assert not found["text_completion llama3.1"].status.is_ok and not found["process inference.requests"].status.is_ok


# -- the producer API -------------------------------------------------------------------------


class _Sent:
    partition, offset = 0, 0


async def _headers_of_submit(**trace: str) -> list[tuple[str, bytes]]:
    producer = RequestProducer(KafkaSettings(bootstrap="127.0.0.1:9"))
    seen: list[list[tuple[str, bytes]]] = []

    async def send_and_wait(topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> _Sent:
        seen.append(headers)
        return _Sent()

    producer._producer.send_and_wait = send_and_wait
    await producer.submit(_request(), **trace)
    return seen[0]


async def test_the_producer_sends_the_given_traceparent_else_the_current_span_else_a_new_trace() -> None:
    given = await _headers_of_submit(traceparent=TRACEPARENT, tracestate="a=1")
    assert given == [("traceparent", TRACEPARENT.encode()), ("tracestate", b"a=1")]

    remote = otel.NonRecordingSpan(otel.SpanContext(int("ab" * 16, 16), int("cd" * 8, 16), is_remote=True,
                                                    trace_flags=otel.TraceFlags(1)))
    with otel.use_span(remote):  # a program's current span (its own OpenTelemetry setup)
        current = await _headers_of_submit()
        assert tracing.parent_for("invalid", None) == TraceContext(TraceParent("ab" * 16, "cd" * 8, 1))
    assert current == [("traceparent", f"00-{'ab' * 16}-{'cd' * 8}-01".encode())]

    new = TraceContext.from_kafka(await _headers_of_submit(traceparent="not-a-traceparent"))
    assert new is not None and new.trace_id not in (TRACE_ID, "ab" * 16)


# -- the bridge -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


def test_a_result_frame_names_the_trace_of_its_response_record() -> None:
    assert "trace_id" not in json.loads(result_frame(_response()))
    bridge = BridgeCore(CODEC, responses_topic="inference.responses", tokens_topic="inference.tokens",
                        access=AccessPolicy(AccessSettings(())), known_models=("llama3.1",), max_queue=10)
    bridge.start_at({("inference.responses", 0): 0})
    peer = bridge.connect()
    bridge.receive(peer, json.dumps({"type": "subscribe", "session_id": "s1"}))
    value = encode_response(CODEC, _response())
    bridge.route(_Record("inference.responses", 0, 0, value, (("traceparent", TRACEPARENT.encode()),)))
    bridge.route(_Record("inference.responses", 0, 1, value))  # a record written before tracing
    frames = [json.loads(f) for f in peer.outbox.queued() if '"result"' in f]
    assert [f.get("trace_id") for f in frames] == [TRACE_ID, None]
