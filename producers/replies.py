"""Request/reply over Kafka: a gateway instance receives the answers to its own synchronous calls.

A drop-in call (Ollama's or OpenAI's API) is produced to ``inference.requests`` like any
other request, with ``reply_to`` set to this gateway instance's unique name. The worker
copies that name into a ``nexus-reply-to`` Kafka header on the response and on every
token chunk. Each gateway runs one :class:`ReplyReader`: an aiokafka consumer with no
group, assigned every partition of ``inference.responses`` and ``inference.tokens`` from
their ends at startup. It compares the header first and skips other gateways' records
(and everyone's asynchronous traffic) without decoding them; its own records are decoded
and routed through a :class:`ReplyIndex` (request id -> :class:`Waiter`).

Because the reader's positions are fixed before the gateway accepts calls, and a waiter is
registered before its request is produced, no answer can pass unseen. An answer that comes
after its caller gave up finds no waiter and is dropped here; it stays in the topic (the
audit log). A reader that fails fails every waiting call at once, refuses new ones, and is
started again after a pause (:mod:`nexus.tasks`), from the ends of the topics again; the
gateway's ``/health`` is red meanwhile. Design and trade-offs: ``docs/drop-in.md``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from nexus.errors import NexusError
from nexus.kafka.readers import TopicMissingError, read_from_end, reader
from nexus.settings import KafkaSettings
from nexus.tasks import Background, TaskState
from schemas import (
    Codec, InferenceRequest, InferenceResponse, InferenceToken, SchemaError, ToolCall, decode_response, decode_token,
)
from schemas.headers import REPLY_TO

if TYPE_CHECKING:  # the producer API waits through this module: no import cycle at run time
    from producers.client import RequestProducer

log = logging.getLogger(__name__)

REPLY_HEADER = REPLY_TO  # the old name, still used by tests and benches

# A streamed call's events: a chunk's text, the tool calls a chunk brought, the final response.
Event = str | tuple[ToolCall, ...] | InferenceResponse


def instance_name(
    hostname: str | None = None, pid: int | None = None, suffix: str | None = None, role: str = "gateway"
) -> str:
    """A name no other instance has, now or after a restart: role, host, process and a random part."""
    return f"{role}-{hostname or socket.gethostname()}-{pid or os.getpid()}-{suffix or secrets.token_hex(4)}"


class ReplyError(NexusError):
    """Base class of the request/reply errors."""


class ReplyTimeoutError(ReplyError, TimeoutError):
    """The request was submitted but its answer did not arrive within the caller's timeout.

    The request stays in ``inference.requests`` and is still answered; the late answer
    is written to ``inference.responses`` like any other.
    """

    def __init__(self, request_id: str, timeout_s: float) -> None:
        super().__init__(
            f"no answer to request {request_id} within {timeout_s:g}s; it was submitted and will still be "
            "answered: the late answer is kept in the audit log (inference.responses)"
        )
        self.request_id = request_id
        self.timeout_s = timeout_s


class ReplyReaderError(ReplyError):
    """The reply reader cannot read, or stopped reading, the reply topics."""


class ChunkSequencer:
    """A streamed answer's chunks in ``seq`` order, each once, completed from the final output.

    Chunks and the final response travel on different topics, so the reader may see the
    response before the last chunks (the worker publishes every chunk before it, but the
    two topics are fetched independently). The caller must still get exactly the answer:
    the final output supplies whatever the chunks have not. With at-least-once delivery a
    chunk may come twice; the repeat is dropped by its ``seq``.
    """

    def __init__(self) -> None:
        self._next = 0
        self._held: dict[int, tuple[str, tuple[ToolCall, ...]]] = {}
        self._sent: list[str] = []
        self._sent_length = 0
        self.finished = False

    def add(self, seq: int, text: str, tool_calls: tuple[ToolCall, ...] = ()) -> list[str | tuple[ToolCall, ...]]:
        """What can go out now, in order (nothing while an earlier ``seq`` is missing): each
        chunk's text, then the tool calls it brought, if any (a chunk of only tool calls has no text)."""
        if self.finished or seq < self._next or seq in self._held:
            return []
        self._held[seq] = (text, tool_calls)
        out: list[str | tuple[ToolCall, ...]] = []
        while self._next in self._held:
            chunk, calls = self._held.pop(self._next)
            self._next += 1
            self._sent.append(chunk)
            self._sent_length += len(chunk)
            if chunk or not calls:
                out.append(chunk)
            if calls:
                out.append(calls)
        return out

    def finish(self, output: str) -> str:
        """What of ``output`` the chunks sent so far lack; '' if they do not begin it."""
        self.finished = True
        sent = self.text
        return output[len(sent):] if output.startswith(sent) else ""

    @property
    def text(self) -> str:
        return "".join(self._sent)


class Waiter:
    """One synchronous call waiting for its answer.

    ``done`` resolves with the response; a streaming waiter also gets ``events``: its
    chunk texts (and the tool calls chunks brought, as tuples) in order, then the response
    itself as the last event.
    """

    def __init__(self, request_id: str, stream: bool, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.stream = stream
        self.done: asyncio.Future[InferenceResponse] = loop.create_future()
        self.events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self._sequencer = ChunkSequencer()

    def deliver_token(self, token: InferenceToken) -> None:
        if self.stream:
            for event in self._sequencer.add(token.seq, token.text, token.tool_calls):
                self.events.put_nowait(event)

    def deliver_response(self, response: InferenceResponse) -> None:
        if self.done.done():
            return
        if self.stream:
            rest = self._sequencer.finish(response.output if response.status == "ok" else "")
            if rest:
                self.events.put_nowait(rest)
            self.events.put_nowait(response)
        self.done.set_result(response)

    def fail(self, exc: BaseException) -> None:
        if self.done.done():
            return
        if self.stream:
            self.events.put_nowait(exc)
            self.done.cancel()  # streams read events; an exception here would go unretrieved
        else:
            self.done.set_exception(exc)


class ReplyIndex:
    """Request id -> waiter, for the records addressed to this gateway. No I/O."""

    def __init__(self) -> None:
        self._waiters: dict[str, Waiter] = {}
        self.delivered = 0
        self.unclaimed = 0  # ours, but nobody waits any more (timed out, or a duplicate answer)

    def expect(self, request_id: str, stream: bool) -> Waiter:
        """Register a call before producing its request, so its answer cannot be missed."""
        if request_id in self._waiters:
            raise ValueError(f"request {request_id} is already awaited")
        waiter = Waiter(request_id, stream, asyncio.get_running_loop())
        self._waiters[request_id] = waiter
        return waiter

    def forget(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)

    def on_token(self, token: InferenceToken) -> bool:
        waiter = self._waiters.get(token.id)
        if waiter is None or not waiter.stream:
            self.unclaimed += waiter is None
            return False
        waiter.deliver_token(token)
        self.delivered += 1
        return True

    def on_response(self, response: InferenceResponse) -> bool:
        """The first answer wins; a repeat (at-least-once) finds no waiter."""
        waiter = self._waiters.pop(response.id, None)
        if waiter is None:
            self.unclaimed += 1
            return False
        waiter.deliver_response(response)
        self.delivered += 1
        return True

    def fail_all(self, exc: BaseException) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.fail(exc)

    def __len__(self) -> int:
        return len(self._waiters)


class ReplyReader:
    """Follows the responses and tokens topics, handing this instance's records to the index.

    ``name``: the ``reply_to`` of this instance's requests; other records are skipped unread.
    ``None`` hands every answer to the index (for a reader of requests that name no one).

    The reading loop runs under a :class:`~nexus.tasks.Background` (its own, or the one
    given) as the task :attr:`TASK`: when it fails, every waiting call is failed at once
    (the answers sent while it is down are not read), and it is started again after a
    pause, from the ends of the topics again. :meth:`check` refuses calls until then.
    """

    TASK = "replies"

    def __init__(
        self, kafka: KafkaSettings, name: str | None, index: ReplyIndex, codec: Codec,
        background: Background | None = None,
    ) -> None:
        self._kafka = kafka
        self.name = name or "nexus-response-reader"
        self._name = name.encode() if name is not None else None
        self._index = index
        self._codec = codec
        self._background = background or Background()
        self._consumer: AIOKafkaConsumer | None = None
        self._state: TaskState | None = None
        self._following = False  # positions fixed: every answer produced from now on is read
        self.failure: BaseException | None = None  # the last failure, kept after a restart
        self.mine = 0
        self.skipped = 0

    @property
    def state(self) -> TaskState | None:
        """The reading task as ``/health`` reports it; ``None`` before :meth:`start`."""
        return self._state

    async def start(self) -> None:
        """Assign every partition at its current end; return once the positions are fixed.

        Raises :class:`ReplyReaderError` when the topics cannot be read now; failures
        after that are restarted in the background.
        """
        self._consumer = await self._connect()
        self._following = True
        self._state = self._background.start(self.TASK, self._follow, ready=lambda: self._following)

    async def stop(self) -> None:
        self._following = False
        await self._background.stop(self.TASK)
        self._state = None
        if self._consumer is not None:  # stopped before its loop ever ran
            await self._consumer.stop()
            self._consumer = None
        self._index.fail_all(ReplyReaderError("the reply reader is stopping"))

    def check(self) -> None:
        """Raise if answers can no longer be received, so no call waits in vain."""
        if self._state is None:
            raise ReplyReaderError("the reply reader is not running")
        if not self._state.up:
            raise ReplyReaderError(
                f"the reply reader stopped ({self._state.last_error}); it is being restarted, try again shortly"
            )

    def route(self, topic: str, headers: tuple[tuple[str, bytes], ...] | list[tuple[str, bytes]], value: bytes | None) -> None:
        """Decode and hand over a record addressed to this instance; skip every other one unread."""
        if value is None or (
            self._name is not None and not any(k == REPLY_TO and v == self._name for k, v in headers or ())
        ):
            self.skipped += 1
            return
        self.mine += 1
        try:
            if topic == self._kafka.tokens_topic:
                self._index.on_token(decode_token(self._codec, value))
            else:
                self._index.on_response(decode_response(self._codec, value))
        except SchemaError as exc:
            log.warning("skipping an undecodable record addressed to %s on %s: %s", self.name, topic, exc)

    async def _connect(self) -> AIOKafkaConsumer:
        """A started consumer assigned every partition of the reply topics, at their ends."""
        topics = [self._kafka.responses_topic, self._kafka.tokens_topic]
        # a waiting caller, not throughput, sets the pace
        consumer = reader(self._kafka, client_id=self.name, fetch_max_wait_ms=50)
        try:
            await consumer.start()
            await read_from_end(consumer, topics)
        except TopicMissingError as exc:
            await consumer.stop()
            raise ReplyReaderError(f"{exc} (at {self._kafka.bootstrap})") from None
        except KafkaError as exc:
            await consumer.stop()
            raise ReplyReaderError(f"cannot read {topics} at {self._kafka.bootstrap}: {exc}") from None
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def _follow(self) -> None:
        """The supervised loop: read until cancelled; on a failure, fail every waiter and raise."""
        try:
            if self._consumer is None:  # a restart: from the ends again
                self._consumer = await self._connect()
                self._following = True
                log.warning("the reply reader of %s follows the reply topics again", self.name)
            consumer = self._consumer
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for tp, records in batches.items():
                    for record in records:
                        self.route(tp.topic, record.headers, record.value)
        except Exception as exc:  # tell every waiter now instead of leaving it to time out
            self._following = False
            self.failure = exc
            self._index.fail_all(ReplyReaderError(f"the reply reader stopped: {exc!r}"))
            raise
        finally:
            self._following = False
            consumer, self._consumer = self._consumer, None
            if consumer is not None:
                await consumer.stop()


class Exchange:
    """Submit a request addressed to this instance and wait for its answer."""

    def __init__(self, reader: ReplyReader, index: ReplyIndex, producer: Callable[[], RequestProducer]) -> None:
        self.reader = reader
        self.index = index
        self._producer = producer

    @property
    def name(self) -> str:
        return self.reader.name

    async def submit(
        self, request: InferenceRequest, traceparent: str | None = None, tracestate: str | None = None
    ) -> Waiter:
        """Register, then produce (acks=all); raises SubmitError like ``POST /infer``. The trace
        context is the call's (its ``traceparent`` header), as :meth:`RequestProducer.submit` takes it."""
        self.reader.check()
        waiter = self.index.expect(request.id, request.stream)
        try:
            await self._producer().submit(dataclasses.replace(request, reply_to=self.name),
                                          traceparent=traceparent, tracestate=tracestate)
        except BaseException:
            self.index.forget(request.id)
            raise
        return waiter

    async def response(self, waiter: Waiter, deadline: float, timeout_s: float) -> InferenceResponse:
        """The answer, or ReplyTimeoutError once the loop's clock passes ``deadline``."""
        left = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.done), max(left, 0))
        except TimeoutError:
            raise ReplyTimeoutError(waiter.request_id, timeout_s) from None

    async def next_event(self, waiter: Waiter, deadline: float, timeout_s: float) -> Event:
        """A streaming call's next chunk text, tool calls, or its final response."""
        if waiter.events.empty():
            left = deadline - asyncio.get_running_loop().time()
            try:
                event = await asyncio.wait_for(waiter.events.get(), max(left, 0))
            except TimeoutError:
                raise ReplyTimeoutError(waiter.request_id, timeout_s) from None
        else:
            event = waiter.events.get_nowait()
        if isinstance(event, BaseException):
            raise event
        return event

    async def cancel(self, request_id: str, reason: str = "", key_name: str | None = None) -> None:
        """Ask the workers to cancel ``request_id`` (an ``InferenceCancel``; raises SubmitError)."""
        await self._producer().cancel(request_id, reason=reason, key_name=key_name)

    def release(self, waiter: Waiter) -> None:
        """Stop waiting (answered, timed out or abandoned); a late answer finds no waiter."""
        self.index.forget(waiter.request_id)
