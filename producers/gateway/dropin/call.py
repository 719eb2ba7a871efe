"""One drop-in call, whichever API it came through: parse, authorize, submit, wait, answer.

The Ollama and OpenAI modules differ only in how a body becomes a request and how
answers, chunks and errors look; each describes that as a :class:`DropInApi` and
:func:`call_handler` runs the same flow for both:

- an invalid body or header: 400 (404 for an unknown model), before Kafka sees anything;
- a model the caller's API key may not use: 403 (raised to the access middleware);
- Kafka did not acknowledge the request, or the reply reader is down: 503;
- a request too big for one Kafka record (``RequestTooLarge`` from the producer): 413;
- the pipeline answered ``status=error``: 500, unless its ``error_kind`` is ``model_not_found``
  (the model is on none of its endpoints): then 404 in the API's words (:meth:`DropInApi.model_not_found`),
  or ``bad_request`` (the backend refused the request: tools for a model without tool support, a
  bad schema...): then 400 with the backend's own message;
- no answer before the call's timeout: 504 (the request is still answered, into the audit log);
- over one of its tenant's limits, or a deadline shorter than the model queue's estimated wait
  (:mod:`producers.admission`): 429 with ``Retry-After``, in the API's shape;
- the client disconnects before its answer (from a waiting call, or from a stream): the request
  is cancelled (an ``InferenceCancel``, reason "client disconnected"), the worker drops it or
  aborts its model call. The gateway runs with aiohttp's handler cancellation, so a disconnect
  cancels the waiting handler; a failed write while streaming says the same;
- an unstreamed answer carries ``X-Nexus-Queue-Ms``: how long it waited in the worker's schedule;
- the call's ``traceparent``/``tracestate`` headers go with the request record (:mod:`nexus.tracing`);
- streamed: the status line waits for the first chunk, so an early failure keeps its status;
  a later failure ends the stream with the API's error chunk. Tool calls are streamed as they
  come (each whole); those the chunks did not bring are sent before the stream's end.

Every call is counted in ``nexus_gateway_dropin_requests`` by API, route, model and status.
See ``docs/drop-in.md``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nexus import tracing
from nexus.access import AccessPolicy, Forbidden
from nexus.settings import Settings
from schemas import BAD_REQUEST, MODEL_NOT_FOUND, InferenceRequest, InferenceResponse, ToolCall
from schemas.headers import QUEUE_MS_HEADER
from schemas.validation import RejectedRequest, effective_tenant, parse_json

from producers.client import RequestTooLarge, SubmitError
from producers.gateway import access as access_http
from producers.admission import Admission, Rejection
from producers.gateway.dropin.conversation import CallContext, call_context
from producers.replies import Exchange, ReplyError, ReplyIndex, ReplyReader, ReplyTimeoutError

FAILED = "the request failed"  # a failed answer without an error text
DISCONNECTED = "client disconnected"  # the reason of the cancel a disconnect produces
CLIENT_CLOSED = 499  # the metrics' status of a call whose client went away (nginx's code)

log = logging.getLogger(__name__)


class DropInMetrics:
    """The drop-in APIs' metrics, in the gateway's registry (``nexus_gateway_*``)."""

    def __init__(self, registry: CollectorRegistry, index: ReplyIndex, reader: ReplyReader) -> None:
        self.requests = Counter(
            "nexus_gateway_dropin_requests",
            "Ollama- and OpenAI-API calls by API, route, model and HTTP status.",
            ["api", "route", "model", "code"],
            registry=registry,
        )
        self.reply_seconds = Histogram(
            "nexus_gateway_reply_seconds",
            "Synchronous calls: from Kafka's acknowledgement of the request to its final answer.",
            ["api"],
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.timeouts = Counter(
            "nexus_gateway_reply_timeouts",
            "Synchronous calls answered 504 because their answer did not come in time.",
            ["api"],
            registry=registry,
        )
        waiting = Gauge("nexus_gateway_replies_waiting", "Calls waiting for their answer.", registry=registry)
        waiting.set_function(lambda: len(index))
        records = Gauge(
            "nexus_gateway_reply_records",
            "Records the reply reader read: addressed to this gateway (decoded) or skipped unread.",
            ["outcome"],
            registry=registry,
        )
        records.labels(outcome="mine").set_function(lambda: reader.mine)
        records.labels(outcome="skipped").set_function(lambda: reader.skipped)
        self.disconnects = Counter(
            "nexus_gateway_dropin_disconnects",
            "Calls whose client went away before the answer: their requests were cancelled.",
            ["api"],
            registry=registry,
        )

    def count(self, api: str, route: str, model: str, code: int) -> None:
        self.requests.labels(api=api, route=route, model=model, code=str(code)).inc()

    def answered(self, api: str, seconds: float) -> None:
        self.reply_seconds.labels(api=api).observe(seconds)

    def timed_out(self, api: str) -> None:
        self.timeouts.labels(api=api).inc()

    def disconnected(self, api: str) -> None:
        self.disconnects.labels(api=api).inc()


@dataclass
class DropIn:
    """What the drop-in handlers share: settings, the exchange, metrics, a clock, admission."""

    settings: Settings
    exchange: Exchange
    metrics: DropInMetrics
    version: str
    clock: Callable[[], float]
    admission: Admission | None = None  # None: every call is taken
    on_rejected: Callable[[InferenceRequest, Rejection], None] | None = None  # the gateway's metrics
    _cancels: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    def cancel_later(self, request: InferenceRequest, reason: str) -> None:
        """Produce the request's cancel in the background: its handler is being cancelled."""
        task = asyncio.get_running_loop().create_task(self._cancel(request, reason))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, request: InferenceRequest, reason: str) -> None:
        try:
            await self.exchange.cancel(request.id, reason, request.key_name)
        except Exception as exc:  # noqa: BLE001 - the client is gone; the answer still lands in the audit log
            log.warning("could not cancel request %s (%s): %s", request.id, reason, exc)

    async def drain(self) -> None:
        """Wait for the cancels still being produced (on shutdown, before the producer stops)."""
        if self._cancels:
            await asyncio.gather(*self._cancels, return_exceptions=True)


class ParsedCall(Protocol):
    """What the flow needs of a parsed call; each API's call class has more."""

    @property
    def model(self) -> str:
        """The model as the client spelled it."""

    @property
    def model_id(self) -> str:
        """The Nexus model the call names: the access check is on it."""

    @property
    def stream(self) -> bool: ...

    @property
    def request(self) -> InferenceRequest | None:
        """What to submit; None for a call answered at once (Ollama's "load the model")."""


C = TypeVar("C", bound=ParsedCall)
Parse = Callable[[Any, Collection[str], CallContext], C]


class DropInApi(ABC, Generic[C]):
    """How one API's calls look: its error shape, its answers and its stream framing.

    Stream methods return the encoded bytes to write (an NDJSON line, an SSE event...).
    """

    name: ClassVar[str]  # the ``api`` label of the metrics
    invalid_json: ClassVar[str]  # the 400 message for a body that is not JSON, before the parser's words
    stream_headers: ClassVar[dict[str, str]]  # Content-Type and the like of a streamed answer

    @abstractmethod
    def error(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
              headers: dict[str, str] | None = None) -> web.Response:
        """An error answer in this API's shape."""

    def model_not_found(self, call: C, message: str, headers: dict[str, str] | None = None) -> web.Response:
        """404: the pipeline found the call's model on none of its endpoints (``message`` says
        what they have); OpenAI's shape by default."""
        return self.error(404, message, param="model", code=MODEL_NOT_FOUND, headers=headers)

    def rate_limited(self, rejection: Rejection, headers: dict[str, str]) -> web.Response:
        """429 with ``Retry-After`` in the API's error shape (code ``rate_limit_exceeded``), or 413
        without it for a request bigger than its tenant's whole tokens-per-minute budget."""
        if rejection.retry_after_s is None:
            return self.error(rejection.status, rejection.message, headers=headers)
        return self.error(429, rejection.message, code="rate_limit_exceeded",
                          headers={**headers, "Retry-After": str(rejection.retry_after_s)})

    def failure(self, call: C, response: InferenceResponse, headers: dict[str, str] | None = None) -> web.Response:
        """The answer to a call the pipeline answered ``status=error``."""
        if response.error_kind == MODEL_NOT_FOUND:
            return self.model_not_found(call, response.error or FAILED, headers)
        return self.error(failure_status(response), response.error or FAILED, headers=headers)

    @abstractmethod
    def headers(self, call: C) -> dict[str, str]:
        """The headers of every answer to ``call`` (request id, ignored fields...)."""

    @abstractmethod
    def whole(self, call: C, response: InferenceResponse | None) -> dict[str, Any]:
        """The JSON of an unstreamed answer; ``response`` is None for a call without a request."""

    def stream_start(self, call: C) -> bytes:
        """Written before the first chunk; nothing by default."""
        return b""

    @abstractmethod
    def stream_chunk(self, call: C, text: str) -> bytes:
        """One chunk of the answer's text."""

    @abstractmethod
    def stream_tool_calls(self, call: C, calls: tuple[ToolCall, ...], start: int) -> bytes:
        """Tool calls of the answer, each whole; ``start`` is the first one's index in the answer."""

    @abstractmethod
    def stream_end(self, call: C, response: InferenceResponse) -> bytes:
        """What ends a stream that was answered ``ok``."""

    @abstractmethod
    def stream_error(self, status: int, message: str, code: str | None = None) -> bytes:
        """What ends a stream that failed after its status line was sent."""


def failure_status(response: InferenceResponse) -> int:
    """The HTTP status of an answer ``status=error``: 400 when the backend refused the request as
    bad (its own message is the error), 404 for a model on no endpoint, else 500."""
    if response.error_kind == BAD_REQUEST:
        return 400
    if response.error_kind == MODEL_NOT_FOUND:
        return 404
    return 500


def call_handler(
    dropin: DropIn, api: DropInApi[C], route: str, parse: Parse[C]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of one generate-like route of ``api`` (``route`` labels its metrics)."""
    known = dropin.settings.model_ids

    async def handle(http: web.Request) -> web.StreamResponse:
        try:
            body = parse_json(await http.read(), api.invalid_json)
            context = call_context(http.headers.items(), dropin.settings.gateway.reply_timeout_s)
            call = parse(body, known, context)
        except RejectedRequest as exc:
            dropin.metrics.count(api.name, route, "", exc.status)
            return api.error(exc.status, exc.message, param=exc.param, code=exc.code)
        try:
            access_http.authorize(http, call.model_id)  # a call answered at once too: it names a model
        except Forbidden:
            dropin.metrics.count(api.name, route, call.model_id, 403)
            raise  # the access middleware answers 403 in the API's shape
        headers = api.headers(call)
        if call.request is None:
            dropin.metrics.count(api.name, route, "", 200)
            return web.json_response(api.whole(call, None), headers=headers)
        key_name = AccessPolicy.owner(access_http.key_of(http))
        request = dataclasses.replace(
            call.request, key_name=key_name,
            tenant=effective_tenant(key_name, call.request.tenant, call.request.context.session_id))
        if dropin.admission is not None:
            rejection = dropin.admission.admit(request)
            if rejection is not None:
                if dropin.on_rejected is not None:
                    dropin.on_rejected(request, rejection)
                answer: web.StreamResponse = api.rate_limited(rejection, headers)
                dropin.metrics.count(api.name, route, request.model_id, answer.status)
                return answer
        try:
            answer = await _exchange(http, dropin, api, call, request, context.timeout_s, headers)
        except asyncio.CancelledError:  # the client went away (aiohttp cancels its handler)
            dropin.metrics.count(api.name, route, request.model_id, CLIENT_CLOSED)
            raise
        dropin.metrics.count(api.name, route, request.model_id, answer.status)
        return answer

    return handle


async def _exchange(
    http: web.Request, dropin: DropIn, api: DropInApi[C], call: C, request: InferenceRequest,
    timeout_s: float, headers: dict[str, str],
) -> web.StreamResponse:
    """Submit, wait, answer: one object, or the stream's chunks then its end.

    Until the final answer arrives, a client that goes away cancels the request: the handler is
    cancelled while it waits (aiohttp's handler cancellation), or a write to the stream fails.
    """
    exchange, metrics, clock = dropin.exchange, dropin.metrics, dropin.clock
    try:
        waiter = await exchange.submit(request, **tracing.call_trace(http.headers))  # the call's traceparent
    except asyncio.CancelledError:  # gone while Kafka was taking it: it may be written
        metrics.disconnected(api.name)
        dropin.cancel_later(request, DISCONNECTED)
        raise
    except RequestTooLarge as exc:  # not produced: a request is one Kafka record
        _refund(dropin, request)
        return api.error(413, str(exc), headers=headers)
    except (SubmitError, ReplyError) as exc:
        _refund(dropin, request)
        return api.error(503, str(exc), headers=headers)
    t0 = clock()
    deadline = t0 + timeout_s
    settled = False  # the final response came, or the wait timed out: nothing to cancel

    def client_gone() -> None:
        if not settled:
            metrics.disconnected(api.name)
            dropin.cancel_later(request, DISCONNECTED)

    try:
        if not call.stream:
            response = await exchange.response(waiter, deadline, timeout_s)
            settled = True
            metrics.answered(api.name, clock() - t0)
            waited = {**headers, QUEUE_MS_HEADER: str(response.queue_ms)}
            if response.status != "ok":
                return api.failure(call, response, waited)
            return web.json_response(api.whole(call, response), headers=waited)

        # The status line waits for the first event, so an early failure still gets its status.
        event = await exchange.next_event(waiter, deadline, timeout_s)
        if isinstance(event, InferenceResponse) and event.status != "ok":
            settled = True
            metrics.answered(api.name, clock() - t0)
            return api.failure(call, event, {**headers, QUEUE_MS_HEADER: str(event.queue_ms)})
        stream = web.StreamResponse(headers={**api.stream_headers, **headers})
        await stream.prepare(http)
        try:
            try:
                start = api.stream_start(call)
                if start:
                    await stream.write(start)
                calls_sent = 0
                while True:
                    if isinstance(event, str):
                        await stream.write(api.stream_chunk(call, event))
                    elif isinstance(event, tuple):  # tool calls streamed with a chunk
                        await stream.write(api.stream_tool_calls(call, event, calls_sent))
                        calls_sent += len(event)
                    else:
                        settled = True
                        metrics.answered(api.name, clock() - t0)
                        if event.status != "ok":  # mid-stream: the API's error chunk
                            await stream.write(api.stream_error(failure_status(event), event.error or FAILED))
                        else:
                            rest = event.tool_calls[calls_sent:]  # the calls the chunks did not bring
                            if rest:
                                await stream.write(api.stream_tool_calls(call, rest, calls_sent))
                            await stream.write(api.stream_end(call, event))
                        break
                    event = await exchange.next_event(waiter, deadline, timeout_s)
            except ReplyError as exc:
                settled = True  # a timed-out request is still answered, into the audit log
                timeout = isinstance(exc, ReplyTimeoutError)
                if timeout:
                    metrics.timed_out(api.name)
                await stream.write(api.stream_error(504 if timeout else 503, str(exc), "timeout" if timeout else None))
            await stream.write_eof()
        except ConnectionResetError:
            client_gone()  # the client went away mid-stream: stop its generation
        return stream
    except asyncio.CancelledError:
        client_gone()
        raise
    except ReplyTimeoutError as exc:
        metrics.timed_out(api.name)
        return api.error(504, str(exc), code="timeout", headers=headers)
    except ReplyError as exc:
        return api.error(503, str(exc), headers=headers)
    finally:
        exchange.release(waiter)


def _refund(dropin: DropIn, request: InferenceRequest) -> None:
    """The request was not produced: it does not count against its tenant's limits."""
    if dropin.admission is not None:
        dropin.admission.refund(request)
