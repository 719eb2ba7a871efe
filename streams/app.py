"""The worker: a Faust app whose agent answers ``inference.requests`` in batches.

Delivery is at-least-once. Requests are read in batches (``noack_take``) and
answered concurrently, up to ``worker.max_in_flight`` at once. The requests topic
is read without Faust's acks: the worker's ledger (streams/ledger.py) knows which
requests of each owned partition are answered (their response, token chunks and
dead letter acknowledged by Kafka), and the worker commits each partition up to
its lowest unanswered request, itself (streams/outbox.py), on a timer, when the
partition is revoked and when it stops. A redelivered request (after a rebalance
or a rewind) that is running or answered is not answered again. A worker killed
mid-run leaves those offsets uncommitted; its successor answers them again
(duplicates, never losses). With ``kafka.processing_guarantee = "exactly_once"`` the
answers are held until the commit covers their requests, then written in the
request partition's Kafka transaction, which commits them with the offsets
(streams/outbox.py): ``read_committed`` readers see each answer once.

The response cache is a Faust table. Tables cannot be written from inside a
``take()`` batch (there is no current event to tie the changelog to), so the
batch sends each new entry to ``<app_id>-cache-updates``, keyed by model like
the requests (so co-partitioned with them), and a second agent writes the table
one event at a time. The entry lands on the changelog partition of the
requests partition it serves, so the worker that owns a model's partition owns
its cache entries, and a restarted worker recovers them from the changelog.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import ProducerFenced, TopicAlreadyExistsError
from faust.types import EventT
from faust.types.auth import CredentialsT
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nexus.access import AccessPolicy, Unauthenticated
from nexus.kafka.clients import client_options, ssl_context
from nexus.settings import KafkaSettings, Settings
from nexus.kafka.topics import partitions_of, replication_config
from schemas import (
    Codec,
    InferenceRequest,
    InferenceToken,
    SchemaError,
    decode_request,
    encode_response,
    encode_token,
)

from streams.answering import cache
from streams.health import WorkerHealth
from streams.answering.inference import Answer, Inference
from streams.commits.ledger import RequestLedger, Verdict
from streams.metrics import WorkerMetrics
from streams.commits.offsets import PartitionOffsets
from streams.backends.ollama import new_session
from streams.commits.outbox import AtOnce, InCommittedPrefix, Outbox, until_sent
from streams.answering.prompt import PromptTemplate

log = logging.getLogger(__name__)

# Headers of a dead-letter record; its value and key are the original's.
DLQ_REASON = "nexus-error"
DLQ_KIND = "nexus-error-kind"
DLQ_SOURCE = "nexus-source"
# On responses and token chunks of a request that named a waiting gateway, so that
# gateway can skip everyone else's records without decoding them.
REPLY_TO = "nexus-reply-to"
TOKEN_FLUSH_S = 0.025
# Faust's commit timer and count under exactly once: off, the worker commits (streams/outbox.py).
NEVER_S = 10.0**9
NEVER_N = 2**62
LAG_INTERVAL_S = 10.0
STATE_INTERVAL_S = 2.0
RETRY_PAUSE_S = (0.5, 2.0, 5.0)  # before answering again a request whose answering failed


class KafkaTokenSink:
    """Publishes a streamed answer's chunks, batched over ``TOKEN_FLUSH_S``, in order."""

    def __init__(self, send: Any, codec: Codec, request: InferenceRequest) -> None:
        self._send = send
        self._codec = codec
        self._request = request
        self._buffer: list[str] = []
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: list[asyncio.Future[None]] = []
        self._acks: list[Any] = []
        self.sent = 0
        self.started = False

    async def chunk(self, text: str, *, flush: bool = False) -> None:
        """Add a chunk; with ``flush``, publish it now rather than batched with the next ones."""
        self.started = True
        self._buffer.append(text)
        if flush:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            await self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(TOKEN_FLUSH_S, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        self._flushes.append(asyncio.ensure_future(self._flush()))

    async def _flush(self) -> None:
        async with self._lock:  # one flush at a time keeps seq order on the wire
            if not self._buffer:
                return
            token = InferenceToken(
                id=self._request.id,
                model_id=self._request.model_id,
                session_id=self._request.context.session_id,
                seq=self.sent,
                text="".join(self._buffer),
                reply_to=self._request.reply_to,
                key_name=self._request.key_name,
            )
            self._buffer.clear()
            self.sent += 1
            headers = [(REPLY_TO, token.reply_to.encode())] if token.reply_to else None
            self._acks.append(
                await self._send(token.session_id.encode(), encode_token(self._codec, token), headers)
            )

    async def close(self) -> None:
        """Flush what is left and wait until Kafka acknowledged every chunk."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await asyncio.gather(*self._flushes)
        await self._flush()
        await asyncio.gather(*self._acks)


class TableCache:
    """The response cache: reads the Faust table, writes through the updates topic."""

    def __init__(self, table: faust.Table, send_update: Any) -> None:
        self._table = table
        self._send_update = send_update

    def get(self, key: bytes) -> cache.CacheEntry | None:
        raw = self._table.get(key)
        return cache.CacheEntry.from_bytes(raw) if raw else None

    async def put(self, request: InferenceRequest, key: bytes, entry: cache.CacheEntry) -> None:
        value = json.dumps({"key": key.decode(), "entry": entry.to_bytes().decode()}).encode()
        await self._send_update(request.model_id.encode(), value)


class RewindingApp(faust.App):
    """A Faust app whose consumer rereads never-committed partitions of ``rewind_topics`` from
    their start whenever Faust seeks back to the committed offsets.

    Why: on a rebalance Faust drops records it already fetched (flow stopped, generation
    changed mid-batch) and seeks every partition back to its committed offset, but aiokafka's
    ``seek_to_committed`` only seeks to offsets > 0: a partition with nothing committed yet kept
    its advanced position and the dropped requests were never read again by that worker
    (faust-streaming/faust#471, #629; docs/performance.md, Scale-out). Rereading from the start
    is what ``consumer_auto_offset_reset="earliest"`` promises; at worst it answers twice.
    """

    rewind_topics: frozenset[str] = frozenset()
    # Run first when the app stops, while the consumer is still in its group (streams/app.py: drain).
    before_stop: Any = None

    async def on_stop(self) -> None:
        if self.before_stop is not None:
            try:
                await self.before_stop()
            except Exception:
                log.exception("draining the worker before it stops failed")
        await super().on_stop()

    def _new_consumer(self) -> Any:
        consumer = super()._new_consumer()
        seek_to_committed = consumer.seek_to_committed

        async def seek_to_committed_or_start() -> Any:
            committed = await seek_to_committed()
            for tp, offset in committed.items():
                if tp.topic in self.rewind_topics and not (offset and offset > 0):
                    log.info("nothing committed on %s/%s: rereading it from the start", tp.topic, tp.partition)
                    await consumer.seek(tp, 0)  # past the log start: reset to "earliest"
            return committed

        consumer.seek_to_committed = seek_to_committed_or_start
        return consumer


def create_app(settings: Settings, data_dir: Path | None = None) -> faust.App:
    """Build the Faust app for ``settings``; run it with :func:`run_worker`."""
    kafka = settings.kafka
    worker = settings.worker
    data_dir = (data_dir or Path(".cache") / "faust" / worker.app_id).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    exactly_once = kafka.processing_guarantee == "exactly_once"
    commits = (  # under exactly once the worker commits itself, between answers (streams/outbox.py)
        {"broker_commit_interval": NEVER_S, "broker_commit_every": NEVER_N}
        if exactly_once
        else {"broker_commit_interval": worker.commit_interval_s}
    )
    app = RewindingApp(
        worker.app_id,
        broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap.split(",")],
        broker_credentials=faust_credentials(kafka),
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        producer_acks=-1,
        producer_linger=0.0,  # linger costs latency; records queued while a produce is in flight batch anyway
        broker_session_timeout=kafka.session_timeout_ms / 1000,
        broker_heartbeat_interval=min(3.0, kafka.session_timeout_ms / 3000),
        **commits,
        processing_guarantee=kafka.processing_guarantee,
        consumer_auto_offset_reset="earliest",
        web_port=worker.web_port,
        web_host="0.0.0.0",
        datadir=str(data_dir),
        table_cleanup_interval=60.0,
    )
    app.rewind_topics = frozenset({kafka.requests_topic, cache_updates_topic(worker.app_id)})
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    # No Faust acks: the worker commits this topic itself, from its ledger (see the module doc).
    requests = app.topic(kafka.requests_topic, acks=False, **raw)
    responses = app.topic(kafka.responses_topic, **raw)
    tokens = app.topic(kafka.tokens_topic, **raw)
    dead_letters = app.topic(kafka.dlq_topic, **raw)
    cache_updates = app.topic(
        cache_updates_topic(worker.app_id), partitions=kafka.partitions, internal=True, **raw
    )
    endpoint_state = app.topic(kafka.state_topic, **raw)
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    cache_table = app.Table("cache", default=None, partitions=kafka.partitions, key_type=bytes, value_type=bytes,
                            extra_topic_configs=replication_config(kafka))
    codec = Codec.from_directory()
    metrics = WorkerMetrics()
    access = AccessPolicy(settings.access)
    PromptTemplate(worker.prompt_template)  # a bad template fails the start, not each request
    state: dict[str, Any] = {}

    async def send(topic: faust.TopicT, key: bytes | None, value: bytes, headers: Any = None) -> Any:
        """Queue one record outside any transaction; return the future of its acknowledgement.

        Token chunks, cache updates and endpoint state go this way under exactly once too: chunks
        must stream before the commit, and the other two are idempotent.
        """
        return await app.producer.send(topic.get_topic_name(), key, value, None, None, headers)

    async def produce(topic: faust.TopicT, key: bytes | None, value: bytes) -> None:
        """Send one record and wait until Kafka acknowledged it, retrying until it does."""
        await until_sent(topic.get_topic_name(), lambda: send(topic, key, value))

    async def dead_letter(outbox: Outbox, event: EventT, reason: str, kind: str) -> None:
        message = event.message
        metrics.dead_letters.labels(kind=kind).inc()
        headers = [
            (DLQ_REASON, reason.encode()),
            (DLQ_KIND, kind.encode()),
            (DLQ_SOURCE, f"{message.topic}/{message.partition}/{message.offset}".encode()),
        ]
        await outbox.write(event, dead_letters, message.key, message.value, headers)

    async def publish(outbox: Outbox, answer: Answer, event: EventT, request: InferenceRequest) -> None:
        reply_to = answer.response.reply_to
        headers = [(REPLY_TO, reply_to.encode())] if reply_to else None
        await outbox.write(
            event, responses, request.context.session_id.encode(), encode_response(codec, answer.response), headers
        )
        if answer.dead_letter_reason is not None:
            await dead_letter(outbox, event, answer.dead_letter_reason, "failed")

    async def handle(
        group: list[tuple[EventT, InferenceRequest]], inference: Inference, outbox: Outbox, done: set[int],
        calling: Any = None,
    ) -> None:
        """Answer the first request of a group; identical others get the same answer.

        Each request counts as answered (``done``, the ledger) once its records are written, so
        answering the group again after a failure skips those already out.
        """
        event, request = group[0]
        sink = KafkaTokenSink(lambda k, v, h: send(tokens, k, v, h), codec, request) if request.stream else None
        answer = await inference.answer(request, sink, calling)
        if sink is not None:
            await sink.close()  # every chunk is acknowledged before the response goes out
        for i, (other_event, other) in enumerate(group):
            if other_event.message.offset in done:
                continue
            if i == 0:
                await publish(outbox, answer, other_event, other)
            else:
                metrics.shared.labels(model=request.model_id).inc()
                response = dataclasses.replace(
                    answer.response, id=other.id, reply_to=other.reply_to, key_name=other.key_name
                )
                await publish(outbox, Answer(response, answer.dead_letter_reason), other_event, other)
            done.add(other_event.message.offset)
            ledger.answered(other_event.message.tp, other_event.message.offset)

    async def decode(outbox: Outbox, event: EventT) -> InferenceRequest | None:
        try:
            return decode_request(codec, event.message.value)
        except SchemaError as exc:
            log.warning("dead-lettering undecodable record %s/%s: %s",
                        event.message.partition, event.message.offset, exc)
            await dead_letter(outbox, event, str(exc), "undecodable")
            ledger.answered(event.message.tp, event.message.offset)
            return None

    ledger: RequestLedger[TP] = RequestLedger()
    health = WorkerHealth()
    outbox: Outbox = InCommittedPrefix(app) if exactly_once else AtOnce(app, send)
    # Each running answer's task, and whether it called a model yet (until then it can be
    # cancelled and read again by its partition's next owner at no cost).
    running: dict[asyncio.Task[None], tuple[list[EventT], list[bool]]] = {}
    commit_gate = asyncio.Lock()
    stopping = asyncio.Event()

    def requests_of(tps: Any) -> set[TP]:
        return {tp for tp in tps if tp.topic == kafka.requests_topic}

    async def commit(offsets: dict[TP, int] | None = None) -> None:
        """Commit every owned partition up to its lowest unanswered request (or ``offsets``)."""
        async with commit_gate:
            offsets = ledger.committable() if offsets is None else offsets
            if not offsets and not exactly_once:
                return
            try:
                ledger.committed(await outbox.commit(offsets))
            except Exception as exc:  # the next commit covers them; nothing is lost meanwhile
                log.warning("committing %s failed: %r", offsets, exc)

    broker = PartitionOffsets(kafka, worker.app_id)
    generation_gate = asyncio.Lock()
    seen_holes: dict[TP, tuple[int, int]] = {}

    async def catch_up_generation() -> None:
        """Follow a new consumer generation (from its assignment signal, or the first batch of it).

        A newly owned partition's run starts at its committed offset (or log start), asked of the
        broker: not at what Faust happens to deliver first (it may resume fetching before it seeks).
        """
        if app.consumer_generation_id == ledger.generation:
            return
        async with generation_gate:
            pause = 0.5
            while (generation := app.consumer_generation_id) != ledger.generation:
                assigned = requests_of(app.consumer.assignment())
                try:
                    starts = await broker.start_of_run({tp for tp in assigned if not ledger.knows(tp)})
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
                ledger.assign(assigned, generation, starts)
                outbox.forget(assigned)

    async def fill_holes() -> None:
        """Offsets the consumer skipped (a hole the commit cannot pass) are read again, unless the
        broker shows there is no record there. A hole gets one commit interval to fill by itself."""
        holes = ledger.holes()
        for tp in [tp for tp in seen_holes if tp not in holes]:
            del seen_holes[tp]
        for tp, (start, end) in holes.items():
            if seen_holes.get(tp) != (start, end):
                seen_holes[tp] = (start, end)
                continue
            try:
                first = await broker.first_record(TopicPartition(tp.topic, tp.partition), start, end)
            except Exception as exc:
                log.warning("could not look into the hole %s/%s %d-%d: %r", tp.topic, tp.partition, start, end, exc)
                continue
            if first is None:
                log.info("no record in %s/%s %d-%d: nothing to answer there", tp.topic, tp.partition, start, end)
                ledger.no_records(tp, start, end)
            else:
                log.warning("offsets %d-%d of %s/%s were skipped by the consumer: reading them again",
                            start, end - 1, tp.topic, tp.partition)
                metrics.rereads.inc()
                await app.consumer.seek(TopicPartition(tp.topic, tp.partition), start)
            del seen_holes[tp]

    async def cancel_waiting(partitions: set[TP] | None = None) -> None:
        """Cancel the answers (of ``partitions``) that have not called a model yet; the ledger
        forgets them, so the commit stops below them and their partition's owner reads them again."""
        waiting = [(task, events) for task, (events, calling) in running.items()
                   if not calling[0] and (partitions is None or any(e.message.tp in partitions for e in events))]
        for task, _ in waiting:
            task.cancel()
        await asyncio.gather(*(task for task, _ in waiting), return_exceptions=True)
        for _, events in waiting:
            for event in events:
                ledger.drop(event.message.tp, event.message.offset)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: Any, **_: Any) -> None:
        """Drop the revoked partitions' requests that called no model yet; commit what is answered
        before leaving them. Calls already running go on: if the partition comes back (it usually
        does), its redelivered requests wait for them instead of calling a model again."""
        partitions = requests_of(revoked)
        await cancel_waiting(partitions)
        await commit(ledger.revoke(partitions))

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, assigned: Any, **_: Any) -> None:
        await catch_up_generation()

    async def run(group: list[tuple[EventT, InferenceRequest]], inference: Inference, calling: list[bool]) -> None:
        """Answer a group, whatever it takes: a failure is logged, counted, shown on /health and
        the group answered again (at last with an error response), never dropped."""
        done: set[int] = set()
        failures = 0

        def call_starts() -> None:
            calling[0] = True

        while True:
            try:
                await handle(group, inference, outbox, done, call_starts)
                return
            except Exception as exc:
                failures += 1
                request = group[0][1]
                metrics.task_failures.inc()
                health.failed(request.id, exc)
                log.exception("answering %s failed (%d times); answering it again", request.id, failures)
                if failures > len(RETRY_PAUSE_S):  # answer with the error instead, until that works
                    reason = f"internal error: {exc!r}"
                    group = [(e, dataclasses.replace(r, stream=False)) for e, r in group]
                    await answer_with(group, inference.failed(request, reason), done)
                    return
                await asyncio.sleep(RETRY_PAUSE_S[failures - 1])

    async def answer_with(group: list[tuple[EventT, InferenceRequest]], answer: Answer, done: set[int]) -> None:
        pause = RETRY_PAUSE_S[0]
        for event, request in group:
            while event.message.offset not in done:
                try:
                    response = dataclasses.replace(
                        answer.response, id=request.id, reply_to=request.reply_to, key_name=request.key_name
                    )
                    await publish(outbox, Answer(response, answer.dead_letter_reason), event, request)
                except Exception as exc:
                    metrics.task_failures.inc()
                    health.failed(request.id, exc)
                    log.exception("answering %s with an error failed; trying again", request.id)
                    await asyncio.sleep(pause)
                    continue
                done.add(event.message.offset)
                ledger.answered(event.message.tp, event.message.offset)

    in_flight = asyncio.Semaphore(worker.max_in_flight)

    def finished(task: asyncio.Task[None]) -> None:
        """A done callback, not a ``finally``: a task cancelled before it ran never enters its body."""
        running.pop(task, None)
        in_flight.release()

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A task failed with no one awaiting it: count it and show it on /health, then log it as asyncio would."""
        if isinstance(context.get("exception"), ProducerFenced):
            # Exactly once: a partition moved to another worker, whose transactional producer fenced
            # this one's; aiokafka fails the fenced producer's pending futures, which no one awaits.
            log.info("a transactional producer of this worker was fenced by the partition's new owner")
            return
        metrics.task_failures.inc()
        task = context.get("task") or context.get("future")
        health.failed(getattr(task, "get_name", lambda: "event loop")(), context.get("exception") or context["message"])
        loop.default_exception_handler(context)

    @app.agent(requests, name="nexus.infer")
    async def infer(stream: faust.StreamT) -> None:
        asyncio.get_running_loop().set_exception_handler(on_loop_error)
        async with new_session() as http:
            inference = state["inference"] = Inference(
                settings, http, metrics, TableCache(cache_table, lambda k, v: produce(cache_updates, k, v))
            )
            # Batches overlap: a slow answer holds neither the next batch nor the commits of
            # the answers before it; the ledger commits each partition's answered prefix.
            async for events in stream.noack_take(worker.max_batch, within=worker.max_wait_ms / 1000):
                await catch_up_generation()
                fresh = []
                for event in events:
                    message = event.message
                    verdict = ledger.deliver(message.tp, message.offset, message.generation_id)
                    if verdict is Verdict.NEW:
                        fresh.append(event)
                    else:
                        metrics.redeliveries.labels(verdict=verdict.value).inc()
                if not fresh:
                    continue
                metrics.batch_size.observe(len(fresh))
                decoded = await asyncio.gather(*(decode(outbox, event) for event in fresh))
                groups: dict[object, list[tuple[EventT, InferenceRequest]]] = {}
                for event, request in zip(fresh, decoded):
                    if request is None:
                        continue
                    share = cache.shareable(request) and not request.stream
                    key = cache.cache_key(request) if share else object()
                    groups.setdefault(key, []).append((event, request))
                for group in groups.values():
                    await in_flight.acquire()  # back-pressure: at most max_in_flight answers pending
                    # Not started if revoked meanwhile (its next owner reads it again) or stopping.
                    group = [(e, r) for e, r in group
                             if not stopping.is_set() and ledger.start(e.message.tp, e.message.offset)]
                    if not group:
                        in_flight.release()
                        continue
                    calling = [False]
                    task = asyncio.ensure_future(run(group, inference, calling))
                    running[task] = ([e for e, _ in group], calling)
                    task.add_done_callback(finished)

    async def drain() -> None:
        """Before leaving the group: start nothing new, let running answers finish for up to
        ``worker.stop_grace_s``, then commit everything answered."""
        stopping.set()
        await cancel_waiting()
        if running:
            log.info("stopping: waiting up to %.0fs for %d running answers", worker.stop_grace_s, len(running))
            _, late = await asyncio.wait(set(running), timeout=worker.stop_grace_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("stopping: %d answers still running after %.0fs were cancelled; "
                            "the partitions' next owner answers them", len(late), worker.stop_grace_s)
                await asyncio.gather(*late, return_exceptions=True)
        await commit()
        await broker.close()

    app.before_stop = drain

    @app.agent(cache_updates, name="nexus.cache")
    async def store_cache(stream: faust.StreamT) -> None:
        async for value in stream:  # one event at a time: table writes need their event
            update = json.loads(value)
            cache_table[update["key"].encode()] = update["entry"].encode()
            metrics.cache_entries.set(len(cache_table))

    @app.timer(worker.commit_interval_s)
    async def commit_answered() -> None:
        await commit()
        await fill_holes()

    @app.timer(STATE_INTERVAL_S)
    async def publish_endpoint_state() -> None:
        """Share the routing state so gateways can show it (GET /models): a compacted topic."""
        inference = state.get("inference")
        if inference is None:
            return
        snapshot = {"worker": worker_id, "at": time.time(), "models": inference.snapshot()}
        await send(endpoint_state, worker_id.encode(), json.dumps(snapshot).encode())

    @app.timer(LAG_INTERVAL_S)
    async def consumer_lag() -> None:
        try:
            for partition, lag in (await _consumer_lag(kafka, worker.app_id, kafka.requests_topic)).items():
                metrics.consumer_lag.labels(partition=str(partition)).set(lag)
        except Exception as exc:  # metrics must never take the worker down
            log.warning("could not measure consumer lag: %r", exc)

    def refused(web: Any, request: Any) -> Any | None:
        """401 unless the caller shows an API key, when keys are configured (docs/security.md)."""
        try:
            access.authenticate_header(request.headers.get("Authorization"))
        except Unauthenticated as exc:
            return web.json({"error": exc.reason}, status=401, headers={"WWW-Authenticate": exc.challenge})
        return None

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        if (refusal := refused(web, request)) is not None:
            return refusal
        return web.bytes(generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.page("/health")
    async def health_page(web: Any, request: Any) -> Any:
        """200 while no task failed in the last minute, else 503 with the failures."""
        healthy, body = health.report(
            generation=ledger.generation,
            running=len(running),
            late_deliveries=ledger.late_deliveries,
            partitions={f"{tp.topic}/{tp.partition}": state for tp, state in ledger.describe().items()},
        )
        return web.json(body, status=200 if healthy else 503)

    @app.page("/models")
    async def models_page(web: Any, request: Any) -> Any:
        if (refusal := refused(web, request)) is not None:
            return refusal
        inference = state.get("inference")
        return web.json({"models": inference.snapshot() if inference else {}})

    return app


async def _consumer_lag(kafka: KafkaSettings, group: str, topic: str) -> dict[int, int]:
    """End offset minus committed offset, per partition of ``topic``, for the worker group."""
    admin = AIOKafkaAdminClient(**client_options(kafka))
    consumer = AIOKafkaConsumer(**client_options(kafka), group_id=None)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        tps = [TopicPartition(topic, p) for p in await partitions_of(admin, topic)]
        ends = await consumer.end_offsets(tps)
        return {
            tp.partition: ends[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
            for tp in tps
        }
    finally:
        await consumer.stop()
        await admin.close()


def faust_credentials(kafka: KafkaSettings) -> CredentialsT | None:
    """The settings' SASL/TLS in Faust's terms; Faust gives them to its producer, consumers and admin."""
    context = ssl_context(kafka)
    if kafka.security_protocol.startswith("SASL_"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password,
            mechanism=kafka.sasl_mechanism,
            ssl_context=context,  # None: SASL_PLAINTEXT, else SASL_SSL
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def cache_updates_topic(app_id: str) -> str:
    return f"{app_id}-cache-updates"


def cache_changelog_topic(app_id: str) -> str:
    """Faust's name for the changelog of the ``cache`` table."""
    return f"{app_id}-cache-changelog"


async def _ensure_internal_topics(settings: Settings) -> None:
    """Create the cache agent's topic and the cache table's changelog before Faust starts.

    Faust declares them too, but a first start's partition assignment can run on metadata
    from before they existed ("Ignoring missing topic"). Without the updates topic the cache
    agent gets no partition until a later rebalance and no answer is cached for minutes;
    without the changelog, the rebalance that adds it comes seconds later, mid-run (seen on
    a 3-broker cluster, where a new topic reaches the brokers one by one).
    """
    kafka = settings.kafka
    app_id = settings.worker.app_id
    replication = replication_config(kafka)
    wanted = {
        cache_updates_topic(app_id): replication,
        cache_changelog_topic(app_id): {"cleanup.policy": "compact", **replication},  # as Faust makes it
    }
    admin = AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(name, kafka.partitions, kafka.replication_factor, topic_configs=configs)
               for name, configs in wanted.items() if name not in existing]
        if new:
            result = await admin.create_topics(new)
            for topic, code, *_ in result.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise RuntimeError(f"creating topic {topic!r} failed with Kafka error code {code}")
    finally:
        await admin.close()


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Run the worker in this process until SIGINT/SIGTERM."""
    from faust.worker import Worker

    from nexus.kafka.topics import ensure_topics

    asyncio.run(ensure_topics(settings.kafka))
    asyncio.run(_ensure_internal_topics(settings))
    app = create_app(settings)
    worker = Worker(app, loglevel=loglevel)
    # Faust's terminal spinner sets the root logger to DEBUG so that it spins on every
    # record: every library's debug record would be built, then dropped by the handler.
    worker.spinner = None
    worker.execute_from_commandline()
