"""Traces: a request followed from the call that brought it, through Kafka and the worker, to its answer.

Two layers, so that tracing is never a dependency:

- **The W3C trace context on the wire**, always. The edges (``POST /infer``, the drop-in APIs,
  the producer API) put a ``traceparent`` (and the caller's ``tracestate``) Kafka header on the
  request record: the one the call came with, else the current OpenTelemetry span's, else a new
  trace. The worker copies it onto the token chunks and the response. Parsing, formatting and
  making one are the pure functions below (stdlib only: ``secrets`` for new ids).
- **Spans**, only with the ``otel`` extra installed *and* an OTLP endpoint configured
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``): the edge's produce
  (``send <topic>``, PRODUCER), and in the worker ``process <topic>`` (CONSUMER) holding the wait in
  the model's schedule (``wait <model>``), the model call (``<operation> <model>``, CLIENT, with the
  GenAI semantic-convention attributes) and the response's produce. The headers then carry the
  spans' own ids, so each hop is the parent of the next. Exported over OTLP/HTTP (protobuf) in
  batches, off the event loop.

Without an endpoint nothing but the header copy happens: no span object is made per request
(the hot path checks :attr:`Tracing.enabled`). A process that set up OpenTelemetry itself (a
program using the producer API) gets the produce spans in its own provider. See
docs/observability.md, "Traces".
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from schemas import InferenceRequest, InferenceResponse
from schemas.headers import TRACEPARENT, TRACESTATE

try:  # the optional extra: pip install 'nexus-inference[otel]'
    from opentelemetry import trace as otel
    from opentelemetry.context import Context
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    otel = None  # type: ignore[assignment]

__all__ = [
    "AnswerSpans", "DISABLED", "Sending", "TraceContext", "TraceParent", "Tracing", "call_trace", "exporting",
    "genai_attributes", "library", "new_trace", "parent_for", "parse_traceparent", "record_trace", "setup",
    "trace_id_of", "valid_tracestate",
]

log = logging.getLogger(__name__)

# version 00: exactly this; a later version may append fields after a "-" (W3C Trace Context, 3.2).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
MAX_TRACESTATE = 512  # the length W3C lets a vendor truncate at; longer ones are dropped
DEFAULT_SYSTEM = "ollama"  # gen_ai.system of an endpoint of unknown kind
# A consumed record's headers: aiokafka's (key, value) pairs, or a mapping as Faust may hold them.
KafkaHeaders = Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None


# -- the wire format (pure) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A W3C ``traceparent``: the trace, the span that is the parent of the next one, its flags."""

    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16 lowercase hex digits, not all zero
    flags: int = 1  # bit 0: sampled

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def _ascii(value: str | bytes | None) -> str | None:
    """A header's text: bytes as ASCII (None when they are not), text as it is."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value


def parse_traceparent(value: str | bytes | None) -> TraceParent | None:
    """The ``traceparent`` in ``value``, or None when it is absent or invalid (the receiver of an
    invalid one starts a new trace, as W3C says). Version ``ff`` is invalid; a later version is
    read for its first four fields."""
    value = _ascii(value)
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceParent(trace_id, span_id, int(flags, 16))


def valid_tracestate(value: str | bytes | None) -> str | None:
    """``tracestate`` as it may be passed on (printable ASCII, at most 512 characters), else None.

    Nexus adds no entry of its own; it hands the caller's vendors theirs unchanged."""
    value = _ascii(value)
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > MAX_TRACESTATE or not all(" " <= c <= "~" for c in value):
        return None
    return value


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A request's place in its trace as records carry it: ``traceparent`` and ``tracestate``."""

    parent: TraceParent
    state: str | None = None

    @property
    def trace_id(self) -> str:
        return self.parent.trace_id

    @classmethod
    def parse(cls, traceparent: str | bytes | None, tracestate: str | bytes | None = None) -> TraceContext | None:
        """From the two header values; None without a valid ``traceparent`` (its state goes with it)."""
        parent = parse_traceparent(traceparent)
        return None if parent is None else cls(parent, valid_tracestate(tracestate))

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> TraceContext | None:
        """From HTTP request headers (a case-insensitive mapping, as aiohttp's)."""
        return cls.parse(headers.get(TRACEPARENT), headers.get(TRACESTATE))

    @classmethod
    def from_kafka(cls, headers: KafkaHeaders) -> TraceContext | None:
        """From a Kafka record's headers; None when they carry no valid ``traceparent``."""
        traceparent = tracestate = None
        for key, value in headers.items() if isinstance(headers, Mapping) else headers or ():
            if key == TRACEPARENT:
                traceparent = value
            elif key == TRACESTATE:
                tracestate = value
        return cls.parse(traceparent, tracestate)

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        """The Kafka headers that carry this context."""
        headers = [(TRACEPARENT, str(self.parent).encode())]
        if self.state:
            headers.append((TRACESTATE, self.state.encode()))
        return headers


def call_trace(headers: Mapping[str, str]) -> dict[str, str]:
    """The trace headers an HTTP call came with, as keyword arguments of the producer's ``submit``
    (empty without a ``traceparent``: the producer then starts the trace)."""
    traceparent = headers.get(TRACEPARENT)
    if traceparent is None:
        return {}
    tracestate = headers.get(TRACESTATE)
    return {"traceparent": traceparent} if tracestate is None else {"traceparent": traceparent,
                                                                     "tracestate": tracestate}


def new_trace(state: str | None = None) -> TraceContext:
    """A new trace (random ids from ``secrets``), sampled: for a call that came without one."""
    ids = secrets.token_hex(24)
    trace_id, span_id = ids[:32], ids[32:]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:  # 2**-64 at worst, but invalid ids are never sent
        return new_trace(state)
    return TraceContext(TraceParent(trace_id, span_id), state)


def record_trace(headers: KafkaHeaders, request_id: str) -> TraceContext:
    """The trace of a request record: its headers', or, for a record written without one (by a
    producer older than tracing), one derived from the request id, so every record of its answer
    (chunks, response, a retry's) names the same trace."""
    found = TraceContext.from_kafka(headers)
    if found is not None:
        return found
    digest = hashlib.blake2b(request_id.encode(), digest_size=24, person=b"nexus-trace").hexdigest()
    return TraceContext(TraceParent(digest[:32], digest[32:]))


def trace_id_of(headers: KafkaHeaders) -> str | None:
    """The trace id a record's headers name, or None (the bridge's result frames show it)."""
    found = TraceContext.from_kafka(headers)
    return None if found is None else found.trace_id


def genai_attributes(
    request: InferenceRequest, response: InferenceResponse, system: str = DEFAULT_SYSTEM
) -> dict[str, Any]:
    """The model-call span's attributes by the OpenTelemetry GenAI semantic conventions, and Nexus's own."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation_of(request),
        "gen_ai.system": system,
        "gen_ai.provider.name": system,  # the newer conventions' name of gen_ai.system
        "gen_ai.request.model": request.model_id,
        "gen_ai.response.model": response.model_id,
        "gen_ai.usage.input_tokens": response.prompt_tokens,
        "gen_ai.usage.output_tokens": response.completion_tokens,
        "nexus.request_id": request.id,
        "nexus.retries": response.retries,
        "nexus.cached": response.cached,
    }
    if request.options.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = request.options.max_tokens
    if request.options.temperature is not None:
        attributes["gen_ai.request.temperature"] = request.options.temperature
    if response.done_reason:
        attributes["gen_ai.response.finish_reasons"] = (response.done_reason,)
    if response.time_to_first_token_ms is not None:
        attributes["nexus.time_to_first_token_ms"] = response.time_to_first_token_ms
    if response.endpoint:
        url = urlsplit(response.endpoint)
        if url.hostname:
            attributes["server.address"] = url.hostname
        port = url.port or {"http": 80, "https": 443}.get(url.scheme)
        if port is not None:
            attributes["server.port"] = port
    if response.status != "ok":
        attributes["error.type"] = response.error_kind or response.status
    return attributes


def operation_of(request: InferenceRequest) -> str:
    """``gen_ai.operation.name``: a conversation is a chat, a prompt a text completion."""
    return "chat" if request.messages else "text_completion"


def exporting(environ: Mapping[str, str]) -> bool:
    """Whether the standard OpenTelemetry variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


# -- spans (with the otel extra) --------------------------------------------------------------


def _parent(context: TraceContext | None) -> Any:
    """The OpenTelemetry context whose span is ``context``'s (a remote one); an empty one: a new trace."""
    if context is None:
        return Context()
    state = TraceState.from_header([context.state]) if context.state else None
    span = SpanContext(int(context.parent.trace_id, 16), int(context.parent.span_id, 16), is_remote=True,
                       trace_flags=TraceFlags(context.parent.flags), trace_state=state)
    return otel.set_span_in_context(NonRecordingSpan(span), Context())


def _context_of(span: Any, state: str | None) -> TraceContext:
    """What the records written under ``span`` carry: its ids, the caller's ``tracestate``."""
    ids = span.get_span_context()
    return TraceContext(TraceParent(f"{ids.trace_id:032x}", f"{ids.span_id:016x}", int(ids.trace_flags)), state)


def current() -> TraceContext | None:
    """The current OpenTelemetry span's context, when otel is installed and a span is current."""
    if otel is None:
        return None
    ids = otel.get_current_span().get_span_context()
    if not ids.is_valid:
        return None
    state = ids.trace_state.to_header() if ids.trace_state else None
    return TraceContext(TraceParent(f"{ids.trace_id:032x}", f"{ids.span_id:016x}", int(ids.trace_flags)), state or None)


def parent_for(traceparent: str | None, tracestate: str | None) -> TraceContext | None:
    """Whose child a submitted request is: the ``traceparent`` given, else the current OpenTelemetry
    span, else None (a new trace). An invalid ``traceparent`` counts as none."""
    if traceparent is not None:
        given = TraceContext.parse(traceparent, tracestate)
        if given is not None:
            return given
    return current()


class Sending:
    """One record's produce under a span: the headers the record carries, and what Kafka said."""

    __slots__ = ("context", "span")

    def __init__(self, context: TraceContext, span: Any) -> None:
        self.context = context
        self.span = span

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return self.context.kafka_headers()

    def sent(self, partition: int | None, offset: int | None) -> None:
        """Kafka acknowledged the record at ``partition``/``offset``."""
        if partition is not None:
            self.span.set_attribute("messaging.destination.partition.id", str(partition))
        if offset is not None:
            self.span.set_attribute("messaging.kafka.offset", offset)


def _messaging(operation: str, topic: str, request_id: str) -> dict[str, Any]:
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": topic,
        "messaging.message.id": request_id,
        "nexus.request_id": request_id,
    }


class AnswerSpans:
    """One request's spans in the worker: ``process <topic>`` (CONSUMER, child of the request's
    ``traceparent``) from its reading to its answer, and in it ``wait <model>`` until its model call
    is dispatched, then ``<operation> <model>`` (CLIENT), the call itself. Records written meanwhile
    (chunks, the response) are children of the process span: :attr:`context`."""

    def __init__(self, tracer: Any, parent: TraceContext, request: InferenceRequest, topic: str,
                 partition: int, offset: int, group: str | None = None) -> None:
        self._tracer = tracer
        self._request = request
        attributes = _messaging("process", topic, request.id)
        attributes.update({"messaging.destination.partition.id": str(partition), "messaging.kafka.offset": offset,
                           "gen_ai.request.model": request.model_id, "nexus.priority": request.priority})
        if group:
            attributes["messaging.consumer.group.name"] = group
        self._process = tracer.start_span(f"process {topic}", context=_parent(parent), kind=SpanKind.CONSUMER,
                                          attributes=attributes)
        self.context = _context_of(self._process, parent.state)
        self._inside = otel.set_span_in_context(self._process, Context())
        self._wait: Any = tracer.start_span(
            f"wait {request.model_id}", context=self._inside,
            attributes={"nexus.request_id": request.id, "gen_ai.request.model": request.model_id,
                        "nexus.priority": request.priority})
        self._call: Any = None

    def dispatched(self) -> None:
        """The model call starts (again, after a failed attempt: the call span covers them all)."""
        if self._call is not None:
            self._call.add_event("retry")
            return
        self._end_wait()
        operation = operation_of(self._request)
        self._call = self._tracer.start_span(
            f"{operation} {self._request.model_id}", context=self._inside, kind=SpanKind.CLIENT,
            attributes={"gen_ai.operation.name": operation, "gen_ai.request.model": self._request.model_id,
                        "nexus.request_id": self._request.id})

    def answered(self, response: InferenceResponse, system: str = DEFAULT_SYSTEM) -> None:
        """The answer is there: the call's usage and outcome on its span, the queue wait on the wait's."""
        self._process.set_attributes({"nexus.status": response.status, "nexus.queue_ms": response.queue_ms})
        if self._wait is not None:  # never dispatched: a cached, cancelled or expired answer
            self._wait.set_attribute("nexus.outcome", "cached" if response.cached else response.status)
        self._end_wait(response.queue_ms)
        if self._call is not None:
            self._call.set_attributes(genai_attributes(self._request, response, system))
            if response.status != "ok":
                self._call.set_status(Status(StatusCode.ERROR, response.error or response.status))
            self._call.end()
            self._call = None
        if response.status == "error":
            self._process.set_status(Status(StatusCode.ERROR, response.error or "error"))

    def end(self, error: BaseException | None = None) -> None:
        """End every span still open (``error``: how the answer failed)."""
        for span in (self._wait, self._call, self._process):
            if span is None:
                continue
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, repr(error)))
            span.end()
        self._wait = self._call = None

    def _end_wait(self, queue_ms: int | None = None) -> None:
        if self._wait is not None:
            if queue_ms is not None:
                self._wait.set_attribute("nexus.queue_ms", queue_ms)
            self._wait.end()
            self._wait = None


class Tracing:
    """Span making for one process, or none: :attr:`enabled` is false without the otel extra or
    without a configured endpoint, and then callers copy headers only."""

    def __init__(self, tracer: Any = None) -> None:
        self._tracer: Any = tracer
        self.enabled = tracer is not None

    @contextmanager
    def sending(self, topic: str, parent: TraceContext | None, request_id: str,
                key: str | None = None) -> Iterator[Sending]:
        """A PRODUCER span ``send <topic>`` around one record's produce; ``parent`` None starts a
        new trace. A failure in the block is recorded on the span and raised."""
        attributes = _messaging("send", topic, request_id)
        if key is not None:
            attributes["messaging.kafka.message.key"] = key
        span = self._tracer.start_span(f"send {topic}", context=_parent(parent), kind=SpanKind.PRODUCER,
                                       attributes=attributes)
        with otel.use_span(span, end_on_exit=True):
            yield Sending(_context_of(span, parent.state if parent else None), span)

    def answering(self, parent: TraceContext, request: InferenceRequest, topic: str, partition: int,
                  offset: int, group: str | None = None) -> AnswerSpans:
        """The worker's spans of one request (see :class:`AnswerSpans`)."""
        return AnswerSpans(self._tracer, parent, request, topic, partition, offset, group)


DISABLED = Tracing()
_library: tuple[Any, Tracing] = (None, DISABLED)


def library() -> Tracing:
    """Spans in whatever tracer provider this process set up (:func:`setup`, or a program's own),
    none while there is none: what the producer API uses. Cheap: one check of the global provider."""
    global _library
    if otel is None:
        return DISABLED
    provider = otel.get_tracer_provider()
    if provider is not _library[0]:
        live = not isinstance(provider, (otel.ProxyTracerProvider, otel.NoOpTracerProvider))
        _library = (provider, Tracing(provider.get_tracer("nexus")) if live else DISABLED)
    return _library[1]


def setup(service: str, environ: Mapping[str, str] | None = None) -> Tracing:
    """Export this process's spans over OTLP/HTTP when an endpoint is configured, else nothing.

    Reads the standard variables: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the full URL) or
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``/v1/traces`` appended), ``OTEL_SERVICE_NAME`` (``service``
    by default: nexus-gateway, nexus-worker, nexus-bridge), ``OTEL_RESOURCE_ATTRIBUTES``, the
    ``OTEL_TRACES_SAMPLER*`` and ``OTEL_BSP_*`` ones, ``OTEL_SDK_DISABLED``. Calling it again in the
    same process reuses the provider set up first. (``environ`` decides whether to export; the
    exporter and the resource read the process's own variables, as OpenTelemetry does.)
    """
    environ = os.environ if environ is None else environ
    if not exporting(environ):
        return DISABLED
    if otel is None:
        log.warning("an OTLP endpoint is configured but OpenTelemetry is not installed: no spans are exported "
                    "(pip install 'nexus-inference[otel]'); the traceparent headers travel all the same")
        return DISABLED
    current_provider = otel.get_tracer_provider()
    if isinstance(current_provider, otel.ProxyTracerProvider):
        try:
            _install(service, environ)
        except ImportError as exc:  # the API alone, brought by another package: no SDK, no exporter
            log.warning("an OTLP endpoint is configured but %s: no spans are exported "
                        "(pip install 'nexus-inference[otel]')", exc)
            return DISABLED
    return library()


def _install(service: str, environ: Mapping[str, str]) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: Nexus exports traces over http/protobuf only", protocol)
    resource = Resource.create({})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):  # neither variable names one
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)  # flushed and shut down at exit
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    otel.set_tracer_provider(provider)
    log.info("exporting traces as %s over OTLP/HTTP", resource.attributes.get(SERVICE_NAME))
