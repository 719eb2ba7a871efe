"""The worker's request loop: what it does with each batch of requests, its commits and its stop.

:class:`Worker` holds everything one worker process knows (the ledger, the answers running, the
outbox, the inference, the health) and does the I/O around the pure deciders: the ledger
(streams/commits/ledger.py) says which requests to answer and how far to commit, the outbox
(streams/commits/outbox.py) when answer records are written and how offsets are committed.
streams/app.py builds the Faust app and gives its agents, timers, signals and pages to a Worker.

Delivery is at-least-once (or exactly-once, see the outbox): a request counts as answered once
its response, token chunks and dead letter are acknowledged by Kafka; each partition is committed
up to its lowest unanswered request, on a timer, when the partition is revoked and when the
worker stops. A redelivered request that is running or answered is not answered again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import faust
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced
from faust.exceptions import ProducerSendError
from faust.types import TP, EventT

from nexus import tracing
from nexus.settings import Settings
from nexus.tasks import Background
from schemas import (
    Codec, InferenceCancel, InferenceRequest, QueueReport, SchemaError, decode_request, encode_response, headers,
)
from schemas.endpoint_state import WorkerReport
from schemas.queue_state import MAX_REPORTED
from streams.answering import cache
from streams.answering.inference import Answer, Inference
from streams.backends.http import HttpClient, new_session
from streams.cancels import CancelBook, follow_cancels
from streams.commits.ledger import RequestLedger, Verdict
from streams.commits.offsets import PartitionOffsets
from streams.commits.outbox import AtOnce, InCommittedPrefix, Outbox, Undeliverable, undeliverable_reason, until_sent
from streams.health import WorkerHealth
from streams.intake import LaneBatches, channel_queue
from streams.lag import consumer_lag
from streams.metrics import WorkerMetrics
from streams.sinks import CacheKeeper, KafkaTokenSink, TableCache

log = logging.getLogger(__name__)

RETRY_PAUSE_S = (0.5, 2.0, 5.0)  # before answering again a request whose answering failed
# A dead letter Kafka refuses for good is tried again after these pauses (doubling), never dropped.
FIRST_HOLD_S = 1.0
LONGEST_HOLD_S = 60.0
# A queue report is one record: under Kafka's default 1 MiB message limit, with room to spare.
MAX_QUEUE_RECORD_BYTES = 900_000

E = TypeVar("E")
Group = list[tuple[EventT, InferenceRequest]]


def share_groups(decoded: Iterable[tuple[E, InferenceRequest | None]]) -> list[list[tuple[E, InferenceRequest]]]:
    """The requests of a batch, in groups answered by one model call: identical shareable
    requests (same cache key, not streamed) together, every other request alone, in order of
    first appearance. Undecodable ones (``None``) are left out: they are dead-lettered."""
    groups: dict[object, list[tuple[E, InferenceRequest]]] = {}
    for item, request in decoded:
        if request is None:
            continue
        share = cache.shareable(request) and not request.stream
        key = cache.cache_key(request) if share else object()
        groups.setdefault(key, []).append((item, request))
    return list(groups.values())


@dataclass
class Answering(Generic[E]):
    """A running answer: its requests' events, and whether it called a model yet (until then
    it can be cancelled and read again by its partition's next owner at no cost); with the
    wall-clock times of its way through the worker (the response's ``nexus-stages`` header)."""

    events: list[E]
    called: bool = False
    fetched: float | None = None
    batched: float | None = None
    dispatched: float | None = None

    def calls(self) -> None:
        if not self.called:
            self.dispatched = time.time()
        self.called = True

    def stages(self, appended: float | None, answered: float) -> dict[str, float]:
        """The stage times so far (epoch seconds), ``appended`` being the request record's broker timestamp."""
        times = {"appended": appended, "fetched": self.fetched, "batched": self.batched,
                 "dispatched": self.dispatched, "answered": answered}
        return {name: at for name, at in times.items() if at is not None}


def waiting(running: Iterable[tuple[Any, Answering[E]]], in_partitions: Callable[[E], bool] | None = None) -> list[Any]:
    """The keys of the running answers that called no model yet (and, with ``in_partitions``,
    hold an event it accepts)."""
    return [key for key, answering in running if not answering.called
            and (in_partitions is None or any(in_partitions(e) for e in answering.events))]


@dataclass(frozen=True)
class WorkerTopics:
    """The topics the worker writes."""

    responses: faust.TopicT
    tokens: faust.TopicT
    dead_letters: faust.TopicT
    endpoint_state: faust.TopicT
    queue: faust.TopicT


@dataclass
class _Call:
    """A model call in progress: the answer's task it runs in, the requests it answers, and
    whether a cancel of theirs stopped it."""

    task: asyncio.Task[Any]
    requests: list[InferenceRequest]
    cancelled: bool = False


class Worker:
    """Answers the requests of the partitions this worker owns; commits what is answered."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        topics: WorkerTopics,
        cache_table: faust.Table,
        metrics: WorkerMetrics | None = None,
        worker_id: str | None = None,
    ) -> None:
        self._app = app
        self._settings = settings
        self._kafka = settings.kafka
        self._config = settings.worker
        self._topics = topics
        self._cache_table = cache_table
        self.metrics = metrics or WorkerMetrics()
        self.cache = CacheKeeper(cache_table, self._config.cache_max_entries, self._owned_cache_partitions,
                                 deleted=lambda d: self.metrics.cache_deletions.labels(reason=d.reason).inc())
        self.metrics.cache_entries.set_function(lambda: len(self.cache))  # read at each scrape
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.codec = Codec.from_directory()
        self.health = WorkerHealth()
        self.ledger: RequestLedger[TP] = RequestLedger()
        self.exactly_once = self._kafka.processing_guarantee == "exactly_once"
        self._outbox: Outbox = InCommittedPrefix(app) if self.exactly_once else AtOnce(app, self.send)
        self.inference: Inference | None = None  # once a requests agent runs
        self._http: HttpClient | None = None
        self._running: dict[asyncio.Task[None], Answering[EventT]] = {}
        # Read-ahead: requests held (queued or running) per lane topic; a lane at its bound is paused.
        self._held: dict[str, int] = dict.fromkeys(self._kafka.request_topics, 0)
        self._paused: set[str] = set()
        self._resuming: set[str] = set()
        self.cancels = CancelBook()
        # Request id: the call answering it, and every request that call answers.
        self._calls: dict[str, _Call] = {}
        self._background = Background()
        self._reported: set[str] = set()  # models whose last queue report was not empty
        self._stopping = asyncio.Event()
        self._commit_gate = asyncio.Lock()
        self._generation_gate = asyncio.Lock()
        self._broker = PartitionOffsets(self._kafka, self._config.app_id)
        # Spans only with an OTLP endpoint configured; the traceparent headers travel regardless.
        self.tracing = tracing.setup("nexus-worker")
        self._systems = {e.url: e.kind for m in settings.models for e in m.endpoints}  # gen_ai.system
        self._seen_holes: dict[TP, tuple[int, int]] = {}  # at the last look

    # -- writing records ------------------------------------------------------------------

    async def send(self, topic: faust.TopicT, key: bytes | None, value: bytes, record_headers: Any = None) -> Any:
        """Queue one record outside any transaction; return the future of its acknowledgement.

        Token chunks, cache entries and endpoint state go this way under exactly once too: chunks
        must stream before the commit, and the other two are idempotent.
        """
        return await self._app.producer.send(topic.get_topic_name(), key, value, None, None, record_headers)

    async def produce(self, topic: faust.TopicT, key: bytes | None, value: bytes) -> None:
        """Send one record and wait until Kafka acknowledged it, retrying until it does."""
        await until_sent(topic.get_topic_name(), lambda: self.send(topic, key, value))

    async def dead_letter(self, event: EventT, reason: str, kind: str) -> None:
        """The request's record, as it came, to the dead-letter topic, with why in its headers."""
        message = event.message
        self.metrics.dead_letters.labels(kind=kind).inc()
        record_headers = [
            (headers.ERROR, reason.encode()),
            (headers.ERROR_KIND, kind.encode()),
            (headers.SOURCE, f"{message.topic}/{message.partition}/{message.offset}".encode()),
        ]
        pause = FIRST_HOLD_S
        while True:
            try:
                await self._outbox.write(event, self._topics.dead_letters, message.key,
                                         message.value, record_headers)  # type: ignore[arg-type]  # None: a tombstone, as it came
                return
            except Undeliverable as exc:
                # Nothing else records this request: it stays unanswered (its partition's commit waits
                # below it) until the dead-letter topic takes it, e.g. once an operator fixed its ACLs.
                self.health.failed(f"dead letter of {message.topic}/{message.partition}/{message.offset}", exc)
                log.error("the dead letter of %s/%s/%s was refused (%s); its partition's commits wait; "
                          "trying again in %.0fs", message.topic, message.partition, message.offset, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, LONGEST_HOLD_S)

    async def publish(
        self, answer: Answer, event: EventT, request: InferenceRequest, parent: tracing.TraceContext | None = None,
        stages: dict[str, float] | None = None,
    ) -> None:
        """The response (and, for a failed answer, the dead letter) of one request.

        The response carries the request's trace context (``parent``: its process span's, else its
        record's); with spans on, that of the span of its own produce; and, with ``stages``, the
        times of the request's way through the worker (header ``nexus-stages``)."""
        reply_to = answer.response.reply_to
        # The waiting gateway skips everyone else's responses by this header, without decoding them.
        record_headers = [(headers.REPLY_TO, reply_to.encode())] if reply_to else []
        if stages is not None:
            stages["sent"] = time.time()
            record_headers.append((headers.STAGES, headers.stages_value(stages)))
        parent = parent or tracing.record_trace(event.message.headers, request.id)
        topic = self._topics.responses
        key, value = request.context.session_id.encode(), encode_response(self.codec, answer.response)
        try:
            if not self.tracing.enabled:
                await self._outbox.write(event, topic, key, value, record_headers + parent.kafka_headers())
            else:
                with self.tracing.sending(topic.get_topic_name(), parent, request.id) as sending:
                    await self._outbox.write(event, topic, key, value, record_headers + sending.headers)
        except Undeliverable as refused:  # retrying cannot help: answer with why, dead-letter the request
            await self.publish_undeliverable(answer, event, request, refused, record_headers + parent.kafka_headers())
            return
        if answer.dead_letter_reason is not None:
            await self.dead_letter(event, answer.dead_letter_reason, "failed")

    async def publish_undeliverable(
        self, answer: Answer, event: EventT, request: InferenceRequest, refused: Undeliverable, record_headers: Any
    ) -> None:
        """Kafka refused the response for good: the requester gets an error response instead when
        one can still go (the answer was too large: the error is small), and the request goes to
        the dead-letter topic with the reason. Then it counts as answered, and its partition's
        commit passes it; if even its dead letter cannot be written, it is held (:meth:`dead_letter`)."""
        size = len(encode_response(self.codec, answer.response))
        reason = undeliverable_reason(refused, size)
        log.error("request %s: %s", request.id, reason)
        if refused.too_large:
            error = dataclasses.replace(answer.response, status="error", output="", tool_calls=(), error=reason)
            try:
                await self._outbox.write(event, self._topics.responses, request.context.session_id.encode(),
                                         encode_response(self.codec, error), record_headers)
            except Undeliverable as again:
                reason += f"; the error response was refused too: {again}"
        if answer.dead_letter_reason is not None:
            reason = f"{reason}; the answer was an error already: {answer.dead_letter_reason}"
        await self.dead_letter(event, reason, "undeliverable")

    async def publish_state(self) -> None:
        """Share the routing state so gateways can show it (GET /models): a compacted topic."""
        if self.inference is None:
            return
        report = WorkerReport(worker=self.worker_id, at=time.time(), models=self.inference.snapshot())
        await self.send(self._topics.endpoint_state, report.key, report.to_bytes())

    async def publish_queues(self) -> None:
        """Share each model's schedule (who waits, in which order, when each should start, who
        runs) so gateways and bridges can tell a client where it stands: a compacted topic, one
        record per worker and model. A model with nothing waiting or running is reported once."""
        if self.inference is None:
            return
        now, at = self.inference.clock(), time.time()
        for model_id, line in self.inference.lines.items():
            waiting, running, rate = line.report(now, MAX_REPORTED)
            self.metrics.observe_queue(model_id, line.schedule.waiting_by_tenant())
            if not waiting and not running:
                if model_id not in self._reported:
                    continue
                self._reported.discard(model_id)
            else:
                self._reported.add(model_id)
            total = max(len(waiting), len(line.schedule))
            report = QueueReport(self.worker_id, model_id, at, rate, waiting, running, total)
            value = report.to_bytes()
            while len(value) > MAX_QUEUE_RECORD_BYTES and report.waiting:  # long ids: list fewer, count all
                report = dataclasses.replace(report, waiting=report.waiting[: len(report.waiting) // 2])
                value = report.to_bytes()
            await self.send(self._topics.queue, report.key, value)

    # -- answering ------------------------------------------------------------------------

    async def answer(self, stream: faust.StreamT) -> None:
        """One lane's agent (interactive or batch): read batches, answer each new request (or group
        of identical ones) concurrently; the lane's read-ahead is bounded (:meth:`regulate_read_ahead`).

        Each lane has its own agent, so a burst of one (a batch flood being read) is processed in
        turns with the other instead of ahead of it.
        """
        self._start_answering()
        # Batches overlap: a slow answer holds neither the next batch nor the commits of
        # the answers before it; the ledger commits each partition's answered prefix. A batch
        # is what the lane's queue holds now (streams/intake.py): nothing waits for company.
        # The stream itself is not iterated: no Faust acks (the worker commits these topics
        # itself, from its ledger), no per-event turn of the loop.
        batches: LaneBatches[EventT] = LaneBatches(channel_queue(stream), self._config.max_batch, self._current)
        async for batch in batches:
            await self.catch_up_generation()
            await self._start(batch)

    def _current(self, event: EventT) -> bool:
        """Whether a lane's event is of the consumer's current generation, read while the flow
        runs: Faust's stream dropped the others (fetched before a rebalance, they are read again)."""
        app: Any = self._app
        return bool(app.flow_control.is_active()) and event.message.generation_id == app.consumer_generation_id

    def _start_answering(self) -> None:
        """What every lane's agent needs, made by the first to run (no await: agents cannot race)."""
        if self.inference is not None:
            return
        asyncio.get_running_loop().set_exception_handler(self.on_loop_error)
        self._http = new_session()
        self.inference = Inference(
            self._settings, self._http, self.metrics,
            TableCache(self.cache, self._kafka.partitions, self.write_cache_entry),
        )
        self.inference.watch()  # which endpoint has which model: known before the first request
        self._background.start("cancels", lambda: follow_cancels(
            self._kafka, self.codec, self.on_cancel, self._dead_letter_cancel, f"{self.worker_id}-cancels"))

    async def _start(self, batch: list[tuple[EventT, float]]) -> None:
        """Answer the new requests of a batch (events with the wall-clock time each was read)."""
        batched = time.time()
        fresh = []
        fetched: dict[int, float] = {}
        for event, at in batch:
            message = event.message
            # Faust sets generation_id on every consumed message; its type allows None.
            verdict = self.ledger.deliver(message.tp, message.offset, message.generation_id)  # type: ignore[arg-type]
            if verdict is Verdict.NEW:
                fresh.append(event)
                fetched[id(event)] = at
            else:
                self.metrics.redeliveries.labels(verdict=verdict.value).inc()
        if not fresh:
            return
        self.metrics.batch_size.observe(len(fresh))
        decoded = [self.decode_now(event) for event in fresh]  # no task per request: most decode
        if undecodable := [(event, exc) for event, exc in zip(fresh, decoded) if isinstance(exc, SchemaError)]:
            await asyncio.gather(*(self.undecodable(event, exc) for event, exc in undecodable))
        for group in share_groups((e, r if isinstance(r, InferenceRequest) else None) for e, r in zip(fresh, decoded)):
            # Not started if revoked meanwhile (its next owner reads it again) or stopping.
            group = [(e, r) for e, r in group
                     if not self._stopping.is_set() and self.ledger.start(e.message.tp, e.message.offset)]
            if not group:
                continue
            answering = Answering([e for e, _ in group], fetched=fetched[id(group[0][0])], batched=batched)
            for e in answering.events:
                self._held[e.message.topic] = self._held.get(e.message.topic, 0) + 1
            task = asyncio.ensure_future(self.run(group, answering))
            self._running[task] = answering
            task.add_done_callback(self._finished)
        self.regulate_read_ahead()

    def decode_now(self, event: EventT) -> InferenceRequest | SchemaError:
        """The request in ``event``, or why it cannot be read (:meth:`undecodable` dead-letters it)."""
        try:
            # A tombstone (None) is refused by the codec with a SchemaError, and dead-lettered below.
            return decode_request(self.codec, event.message.value)  # type: ignore[arg-type]
        except SchemaError as exc:
            return exc

    async def undecodable(self, event: EventT, exc: SchemaError) -> None:
        """Dead-letter a record that is no request; then it counts as answered."""
        log.warning("dead-lettering undecodable record %s/%s: %s", event.message.partition, event.message.offset, exc)
        await self.dead_letter(event, str(exc), "undecodable")
        self.ledger.answered(event.message.tp, event.message.offset)

    async def run(self, group: Group, answering: Answering[EventT]) -> None:
        """Answer a group, whatever it takes: a failure is logged, counted, shown on /health and
        the group answered again (at last with an error response), never dropped."""
        assert self.inference is not None
        done: set[int] = set()
        failures = 0
        while True:
            try:
                await self.handle(group, done, answering.calls, answering)
                return
            except Exception as exc:
                failures += 1
                request = group[0][1]
                self.metrics.task_failures.inc()
                self.health.failed(request.id, exc)
                log.exception("answering %s failed (%d times); answering it again", request.id, failures)
                if failures > len(RETRY_PAUSE_S):  # answer with the error instead, until that works
                    reason = f"internal error: {exc!r}"
                    group = [(e, dataclasses.replace(r, stream=False)) for e, r in group]
                    await self.answer_with(group, self.inference.failed(request, reason), done)
                    return
                await asyncio.sleep(RETRY_PAUSE_S[failures - 1])

    async def handle(self, group: Group, done: set[int], calling: Callable[[], None] | None = None,
                     answering: Answering[EventT] | None = None) -> None:
        """Answer the first request of a group; identical others get the same answer.

        Each request counts as answered (``done``, the ledger) once its records are written, so
        answering the group again after a failure skips those already out.

        Its records carry its trace context (nexus/tracing.py); with spans on, the answer is a
        ``process`` span holding the wait for dispatch and the model call.
        """
        event, request = group[0]
        trace = tracing.record_trace(event.message.headers, request.id)
        if not self.tracing.enabled:
            return await self._handle(group, done, calling, trace, answering=answering)
        message = event.message
        spans = self.tracing.answering(trace, request, message.topic, message.partition, message.offset,
                                       self._config.app_id)

        def dispatched() -> None:
            spans.dispatched()
            if calling is not None:
                calling()

        try:
            await self._handle(group, done, dispatched, spans.context, spans, answering)
        except BaseException as exc:
            spans.end(exc)
            raise
        spans.end()

    async def _handle(self, group: Group, done: set[int], calling: Callable[[], None] | None,
                      trace: tracing.TraceContext, spans: tracing.AnswerSpans | None = None,
                      answering: Answering[EventT] | None = None) -> None:
        assert self.inference is not None
        event, request = group[0]
        sink = None
        if request.stream:
            sink = KafkaTokenSink(lambda k, v, h: self.send(self._topics.tokens, k, v, h), self.codec, request,
                                  trace.kafka_headers())
        reasons = [self.cancels.reason(r) for _, r in group]
        if all(reasons):  # cancelled before it started: no model call at all
            answer = self.inference.cancelled(request, reasons[0] or "")
        else:
            answer = await self._call(group, sink, calling)
        answered = time.time()
        if spans is not None:
            spans.answered(answer.response, self._systems.get(answer.response.endpoint or "", tracing.DEFAULT_SYSTEM))
        if sink is not None:
            await sink.close()  # every chunk is acknowledged before the response goes out
        for i, (other_event, other) in enumerate(group):
            if other_event.message.offset in done:
                continue
            stages = None
            if answering is not None:  # the request record's timestamp: its append (LogAppendTime topics)
                stages = answering.stages(other_event.message.timestamp or None, answered)
            if i == 0:
                await self.publish(answer, other_event, other, trace, stages)
            else:
                self.metrics.shared.labels(model=request.model_id).inc()
                response = dataclasses.replace(
                    answer.response, id=other.id, reply_to=other.reply_to, key_name=other.key_name
                )
                await self.publish(Answer(response, answer.dead_letter_reason), other_event, other, stages=stages)
            done.add(other_event.message.offset)
            self.ledger.answered(other_event.message.tp, other_event.message.offset)

    async def _call(self, group: Group, sink: KafkaTokenSink | None, calling: Callable[[], None] | None) -> Answer:
        """The answer of the group's first request, from a call a cancel of every request of the
        group can stop (:meth:`on_cancel`): dropped if it waits its turn, aborted if it runs (closing
        the backend's stream stops its generation).

        The call runs in this answer's own task, not one of its own (a task per request costs):
        :meth:`on_cancel` cancels the task while it is in the call, and the cancellation is taken
        back here, unless the task is being stopped too (revoked, stopping)."""
        assert self.inference is not None
        request = group[0][1]
        task = asyncio.current_task()
        assert task is not None
        call = _Call(task, [r for _, r in group])
        for r in call.requests:
            self._calls[r.id] = call
        try:
            return await self.inference.answer(request, sink, calling)
        except asyncio.CancelledError:
            if not call.cancelled or task.cancelling() > 1:
                raise  # this answer is being stopped (revoked, stopping), not the request cancelled
            task.uncancel()
            reason = self.cancels.reason(request) or "cancelled"
            return self.inference.cancelled(request, reason, sink.text if sink is not None else "")
        finally:
            for r in call.requests:
                self._calls.pop(r.id, None)

    def on_cancel(self, cancel: InferenceCancel) -> None:
        """A cancel was read: remember it (the request may come later), and stop the request's call
        if every request sharing it is cancelled."""
        self.cancels.add(cancel, time.monotonic())
        call = self._calls.get(cancel.id)
        if call is None or call.cancelled:
            return
        if all(self.cancels.reason(r) for r in call.requests):
            log.info("request %s cancelled by its sender: stopping its call", cancel.id)
            call.cancelled = True
            call.task.cancel()

    async def _dead_letter_cancel(self, record: Any, reason: str) -> None:
        record_headers = [
            (headers.ERROR, reason.encode()),
            (headers.ERROR_KIND, b"undecodable"),
            (headers.SOURCE, f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        self.metrics.dead_letters.labels(kind="undecodable").inc()
        try:
            await until_sent(self._topics.dead_letters.get_topic_name(), lambda: self.send(
                self._topics.dead_letters, record.key, record.value, record_headers))
        except Undeliverable as exc:  # a cancel is no request: nothing waits on it
            log.error("an undecodable cancel record (%s/%s/%s) was dropped: %s",
                      record.topic, record.partition, record.offset, exc)

    async def answer_with(self, group: Group, answer: Answer, done: set[int]) -> None:
        """Publish ``answer`` (an error) for every request of ``group`` not answered yet, retrying
        each until its records are written."""
        pause = RETRY_PAUSE_S[0]
        for event, request in group:
            while event.message.offset not in done:
                try:
                    response = dataclasses.replace(
                        answer.response, id=request.id, reply_to=request.reply_to, key_name=request.key_name
                    )
                    await self.publish(Answer(response, answer.dead_letter_reason), event, request)
                except Exception as exc:
                    self.metrics.task_failures.inc()
                    self.health.failed(request.id, exc)
                    log.exception("answering %s with an error failed; trying again", request.id)
                    await asyncio.sleep(pause)
                    continue
                done.add(event.message.offset)
                self.ledger.answered(event.message.tp, event.message.offset)

    def _finished(self, task: asyncio.Task[None]) -> None:
        """A done callback, not a ``finally``: a task cancelled before it ran never enters its body."""
        answering = self._running.pop(task, None)
        if answering is not None:
            for e in answering.events:
                self._held[e.message.topic] -= 1
            self.regulate_read_ahead()

    def regulate_read_ahead(self) -> None:
        """Pause a lane's partitions while this worker holds ``worker.max_in_flight`` of its
        requests (queued or running), resume them below three quarters of it.

        Each lane is bounded by itself: a batch backlog read ahead never keeps an interactive
        request from being read, and a paused lane is read again, in order, where it stopped.
        """
        bound = self._config.max_in_flight
        consumer = self._app.consumer
        for lane, held in self._held.items():
            if held >= bound and lane not in self._paused:
                self._paused.add(lane)
                log.info("holding %d requests of %s: pausing it until some are answered", held, lane)
            elif held < bound * 3 // 4 and lane in self._paused and lane not in self._resuming:
                self._resuming.add(lane)
                asyncio.ensure_future(self._resume(lane))
        if self._paused:  # again after each batch: a rebalance may have assigned more of a paused lane
            consumer.pause_partitions([tp for tp in consumer.assignment() if tp.topic in self._paused])

    async def _resume(self, lane: str) -> None:
        """Read a paused lane again from where its run stopped.

        Faust drops the records of a partition paused while it hands out a fetched batch (they are
        not in its active partitions any more), and the fetch position is already past them: each
        partition is sought back to the first offset not delivered, or they would be read only after
        a restart. Offsets delivered twice are told apart by the ledger.
        """
        consumer = self._app.consumer
        try:
            for tp in [tp for tp in consumer.assignment() if tp.topic == lane]:
                offset = self.ledger.read_up_to(tp)
                if offset is not None:
                    await consumer.seek(tp, offset)
            if self._held.get(lane, 0) < self._config.max_in_flight:
                self._paused.discard(lane)
                consumer.resume_partitions([tp for tp in consumer.assignment() if tp.topic == lane])
        except Exception:
            log.exception("resuming %s failed; trying again at the next answer", lane)
        finally:
            self._resuming.discard(lane)

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A task failed with no one awaiting it: count it and show it on /health, then log it as asyncio would."""
        if isinstance(context.get("exception"), ProducerFenced):
            # Exactly once: a partition moved to another worker, whose transactional producer fenced
            # this one's; aiokafka fails the fenced producer's pending futures, which no one awaits.
            log.info("a transactional producer of this worker was fenced by the partition's new owner")
            return
        self.metrics.task_failures.inc()
        task = context.get("task") or context.get("future")
        self.health.failed(getattr(task, "get_name", lambda: "event loop")(),
                           context.get("exception") or context["message"])
        loop.default_exception_handler(context)

    # -- the response cache ---------------------------------------------------------------

    def sweep_cache(self) -> None:
        """The cache timer: delete the expired entries (and those over the bound), tombstoned."""
        self.cache.sweep()

    async def write_cache_entry(self, partition: int, key: bytes, value: bytes) -> None:
        """A cache entry onto its changelog partition (its memory copy is written already), not
        waited for: the answer's response goes out now, and an entry lost (Kafka refused it,
        too large) costs a later miss, not an answer. The broker being away is aiokafka's to retry."""
        topic = self._cache_table.changelog_topic_name
        try:
            ack: Any = await self._app.producer.send(topic, key, value, partition, None, None)  # a future
        except (ProducerSendError, KafkaError) as exc:  # refused before it left: too large
            log.warning("an answer is cached in this worker's memory only, not on %s: %s", topic, exc)
            return
        ack.add_done_callback(functools.partial(_unwritten, topic))

    def _owned_cache_partitions(self) -> set[int]:
        """The cache partitions this worker owns (actively): it writes their tombstones."""
        topic = self._cache_table.changelog_topic_name
        return {tp.partition for tp in self._app.assignor.assigned_actives() if tp.topic == topic}

    # -- ownership and commits ------------------------------------------------------------

    def requests_of(self, tps: Iterable[TP]) -> set[TP]:
        """The partitions of ``tps`` that hold requests (of either lane)."""
        return {tp for tp in tps if tp.topic in self._kafka.request_topics}

    async def commit(self, offsets: dict[TP, int] | None = None) -> None:
        """Commit every owned partition up to its lowest unanswered request (or ``offsets``)."""
        async with self._commit_gate:
            offsets = self.ledger.committable() if offsets is None else offsets
            if not offsets and not self.exactly_once:
                return
            try:
                self.ledger.committed(await self._outbox.commit(offsets))
            except Exception as exc:  # the next commit covers them; nothing is lost meanwhile
                log.warning("committing %s failed: %r", offsets, exc)

    async def catch_up_generation(self) -> None:
        """Follow a new consumer generation (from its assignment signal, or the first batch of it).

        A newly owned partition's run starts at its committed offset (or log start), asked of the
        broker: not at what Faust happens to deliver first (it may resume fetching before it seeks).
        """
        app = self._app
        if app.consumer_generation_id == self.ledger.generation:
            return
        async with self._generation_gate:
            pause = 0.5
            while (generation := app.consumer_generation_id) != self.ledger.generation:
                assigned = self.requests_of(app.consumer.assignment())
                try:
                    starts = await self._broker.start_of_run({tp for tp in assigned if not self.ledger.knows(tp)})
                except Exception as exc:  # deliveries wait meanwhile: none is dropped
                    log.warning("could not read the committed offsets (%r); retrying in %.1fs", exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 5.0)
                    continue
                if generation != app.consumer_generation_id:
                    continue  # rebalanced again meanwhile
                log.info("generation %s: answering %s", generation,
                         ", ".join(f"{tp.topic}/{tp.partition}@{starts.get(tp, '-')}" for tp in sorted(assigned))
                         or "no partition")
                self.ledger.assign(assigned, generation, starts)
                self._outbox.forget(assigned)

    async def fill_holes(self) -> None:
        """Offsets the consumer skipped (a hole the commit cannot pass) are read again, unless the
        broker shows there is no record there. A hole gets one commit interval to fill by itself."""
        holes = self.ledger.holes()
        seen = self._seen_holes
        for tp in [tp for tp in seen if tp not in holes]:
            del seen[tp]
        for tp, (start, end) in holes.items():
            if seen.get(tp) != (start, end):
                seen[tp] = (start, end)
                continue
            try:
                first = await self._broker.first_record(TopicPartition(tp.topic, tp.partition), start, end)
            except Exception as exc:
                log.warning("could not look into the hole %s/%s %d-%d: %r", tp.topic, tp.partition, start, end, exc)
                continue
            if first is None:
                log.info("no record in %s/%s %d-%d: nothing to answer there", tp.topic, tp.partition, start, end)
                self.ledger.no_records(tp, start, end)
            else:
                log.warning("offsets %d-%d of %s/%s were skipped by the consumer: reading them again",
                            start, end - 1, tp.topic, tp.partition)
                self.metrics.rereads.inc()
                await self._app.consumer.seek(TopicPartition(tp.topic, tp.partition), start)
            del seen[tp]

    async def commit_and_fill_holes(self) -> None:
        """The commit timer (which also resumes a lane whose resumption failed before)."""
        await self.commit()
        await self.fill_holes()
        self.regulate_read_ahead()

    async def cancel_waiting(self, partitions: set[TP] | None = None) -> None:
        """Cancel the answers (of ``partitions``) that have not called a model yet; the ledger
        forgets them, so the commit stops below them and their partition's owner reads them again."""
        in_partitions = None if partitions is None else (lambda e: e.message.tp in partitions)
        tasks = waiting(self._running.items(), in_partitions)
        events = [e for task in tasks for e in self._running[task].events]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for event in events:
            self.ledger.drop(event.message.tp, event.message.offset)

    async def on_revoked(self, sender: Any, revoked: Any, **_: Any) -> None:
        """Drop the revoked partitions' requests that called no model yet; commit what is answered
        before leaving them. Calls already running go on: if the partition comes back (it usually
        does), its redelivered requests wait for them instead of calling a model again."""
        partitions = self.requests_of(revoked)
        await self.cancel_waiting(partitions)
        await self.commit(self.ledger.revoke(partitions))

    async def on_assigned(self, sender: Any, assigned: Any, **_: Any) -> None:
        await self.catch_up_generation()
        self.regulate_read_ahead()

    async def drain(self) -> None:
        """Before leaving the group: start nothing new, let running answers finish for up to
        ``worker.stop_grace_s``, then commit everything answered."""
        grace = self._config.stop_grace_s
        self._stopping.set()
        await self.cancel_waiting()
        if self._running:
            log.info("stopping: waiting up to %.0fs for %d running answers", grace, len(self._running))
            _, late = await asyncio.wait(set(self._running), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("stopping: %d answers still running after %.0fs were cancelled; "
                            "the partitions' next owner answers them", len(late), grace)
                await asyncio.gather(*late, return_exceptions=True)
        await self.commit()
        await self._background.aclose()
        if self.inference is not None:
            await self.inference.aclose()
        if self._http is not None:
            await self._http.close()
        await self._broker.close()

    # -- what the pages and metrics show --------------------------------------------------

    async def measure_lag(self) -> None:
        """The consumer-lag gauge, per requests partition; a failure is logged, never raised."""
        for lane, topic in zip(("interactive", "batch"), self._kafka.request_topics):
            try:
                lag = await consumer_lag(self._kafka, self._config.app_id, topic)
            except Exception as exc:  # metrics must never take the worker down
                log.warning("could not measure consumer lag of %s: %r", topic, exc)
                return
            for partition, records in lag.items():
                self.metrics.consumer_lag.labels(lane=lane, partition=str(partition)).set(records)

    def health_report(self) -> tuple[bool, dict[str, object]]:
        """(healthy, the body of ``/health``): failures of the last minute, and the ledger's view."""
        return self.health.report(
            generation=self.ledger.generation,
            running=len(self._running),
            late_deliveries=self.ledger.late_deliveries,
            partitions={f"{tp.topic}/{tp.partition}": state for tp, state in self.ledger.describe().items()},
            # Models some endpoint lacks: {model: {endpoint: the models it has (None: unknown)}}.
            # Not unhealthy: the worker answers them with model_not_found (or on other endpoints).
            missing_models=self.inference.missing() if self.inference is not None else {},
        )

    def models(self) -> dict[str, list[dict[str, object]]]:
        """Every endpoint's live state (``/models``); empty until the requests agent runs."""
        return self.inference.snapshot() if self.inference is not None else {}


def _unwritten(topic: str, ack: asyncio.Future[Any]) -> None:
    """A cache entry's acknowledgement came: say so if Kafka did not take it."""
    if not ack.cancelled() and ack.exception() is not None:
        log.warning("a cache entry was not written to %s: %r", topic, ack.exception())
