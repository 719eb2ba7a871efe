"""The Python producer API: submit inference requests to Kafka, and optionally wait for the answer.

    async with RequestProducer(settings.kafka) as producer:
        request_id = await producer.submit(InferenceRequest(...))
        response = await producer.submit_and_wait(InferenceRequest(...), timeout_s=60)

    with SyncRequestProducer(settings.kafka) as producer:      # for code without asyncio
        response = producer.submit_and_wait(InferenceRequest(...))

``submit`` returns only once the brokers acknowledged the record (``acks=all``,
idempotent producer), so a returned id is durably in its lane: ``inference.requests``, or
``inference.requests.batch`` for a request with ``priority="batch"`` (``kafka.lane_topic``).
``cancel(request_id)`` writes an :class:`~schemas.InferenceCancel` to ``inference.cancels``:
the worker holding the request drops it or aborts its model call, and answers it ``cancelled``.
``submit_and_wait`` addresses the request to this producer (``reply_to``) and reads its
answer from ``inference.responses`` with the reader the drop-in gateways use
(:mod:`producers.replies`), which skips everyone else's answers without decoding them.
Every request record carries a W3C ``traceparent`` header (``traceparent=`` given, else the
current OpenTelemetry span's, else a new trace: :mod:`nexus.tracing`).

This module needs only :mod:`schemas`, :mod:`nexus` and aiokafka, so other systems can
use it without the worker, the gateway or their dependencies. ``import producers`` gives
the same names (``producers.RequestProducer``, ``producers.SubmitError``...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future as ThreadFuture
from types import TracebackType
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from nexus import tracing
from nexus.errors import NexusError
from nexus.kafka.clients import client_options, refusal
from nexus.settings import KafkaSettings
from schemas import (
    PRIORITIES,
    Codec,
    InferenceCancel,
    InferenceRequest,
    InferenceResponse,
    InvalidValueError,
    encode_cancel,
    encode_request,
    utcnow,
)
from schemas.limits import MAX_RECORD_BYTES

from producers.replies import ReplyIndex, ReplyReader, ReplyReaderError, instance_name

__all__ = [
    "DEFAULT_WAIT_S",
    "ProducerClosedError",
    "ProducerError",
    "RequestProducer",
    "RequestTooLarge",
    "ResponseTimeoutError",
    "ResponsesUnavailableError",
    "SubmitError",
    "SyncRequestProducer",
]

T = TypeVar("T")
DEFAULT_WAIT_S = 120.0

log = logging.getLogger(__name__)


class ProducerError(NexusError, RuntimeError):
    """Base class of the producer API's errors (also a ``RuntimeError``, as it always was)."""


class SubmitError(ProducerError):
    """Kafka did not acknowledge the request; it may or may not have been written."""


class RequestTooLarge(SubmitError):
    """The encoded request is over :data:`schemas.limits.MAX_RECORD_BYTES`; it was NOT produced.

    A request is one Kafka record, and Kafka refuses records over its message limit (1 MiB by
    default), so the producer refuses it first. The HTTP edges answer 413, the bridge an
    error frame. ``size`` and ``limit`` are in bytes.
    """

    def __init__(self, request_id: str, size: int, limit: int = MAX_RECORD_BYTES) -> None:
        super().__init__(
            f"request {request_id} is {size} bytes encoded; the limit is {limit} "
            "(a request must fit one Kafka record): send fewer or smaller images, or a shorter conversation"
        )
        self.request_id = request_id
        self.size = size
        self.limit = limit


class ResponseTimeoutError(ProducerError, TimeoutError):
    """The request was submitted (acknowledged) but no response arrived in time.

    It is still in ``inference.requests`` and will be answered; the answer can be
    read later from ``inference.responses`` by ``request_id``.
    """

    def __init__(self, request_id: str, timeout_s: float, bootstrap: str) -> None:
        super().__init__(
            f"request {request_id} was submitted to {bootstrap} but not answered within {timeout_s:g}s; "
            "is a worker running? (the answer will still be written to the responses topic)"
        )
        self.request_id = request_id
        self.timeout_s = timeout_s


class ResponsesUnavailableError(ProducerError):
    """The responses topic cannot be read, so answers cannot be awaited."""


class ProducerClosedError(ProducerError):
    """The producer was used before ``start()`` or after ``stop()``."""


class RequestProducer:
    """Writes :class:`InferenceRequest` records to their lane's topic, keyed by model, and
    :class:`InferenceCancel` records to the cancels topic, keyed by request id."""

    def __init__(self, kafka: KafkaSettings, codec: Codec | None = None) -> None:
        self._kafka = kafka
        self._codec = codec or Codec.from_directory()
        self._producer = AIOKafkaProducer(
            **client_options(kafka),
            acks="all",
            enable_idempotence=True,
            linger_ms=0,  # 1 ms of linger cost ~2.6 ms per produce (p50); load batches anyway
            request_timeout_ms=int(kafka.produce_timeout_s * 1000),
        )
        self.name = instance_name(role="producer")  # the reply_to of what submit_and_wait sends
        self._replies = ReplyIndex()
        self._reader: ReplyReader | None = None
        self._reader_lock = asyncio.Lock()

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            refused = await refusal(self._kafka)
            raise SubmitError(str(refused or f"cannot reach Kafka at {self._kafka.bootstrap}: {exc}")) from None

    async def stop(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None
        try:
            # Unacknowledged records are flushed for at most one produce timeout: with the
            # brokers gone, stopping must not hang (their senders were already told 503).
            await asyncio.wait_for(self._producer.stop(), self._kafka.produce_timeout_s)
        except TimeoutError:
            log.warning("stopped the producer with records Kafka never acknowledged")

    async def __aenter__(self) -> RequestProducer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def submit(
        self, request: InferenceRequest, *, traceparent: str | None = None, tracestate: str | None = None
    ) -> str:
        """Write ``request`` to its priority's lane; return its id once Kafka acknowledged it.

        The record carries a W3C ``traceparent`` header (:mod:`nexus.tracing`), which the worker
        copies onto the request's token chunks and response: ``traceparent``/``tracestate`` when
        given (an invalid one is ignored), else the current OpenTelemetry span's when there is one,
        else a new trace. With OpenTelemetry set up, the produce is a span of its own.

        Raises :class:`SubmitError` if no acknowledgement arrives within the
        produce timeout, :class:`RequestTooLarge` (a ``SubmitError``, nothing written) for
        a request whose encoding is over :data:`schemas.limits.MAX_RECORD_BYTES`, and
        :class:`schemas.InvalidValueError` for a request that does not fit the schema or whose
        ``priority`` is not one of :data:`schemas.PRIORITIES`.
        """
        if request.priority not in PRIORITIES:
            raise InvalidValueError(
                f"request {request.id}: priority {request.priority!r} is not one of {', '.join(PRIORITIES)}"
            )
        value = encode_request(self._codec, request)
        if len(value) > MAX_RECORD_BYTES:
            raise RequestTooLarge(request.id, len(value))
        topic, what = self._kafka.lane_topic(request.priority), f"request {request.id}"
        # The record carries the trace context: the caller's, else the current span's, else a new one.
        parent = tracing.parent_for(traceparent, tracestate)
        spans = tracing.library()
        if not spans.enabled:  # no span objects: the header alone
            await self._produce(topic, value, request.model_id, what, (parent or tracing.new_trace()).kafka_headers())
            return request.id
        with spans.sending(topic, parent, request.id, request.model_id) as sending:
            sent = await self._produce(topic, value, request.model_id, what, sending.headers)
            sending.sent(sent.partition, sent.offset)
        return request.id

    async def cancel(self, request_id: str, reason: str = "", key_name: str | None = None) -> InferenceCancel:
        """Ask for request ``request_id`` to be cancelled; return the cancel once Kafka acknowledged it.

        The worker holding the request drops it if it is still queued, or aborts its model call,
        and answers it with status ``cancelled``; a request already answered is unaffected. A
        request submitted with an API key is cancelled only with the same ``key_name`` (edges set
        it from the caller's key). Raises :class:`SubmitError` like :meth:`submit`.
        """
        cancel = InferenceCancel(id=request_id, requested_at=utcnow(), reason=reason, key_name=key_name)
        await self._produce(self._kafka.cancels_topic, encode_cancel(self._codec, cancel), request_id,
                            f"the cancel of request {request_id}")
        return cancel

    async def _produce(
        self, topic: str, value: bytes, key: str, what: str, headers: list[tuple[str, bytes]] | None = None
    ) -> Any:
        """Send one record and wait for Kafka's acknowledgement; return its metadata (partition, offset)."""
        try:
            async with asyncio.timeout(self._kafka.produce_timeout_s):  # no task of its own, as wait_for makes
                return await self._producer.send_and_wait(topic, value=value, key=key.encode(), headers=headers)
        except (TimeoutError, KafkaError) as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            raise SubmitError(f"Kafka at {self._kafka.bootstrap} did not acknowledge {what}: {reason}") from None

    async def submit_many(
        self, requests: Sequence[InferenceRequest], *, traceparent: str | None = None, tracestate: str | None = None
    ) -> list[str]:
        """Write several requests concurrently (they share producer batches); ``traceparent`` as in
        :meth:`submit`, for each (without one and outside a span, each request is a trace of its own)."""
        return list(await asyncio.gather(
            *(self.submit(r, traceparent=traceparent, tracestate=tracestate) for r in requests)))

    async def submit_and_wait(
        self, request: InferenceRequest, timeout_s: float = DEFAULT_WAIT_S, *,
        traceparent: str | None = None, tracestate: str | None = None,
    ) -> InferenceResponse:
        """Submit ``request`` and return its response, read from the responses topic.

        A response with ``status="error"`` is returned, not raised: it is the answer.
        Raises :class:`SubmitError` when Kafka does not acknowledge the request
        (:class:`RequestTooLarge` when it is too big to produce) and
        :class:`ResponseTimeoutError` when no answer arrives within ``timeout_s``
        (the request stays submitted). With at-least-once delivery a request may be
        answered twice; the first answer is returned. The request is written with
        ``reply_to`` set to this producer's :attr:`name` (leave it unset).
        """
        return (await self.submit_many_and_wait([request], timeout_s, traceparent=traceparent,
                                                tracestate=tracestate))[0]

    async def submit_many_and_wait(
        self, requests: Sequence[InferenceRequest], timeout_s: float = DEFAULT_WAIT_S, *,
        traceparent: str | None = None, tracestate: str | None = None,
    ) -> list[InferenceResponse]:
        """Submit several requests and return their responses in the same order.

        ``timeout_s`` bounds the whole wait; on timeout the error names the first
        request still unanswered.
        """
        addressed = [self._addressed(r) for r in requests]
        reader = await self._reader_started()
        try:
            reader.check()
        except ReplyReaderError as exc:
            raise ResponsesUnavailableError(str(exc)) from None
        # Expect before producing: the reader's position is already before any answer.
        futures: dict[str, asyncio.Future[InferenceResponse]] = {}
        try:
            for r in addressed:
                if r.id not in futures:
                    futures[r.id] = self._replies.expect(r.id, stream=False).done
            await self.submit_many(addressed, traceparent=traceparent, tracestate=tracestate)
            pending = (await asyncio.wait(futures.values(), timeout=timeout_s))[1] if futures else set()
            if pending:
                first = next(r.id for r in addressed if futures[r.id] in pending)
                raise ResponseTimeoutError(first, timeout_s, self._kafka.bootstrap)
            try:
                return [futures[r.id].result() for r in addressed]
            except ReplyReaderError as exc:
                raise ResponsesUnavailableError(str(exc)) from None
        finally:
            for request_id, future in futures.items():
                if not future.done():
                    self._replies.forget(request_id)

    def _addressed(self, request: InferenceRequest) -> InferenceRequest:
        if request.reply_to is None:
            return dataclasses.replace(request, reply_to=self.name)
        if request.reply_to != self.name:
            raise ValueError(
                f"request {request.id} has reply_to={request.reply_to!r}: submit_and_wait addresses "
                "the answer to this producer, leave reply_to unset (or use submit)"
            )
        return request

    async def _reader_started(self) -> ReplyReader:
        """The reader of this producer's answers, started on first use and shared after."""
        async with self._reader_lock:
            if self._reader is None:
                reader = ReplyReader(self._kafka, self.name, self._replies, self._codec)
                try:
                    await reader.start()
                except ReplyReaderError as exc:
                    raise ResponsesUnavailableError(str(exc)) from None
                self._reader = reader
            return self._reader

    async def ping(self, timeout_s: float) -> None:
        """Raise if the cluster does not answer a metadata request within ``timeout_s``."""
        try:
            ok = await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout_s)
        except (TimeoutError, KafkaError) as exc:
            raise SubmitError(f"Kafka at {self._kafka.bootstrap} does not answer: {exc!r}") from None
        if not ok.brokers():
            raise SubmitError(f"Kafka at {self._kafka.bootstrap} reports no brokers")


class SyncRequestProducer:
    """The producer API for code without asyncio: a :class:`RequestProducer` on a private loop.

    The loop runs in a daemon thread owned by this object; every method blocks until its
    result is there and raises the same typed errors. Thread-safe.

        with SyncRequestProducer(KafkaSettings(bootstrap="kafka:9092")) as producer:
            print(producer.submit_and_wait(request, timeout_s=60).output)
    """

    def __init__(self, kafka: KafkaSettings, codec: Codec | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nexus-producer", daemon=True)
        self._thread.start()
        self._producer: RequestProducer | None = None
        self._closed = False
        self._kafka = kafka
        self._codec = codec

    def start(self) -> None:
        async def make() -> RequestProducer:
            producer = RequestProducer(self._kafka, self._codec)  # aiokafka wants its loop running
            await producer.start()
            return producer

        try:
            self._producer = self._call(make())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the producer and its loop thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._producer is not None:
                asyncio.run_coroutine_threadsafe(self._producer.stop(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> SyncRequestProducer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, request: InferenceRequest, *, traceparent: str | None = None,
               tracestate: str | None = None) -> str:
        return self._call(self._started().submit(request, **_caller_trace(traceparent, tracestate)))

    def submit_many(self, requests: Sequence[InferenceRequest], *, traceparent: str | None = None,
                    tracestate: str | None = None) -> list[str]:
        return self._call(self._started().submit_many(requests, **_caller_trace(traceparent, tracestate)))

    def cancel(self, request_id: str, reason: str = "", key_name: str | None = None) -> InferenceCancel:
        return self._call(self._started().cancel(request_id, reason, key_name))

    def submit_and_wait(self, request: InferenceRequest, timeout_s: float = DEFAULT_WAIT_S, *,
                        traceparent: str | None = None, tracestate: str | None = None) -> InferenceResponse:
        return self._call(self._started().submit_and_wait(
            request, timeout_s, **_caller_trace(traceparent, tracestate)))

    def submit_many_and_wait(
        self, requests: Sequence[InferenceRequest], timeout_s: float = DEFAULT_WAIT_S, *,
        traceparent: str | None = None, tracestate: str | None = None,
    ) -> list[InferenceResponse]:
        return self._call(self._started().submit_many_and_wait(
            requests, timeout_s, **_caller_trace(traceparent, tracestate)))

    def _started(self) -> RequestProducer:
        if self._producer is None or self._closed:
            raise ProducerClosedError("use SyncRequestProducer in a `with` block, or call start() first")
        return self._producer

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise ProducerClosedError("this SyncRequestProducer is closed")
        future: ThreadFuture[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()


def _caller_trace(traceparent: str | None, tracestate: str | None) -> dict[str, str | None]:
    """The trace context in the calling thread (its current span's, unless one is given): the
    private loop's thread has no current span of its own."""
    parent = tracing.parent_for(traceparent, tracestate)
    return {} if parent is None else {"traceparent": str(parent.parent), "tracestate": parent.state}
