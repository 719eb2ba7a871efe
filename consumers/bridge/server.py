"""The websocket bridge: results and streamed tokens pushed from Kafka to browsers and services.

Each bridge reads every partition of ``inference.responses`` and
``inference.tokens`` from the end, with no consumer group: it is a fan-out, so
any number of bridges run side by side without sharing state. A record goes
only to the clients subscribed to its session or request
(:class:`~consumers.bridge.subscriptions.SubscriptionIndex`), through each client's
bounded :class:`~consumers.bridge.delivery.Outbox`; a client that does not read is
closed with 1013 instead of slowing the others. Subscriptions with ``since``
replay history from Kafka (``offsets_for_times``) up to the live reader's
position at subscribe time, then hand over to live delivery with no gap and
no duplicate (:class:`~consumers.bridge.delivery.CatchUp`).

Every decision (routing, access, ordering, what to answer) is in
:class:`~consumers.bridge.core.BridgeCore`; this module only moves bytes between
websockets, Kafka and the core. The live reader runs under :class:`nexus.tasks.Background`:
if it dies it is logged, started again from the end, and shown on ``/health``. So does the
reader of the workers' queue reports (:class:`producers.queue.QueueReader`, task ``queue``),
which feeds the ``queued`` frames.
"""


from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from nexus import heap, tracing
from nexus.access import AccessPolicy, Unauthenticated
from nexus.kafka.readers import TopicMissingError, read_from_end, read_from_time, reader
from nexus.kafka.topics import KafkaUnavailableError, ensure_topics
from nexus.settings import ApiKey, KafkaSettings, Settings
from nexus.tasks import Background
from producers.client import RequestProducer, RequestTooLarge, SubmitError
from producers.admission import Admission
from producers.queue import QueueReader
from schemas import Codec, InferenceRequest, SchemaError
from schemas.queue_state import QueueReport

from consumers.bridge.core import (
    Action,
    BridgeCore,
    CancelRequest,
    Close,
    KafkaRecord,
    Partition,
    Peer,
    Produce,
    Replay,
)
from consumers.bridge.delivery import OutboxClosed, RecordKey
from consumers.bridge.errors import BridgeStartError, HistoryError
from consumers.bridge.metrics import CONTENT_TYPE_LATEST, BridgeMetrics

__all__ = ["Bridge", "BridgeStartError", "HistoryError", "read_history", "serve_bridge"]

log = logging.getLogger(__name__)

# Submits of one client waiting for Kafka's ack; more stop reading that client's frames.
MAX_SUBMITS_IN_FLIGHT = 64
# Concurrent ``since`` replays per bridge; each opens its own Kafka consumer.
MAX_REPLAYS = 4
# Records one replay may return; a longer history needs a later ``since``.
MAX_REPLAY_RECORDS = 100_000
# How long a replay may wait for Kafka before giving up with an error frame.
REPLAY_TIMEOUT_S = 60.0
# How long a closing handshake may take before the TCP connection is dropped.
CLOSE_TIMEOUT_S = 10.0
# How long the live reader waits for the result topics to exist.
TOPICS_TIMEOUT_S = 30.0
# The live reader's name under /health's "tasks".
LIVE_READER = "bridge-live-reader"

class BridgeClient:
    """The I/O half of one connection: its socket and its background tasks (the rest is its Peer)."""

    def __init__(self, peer: Peer, ws: ServerConnection) -> None:
        self.peer = peer
        self.ws = ws
        self.tasks: set[asyncio.Task[None]] = set()
        self.submits = asyncio.Semaphore(MAX_SUBMITS_IN_FLIGHT)
        self.closing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return repr(self.peer)


class Bridge:
    """Serves ``settings.bridge.path`` on ``settings.bridge.port``; ``start`` then ``stop``."""

    def __init__(self, settings: Settings, codec: Codec | None = None, background: Background | None = None) -> None:
        self._settings = settings
        kafka = settings.kafka
        self._codec = codec or Codec.from_directory()
        self._background = background or Background()
        self._queue = QueueReader(settings, self._background, client_id="nexus-bridge-queue",
                                  on_report=self._on_queue_report)
        self._admission = Admission(settings.tenant, self._queue.board)
        self._core = BridgeCore(
            self._codec,
            responses_topic=kafka.responses_topic,
            tokens_topic=kafka.tokens_topic,
            access=AccessPolicy(settings.access),
            known_models=settings.model_ids,
            max_queue=settings.bridge.max_queue,
            queue=self._queue.board,
        )
        # The key each accepted handshake authenticated with, until its handler takes it.
        self._handshake_keys: weakref.WeakKeyDictionary[ServerConnection, ApiKey] = weakref.WeakKeyDictionary()
        self._clients: dict[Peer, BridgeClient] = {}
        self._replays = asyncio.Semaphore(MAX_REPLAYS)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: RequestProducer | None = None
        self._server: Server | None = None
        self._metrics = BridgeMetrics(self._core.status)  # GET /metrics

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None, "bridge not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def core(self) -> BridgeCore:
        return self._core

    @property
    def background(self) -> Background:
        """The supervised live reader, as ``/health`` reports it."""
        return self._background

    async def start(self) -> None:
        """Position the live reader at the end of every partition, then accept connections.

        Listening only after the positions are known means a client that could
        connect sees every record produced after it connected.
        """
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        kafka = self._settings.kafka
        try:
            await ensure_topics(kafka)
            producer = RequestProducer(kafka, self._codec)
            await producer.start()
            self._producer = producer
        except (KafkaUnavailableError, SubmitError) as exc:
            raise BridgeStartError(str(exc)) from None
        try:
            await self._open_reader()
        except TopicMissingError as exc:
            raise BridgeStartError(str(exc)) from None
        except KafkaError as exc:
            raise BridgeStartError(f"cannot read the result topics at {kafka.bootstrap}: {exc}") from None
        bridge = self._settings.bridge
        try:
            self._server = await serve(
                self._handle,
                bridge.host,
                bridge.port,
                process_request=self._process_request,
                # Frames are small JSON; per-connection deflate costs more than it saves.
                compression=None,
                # A submit carries a POST /infer body.
                max_size=self._settings.gateway.max_body_bytes + 1024,
                close_timeout=CLOSE_TIMEOUT_S,
            )
        except OSError as exc:
            raise BridgeStartError(f"cannot listen on {bridge.host}:{bridge.port}: {exc}") from None
        self._background.start(LIVE_READER, self._read_live)
        await self._queue.start()
        log.info(
            "bridge listening on ws://%s:%d%s (%d partitions, from the end)",
            bridge.host, self.port, bridge.path, len(self._core.positions),
        )

    async def wait_closed(self) -> None:
        """Return when the server is closed by :meth:`stop` (so: run until cancelled)."""
        assert self._server is not None, "bridge not started"
        await self._server.wait_closed()

    async def stop(self) -> None:
        """Close every connection (1001), then the Kafka clients; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        await self._queue.stop()
        await self._background.aclose()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    # -- Kafka -> clients ------------------------------------------------------------------

    async def _open_reader(self) -> AIOKafkaConsumer:
        """A new live reader; the core routes from where it is placed.

        The first one starts at the end of every partition. One that replaces a failed
        reader starts where that one stopped, so records written in between still reach
        their subscribers.
        """
        kafka = self._settings.kafka
        consumer = reader(kafka, "nexus-bridge")
        resume = self._core.positions
        try:
            await consumer.start()
            positions = await read_from_end(consumer, [kafka.responses_topic, kafka.tokens_topic], TOPICS_TIMEOUT_S)
            for tp, end in positions.items():
                at = resume.get((tp.topic, tp.partition))
                if at is not None and at < end:
                    consumer.seek(tp, at)
                    positions[tp] = at
        except BaseException:
            await consumer.stop()
            raise
        self._core.start_at(positions)
        self._consumer = consumer
        return consumer

    async def _read_live(self) -> None:
        """Route every new record; all routing is synchronous, so positions are exact cutoffs.

        Run by :class:`~nexus.tasks.Background`: when it fails, its consumer is closed and
        the next run opens a new one where this one stopped.
        """
        consumer = self._consumer
        if consumer is None:
            consumer = await self._open_reader()
            log.warning("bridge live reader started again where it stopped, on %d partitions", len(self._core.positions))
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                self._perform(self._core.route_batch(batches))
        except Exception:
            self._consumer = None
            try:
                await consumer.stop()
            except Exception as exc:  # the failure being reported matters more than this one
                log.warning("closing the failed live reader: %s", exc)
            raise

    def _on_queue_report(self, report: QueueReport) -> None:
        """A worker's schedule changed: ``queued`` frames for the clients that want them."""
        self._perform(self._core.route_queue(report, time.time()))

    def _perform(self, actions: list[Action]) -> None:
        """Carry out the core's actions that need no waiting: closes and replays."""
        for action in actions:
            client = self._clients.get(action.peer)
            if client is None:
                continue  # it disconnected meanwhile
            if isinstance(action, Close):
                if client.closing is None:
                    client.closing = asyncio.create_task(self._close_connection(client, action.code, action.reason))
            elif isinstance(action, Replay):
                self._spawn(client, self._replay(client, action))
            else:
                raise TypeError(f"{action!r} must be awaited by the frame handler")

    async def _close_connection(self, client: BridgeClient, code: int, reason: str) -> None:
        # The close frame queues behind what the socket still holds; a client that
        # never reads never answers it, so the TCP connection is dropped after a while.
        try:
            await asyncio.wait_for(client.ws.close(code, reason), CLOSE_TIMEOUT_S)
        except TimeoutError:
            client.ws.transport.abort()

    # -- clients -> bridge -----------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/health":
            healthy = self._background.healthy
            body = {
                "status": "ok" if healthy else "unavailable",
                **self._core.status(),
                "tasks": self._background.report(),
            }
            return connection.respond(200 if healthy else 503, json.dumps(body) + "\n")
        if path == "/metrics":
            return self._metrics_page(connection, request)
        if path != self._settings.bridge.path:
            return connection.respond(404, f"no websocket here; connect to {self._settings.bridge.path}\n")
        try:
            key = self._core.authenticate(request.path, request.headers.get("Authorization"))
        except Unauthenticated as exc:
            response = connection.respond(401, exc.reason + "\n")
            response.headers["WWW-Authenticate"] = exc.challenge
            return response
        if key is not None:
            self._handshake_keys[connection] = key
        return None

    def _metrics_page(self, connection: ServerConnection, request: Request) -> Response:
        """Prometheus text; with API keys configured it needs one, as the gateway's and worker's do."""
        try:
            self._core.authenticate(request.path, request.headers.get("Authorization"))
        except Unauthenticated as exc:
            refused = connection.respond(401, exc.reason + "\n")
            refused.headers["WWW-Authenticate"] = exc.challenge
            return refused
        response = connection.respond(200, self._metrics.page())
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _handle(self, ws: ServerConnection) -> None:
        key = self._handshake_keys.pop(ws, None)
        peer = self._core.connect(key, str(ws.remote_address))
        client = self._clients[peer] = BridgeClient(peer, ws)
        writer = asyncio.create_task(self._write(client))
        try:
            async for message in ws:
                if peer.closing:
                    break
                await self._on_message(client, message)
        except ConnectionClosed:
            pass
        finally:
            self._core.disconnect(peer)
            for task in list(client.tasks):
                task.cancel()
            await asyncio.gather(writer, *client.tasks, return_exceptions=True)
            if client.closing is not None:
                await client.closing
            del self._clients[peer]

    async def _write(self, client: BridgeClient) -> None:
        try:
            while True:
                await client.ws.send(await client.peer.outbox.get())
        except (OutboxClosed, ConnectionClosed):
            return

    async def _on_message(self, client: BridgeClient, message: str | bytes) -> None:
        for action in self._core.receive(client.peer, message):
            if isinstance(action, Produce):
                await client.submits.acquire()  # backpressure: stop reading this client's frames
                self._spawn(client, self._produce(client, action.request))
            elif isinstance(action, CancelRequest):
                await client.submits.acquire()
                self._spawn(client, self._cancel(client, action))
            else:
                self._perform([action])

    async def _produce(self, client: BridgeClient, request: InferenceRequest) -> None:
        assert self._producer is not None
        peer = client.peer
        try:
            rejection = self._admission.admit(request)  # the tenant's limits, as at the gateway
            if rejection is not None:
                self._perform(self._core.submit_failed(
                    peer, request, rejection.message, rejection.status, written=False,
                    limit=rejection.limit, retry_after_s=rejection.retry_after_s))
                return
            await self._producer.submit(request)
        except RequestTooLarge as exc:
            # Refused before producing: nothing was written, nothing will answer.
            self._admission.refund(request)
            self._perform(self._core.submit_failed(peer, request, str(exc), 413, written=False))
        except SubmitError as exc:
            # It may still have been written: the subscription stays, a result may come.
            self._admission.refund(request)
            self._perform(self._core.submit_failed(peer, request, str(exc), 503))
        except SchemaError as exc:
            self._admission.refund(request)
            self._perform(self._core.submit_failed(peer, request, str(exc), 400, written=False))
        else:
            self._perform(self._core.submitted(peer, request))
        finally:
            client.submits.release()

    async def _cancel(self, client: BridgeClient, action: CancelRequest) -> None:
        assert self._producer is not None
        try:
            await self._producer.cancel(action.request_id, reason="cancelled by the client (bridge cancel frame)",
                                        key_name=action.key_name)
        except SubmitError as exc:
            self._perform(self._core.cancel_failed(client.peer, action.request_id, str(exc)))
        else:
            self._perform(self._core.cancel_sent(client.peer, action.request_id))
        finally:
            client.submits.release()

    def _spawn(self, client: BridgeClient, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        client.tasks.add(task)
        task.add_done_callback(client.tasks.discard)

    # -- history ---------------------------------------------------------------------------

    async def _replay(self, client: BridgeClient, replay: Replay) -> None:
        """Send the replay's records up to its cutoff, then release the live ones held meanwhile."""
        peer, target, since_ms = replay.peer, replay.target, replay.since_ms
        try:
            async with self._replays:
                select = self._core.history_filter(peer, target)
                history = await read_history(self._settings.kafka, replay.cutoff, since_ms, select)
            count = 0
            for key, frame in history:
                if self._core.wants_history(peer, key):
                    if not await peer.outbox.push_paced(frame):
                        return
                    count += 1
            self._perform(self._core.replayed(peer, target, since_ms, count))
        except HistoryError as exc:
            self._perform(self._core.replay_failed(peer, target, since_ms, str(exc)))
        finally:
            self._core.replay_ended(peer)
            while (held := self._core.next_held(peer)) is not None:
                if not await peer.outbox.push_paced(held):
                    break


async def read_history(
    kafka: KafkaSettings,
    cutoff: Mapping[Partition, int],
    since_ms: int,
    select: Callable[[KafkaRecord], str | None],
) -> list[tuple[RecordKey, str]]:
    """Frames of the records with timestamp >= ``since_ms`` and offset < ``cutoff``, in time order.

    Within a partition Kafka's order is kept; partitions are merged by record
    timestamp. Raises :class:`HistoryError` when Kafka does not deliver in time
    or the history is longer than :data:`MAX_REPLAY_RECORDS`.
    """
    consumer = reader(kafka, "nexus-bridge-history")
    ends = {TopicPartition(topic, partition): offset for (topic, partition), offset in cutoff.items()}
    try:
        await consumer.start()
        starts = await read_from_time(consumer, list(ends), since_ms)
        pending = {tp: ends[tp] for tp, start in starts.items() if start is not None and start < ends[tp]}
        found: dict[TopicPartition, list[tuple[int, RecordKey, str]]] = {tp: [] for tp in pending}
        total = 0
        deadline = asyncio.get_running_loop().time() + REPLAY_TIMEOUT_S
        while pending:
            if asyncio.get_running_loop().time() > deadline:
                raise HistoryError(
                    f"replay since {since_ms} timed out after {REPLAY_TIMEOUT_S:.0f}s reading Kafka "
                    f"at {kafka.bootstrap}; live delivery continues, resubscribe to retry"
                )
            batches = await consumer.getmany(*pending, timeout_ms=500)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    frame = select(record)
                    if frame is not None:
                        found[tp].append((record.timestamp, (tp.topic, tp.partition, record.offset), frame))
                        total += 1
                if total > MAX_REPLAY_RECORDS:
                    raise HistoryError(
                        f"more than {MAX_REPLAY_RECORDS} records since {since_ms}; "
                        "subscribe with a later since"
                    )
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    del pending[tp]
        merged = heapq.merge(*found.values(), key=lambda item: item[0])
        return [(key, frame) for _, key, frame in merged]
    except KafkaError as exc:
        raise HistoryError(
            f"cannot read history since {since_ms} from Kafka at {kafka.bootstrap}: {exc}; "
            "live delivery continues, resubscribe to retry"
        ) from None
    finally:
        await consumer.stop()


async def serve_bridge(settings: Settings) -> None:
    """Run a bridge until cancelled; a failing live reader is restarted, not fatal."""
    tracing.setup("nexus-bridge")  # its submits' produce spans, with an OTLP endpoint configured
    bridge = Bridge(settings)
    await bridge.start()
    heap.settle()  # what the started bridge holds is out of every later collection (nexus/heap.py)
    try:
        await bridge.wait_closed()
    finally:
        await bridge.stop()
