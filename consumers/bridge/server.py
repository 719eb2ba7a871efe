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

The protocol is parsed in :mod:`consumers.bridge.frames`; this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import json
import logging
import weakref
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from nexus.access import AccessPolicy, Forbidden, Unauthenticated
from nexus.kafka.clients import client_options
from nexus.settings import ApiKey, KafkaSettings, Settings
from nexus.kafka.readers import TopicMissingError, known_partitions
from nexus.kafka.topics import KafkaUnavailableError, ensure_topics
from producers.client import RequestProducer, SubmitError
from schemas.validation import RejectedRequest, request_from_json
from schemas import Codec, InferenceRequest, SchemaError, decode_response, decode_token

from consumers.bridge.delivery import CatchUp, Outbox, OutboxClosed, RecordKey
from consumers.bridge.owners import SessionOwners
from consumers.bridge.frames import (
    FrameError,
    Submit,
    Subscribe,
    Target,
    Unsubscribe,
    accepted_frame,
    error_frame,
    parse_client_frame,
    replayed_frame,
    result_frame,
    subscribed_frame,
    token_frame,
    unsubscribed_frame,
)
from consumers.bridge.subscriptions import SubscriptionIndex, TooManySubscriptions

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
# The query parameter a browser puts its token in (browsers cannot set headers on a websocket).
TOKEN_PARAM = "token"


class BridgeStartError(RuntimeError):
    """The bridge could not start: Kafka or the listening port is unavailable."""


class HistoryError(RuntimeError):
    """A ``since`` replay could not be read from Kafka."""


class BridgeClient:
    """One websocket connection: its outbox, its replay state and its background tasks."""

    def __init__(self, number: int, ws: ServerConnection, max_queue: int, key: ApiKey | None = None) -> None:
        self.number = number
        self.ws = ws
        self.key = key  # the API key it authenticated with; None when access is open
        self.outbox = Outbox(max_queue)
        self.catchup = CatchUp()
        self.tasks: set[asyncio.Task[None]] = set()
        self.submits = asyncio.Semaphore(MAX_SUBMITS_IN_FLIGHT)
        self.closing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        who = "" if self.key is None else f" key {self.key.name}"
        return f"<client {self.number} {self.ws.remote_address}{who}>"


class Bridge:
    """Serves ``settings.bridge.path`` on ``settings.bridge.port``; ``start`` then ``stop``."""

    def __init__(self, settings: Settings, codec: Codec | None = None) -> None:
        self._settings = settings
        self._codec = codec or Codec.from_directory()
        self._known_models = frozenset(settings.model_ids)
        self._access = AccessPolicy(settings.access)
        # The key each accepted handshake authenticated with, until its handler takes it.
        self._handshake_keys: weakref.WeakKeyDictionary[ServerConnection, ApiKey] = weakref.WeakKeyDictionary()
        self._owners = SessionOwners()
        self._index: SubscriptionIndex[BridgeClient] = SubscriptionIndex()
        self._clients: set[BridgeClient] = set()
        self._numbers = itertools.count(1)
        # Next offset the live reader will route, per partition: the cutoff of a replay.
        self._positions: dict[TopicPartition, int] = {}
        self._replays = asyncio.Semaphore(MAX_REPLAYS)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: RequestProducer | None = None
        self._server: Server | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None, "bridge not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def reader(self) -> asyncio.Task[None]:
        assert self._reader is not None, "bridge not started"
        return self._reader

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
        self._consumer = AIOKafkaConsumer(
            **client_options(kafka), group_id=None, enable_auto_commit=False,
            isolation_level=kafka.isolation_level,
        )
        try:
            await self._consumer.start()
            tps = [
                TopicPartition(topic, p)
                for topic in (kafka.responses_topic, kafka.tokens_topic)
                for p in await _partitions(self._consumer, topic)
            ]
            self._consumer.assign(tps)
            await self._consumer.seek_to_end(*tps)
            for tp in tps:
                self._positions[tp] = await self._consumer.position(tp)
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
        self._reader = asyncio.create_task(self._read_live(), name="bridge-live-reader")
        log.warning(
            "bridge listening on ws://%s:%d%s (%d partitions, from the end)",
            bridge.host, self.port, bridge.path, len(self._positions),
        )

    async def stop(self) -> None:
        """Close every connection (1001), then the Kafka clients; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    # -- Kafka -> clients ------------------------------------------------------------------

    async def _read_live(self) -> None:
        """Route every new record; all routing is synchronous, so positions are exact cutoffs."""
        assert self._consumer is not None
        responses = self._settings.kafka.responses_topic
        while True:
            batches = await self._consumer.getmany(timeout_ms=1000)
            # Chunks first: the worker writes a request's chunks before its result, and one
            # fetch holds both, but in no set order of partitions; a client must get the
            # chunks before the result that ends them.
            for tp, records in sorted(batches.items(), key=lambda item: item[0].topic == responses):
                for record in records:
                    self._route(record)
                if records:
                    self._positions[tp] = records[-1].offset + 1

    def _route(self, record: ConsumerRecord) -> None:
        selected = self._decode(record, self._live_results, self._live_tokens)
        if selected is None:
            return
        clients, frame = selected
        key = (record.topic, record.partition, record.offset)
        for client in clients:
            self._deliver_live(client, key, frame)

    def _live_results(self, session_id: str, request_id: str, owner: str | None) -> list[BridgeClient]:
        if self._access.enabled:
            self._owners.saw(session_id, owner)
        return self._visible(self._index.for_result(session_id, request_id), owner)

    def _live_tokens(self, session_id: str, request_id: str, owner: str | None) -> list[BridgeClient]:
        return self._visible(self._index.for_token(session_id, request_id), owner)

    def _visible(self, clients: set[BridgeClient], owner: str | None) -> list[BridgeClient]:
        """Only the clients whose key may see a record of ``owner``: a key sees its own records only."""
        return [c for c in clients if self._access.may_see(c.key, owner)]

    def _decode(
        self,
        record: ConsumerRecord,
        results: Callable[[str, str, str | None], Any],
        tokens: Callable[[str, str, str | None], Any],
    ) -> tuple[Any, str] | None:
        """Decode ``record``; ask ``results``/``tokens`` who wants it; build its frame only then."""
        try:
            if record.topic == self._settings.kafka.responses_topic:
                response = decode_response(self._codec, record.value)
                wanted = results(response.context.session_id, response.id, response.key_name)
                return (wanted, result_frame(response)) if wanted else None
            token = decode_token(self._codec, record.value)
            wanted = tokens(token.session_id, token.id, token.key_name)
            return (wanted, token_frame(token)) if wanted else None
        except SchemaError as exc:
            log.warning(
                "skipping undecodable record %s/%d/%d: %s", record.topic, record.partition, record.offset, exc
            )
            return None

    def _deliver_live(self, client: BridgeClient, key: RecordKey, frame: str) -> None:
        if client.catchup.live(key, frame):
            if not client.outbox.push(frame):
                self._too_slow(client)
        elif client.catchup.held > client.outbox.limit:
            self._too_slow(client)

    def _reply(self, client: BridgeClient, frame: str) -> None:
        if not client.outbox.push(frame):
            self._too_slow(client)

    def _too_slow(self, client: BridgeClient) -> None:
        self._close(
            client,
            CloseCode.TRY_AGAIN_LATER,
            f"too slow: {client.outbox.limit} frames unsent; reconnect and subscribe with since",
        )

    def _close(self, client: BridgeClient, code: int, reason: str) -> None:
        """Stop routing to ``client`` at once and close it in the background."""
        if client.closing is not None:
            return
        log.warning("closing %r: %d %s", client, code, reason)
        self._index.drop(client)
        client.outbox.close()
        client.closing = asyncio.create_task(self._close_connection(client, code, reason))

    async def _close_connection(self, client: BridgeClient, code: int, reason: str) -> None:
        # The close frame queues behind what the socket still holds; a client that
        # never reads never answers it, so the TCP connection is dropped after a while.
        try:
            await asyncio.wait_for(client.ws.close(code, reason), CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            client.ws.transport.abort()

    # -- clients -> bridge -----------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/health":
            body = {"status": "ok", "clients": len(self._clients), "subscribed": len(self._index)}
            return connection.respond(200, json.dumps(body) + "\n")
        if path != self._settings.bridge.path:
            return connection.respond(404, f"no websocket here; connect to {self._settings.bridge.path}\n")
        try:
            key = self._authenticate(request)
        except Unauthenticated as exc:
            response = connection.respond(401, exc.reason + "\n")
            response.headers["WWW-Authenticate"] = exc.challenge
            return response
        if key is not None:
            self._handshake_keys[connection] = key
        return None

    def _authenticate(self, request: Request) -> ApiKey | None:
        """The key of the handshake: ``Authorization: Bearer`` (programs) or ``?token=`` (browsers)."""
        header = request.headers.get("Authorization")
        if header is not None:
            return self._access.authenticate_header(header)
        query = parse_qs(urlsplit(request.path).query)
        tokens = query.get(TOKEN_PARAM)
        return self._access.authenticate(tokens[0] if tokens else None)

    async def _handle(self, ws: ServerConnection) -> None:
        key = self._handshake_keys.pop(ws, None)
        client = BridgeClient(next(self._numbers), ws, self._settings.bridge.max_queue, key)
        self._clients.add(client)
        writer = asyncio.create_task(self._write(client))
        try:
            async for message in ws:
                if client.closing is not None:
                    break
                await self._on_message(client, message)
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            self._index.drop(client)
            client.outbox.close()
            for task in list(client.tasks):
                task.cancel()
            await asyncio.gather(writer, *client.tasks, return_exceptions=True)
            if client.closing is not None:
                await client.closing

    async def _write(self, client: BridgeClient) -> None:
        try:
            while True:
                await client.ws.send(await client.outbox.get())
        except (OutboxClosed, ConnectionClosed):
            return

    async def _on_message(self, client: BridgeClient, message: str | bytes) -> None:
        try:
            frame = parse_client_frame(message)
        except FrameError as exc:
            self._reply(client, error_frame(exc.reason))
            return
        if isinstance(frame, Subscribe):
            self._subscribe(client, frame)
        elif isinstance(frame, Unsubscribe):
            self._index.remove(client, frame.target)
            self._reply(client, unsubscribed_frame(frame.target))
        else:
            await self._submit(client, frame)

    def _subscribe(self, client: BridgeClient, frame: Subscribe) -> None:
        session_id = frame.target.session_id
        if session_id is not None and not self._access.may_subscribe(client.key, self._owners.of(session_id)):
            assert client.key is not None
            reason = f"session {session_id!r} belongs to another API key than {client.key.name!r}"
            self._reply(client, error_frame(reason, status=403, **frame.target.to_json()))
            return
        try:
            self._index.add(client, frame.target)
        except TooManySubscriptions as exc:
            self._reply(client, error_frame(str(exc), **frame.target.to_json()))
            return
        self._reply(client, subscribed_frame(frame.target, frame.since_ms))
        if frame.since_ms is not None:
            # Registered and cut at the same instant (no await in between): live
            # delivery starts exactly where the replay stops.
            cutoff = dict(self._positions)
            client.catchup.begin()
            self._spawn(client, self._replay(client, frame.target, frame.since_ms, cutoff))

    async def _submit(self, client: BridgeClient, frame: Submit) -> None:
        raw_id = frame.body.get("id")
        try:
            request = request_from_json(frame.body, self._known_models)
        except RejectedRequest as exc:
            detail = {"id": raw_id} if isinstance(raw_id, str) else {}
            self._reply(client, error_frame(exc.message, status=exc.status, **detail))
            return
        try:
            self._access.authorize(client.key, request.model_id)
        except Forbidden as exc:
            self._reply(client, error_frame(exc.reason, status=403, id=request.id))
            return
        request = dataclasses.replace(request, key_name=AccessPolicy.owner(client.key))
        if self._access.enabled:
            self._owners.saw(request.context.session_id, request.key_name)
        try:
            # Before producing: the answer cannot overtake the subscription.
            self._index.add(client, Target(request_ids=(request.id,)))
        except TooManySubscriptions as exc:
            self._reply(client, error_frame(str(exc), status=429, id=request.id))
            return
        await client.submits.acquire()  # backpressure: stop reading this client's frames
        self._spawn(client, self._produce(client, request))

    async def _produce(self, client: BridgeClient, request: InferenceRequest) -> None:
        assert self._producer is not None
        try:
            await self._producer.submit(request)
        except SubmitError as exc:
            # It may still have been written: the subscription stays, a result may come.
            self._reply(client, error_frame(str(exc), status=503, id=request.id))
        except SchemaError as exc:
            self._reply(client, error_frame(str(exc), status=400, id=request.id))
        else:
            self._reply(client, accepted_frame(request.id, request.context.session_id))
        finally:
            client.submits.release()

    def _spawn(self, client: BridgeClient, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        client.tasks.add(task)
        task.add_done_callback(client.tasks.discard)

    # -- history ---------------------------------------------------------------------------

    async def _replay(
        self, client: BridgeClient, target: Target, since_ms: int, cutoff: dict[TopicPartition, int]
    ) -> None:
        """Send ``target``'s records from ``since_ms`` up to ``cutoff``, then release held live ones."""

        def select(record: ConsumerRecord) -> str | None:
            def wanted(is_token: bool) -> Callable[[str, str, str | None], bool]:
                return lambda session_id, request_id, owner: (
                    target.matches(session_id, request_id, is_token) and self._access.may_see(client.key, owner)
                )

            selected = self._decode(record, wanted(False), wanted(True))
            return None if selected is None else selected[1]

        try:
            async with self._replays:
                history = await read_history(self._settings.kafka, cutoff, since_ms, select)
            count = 0
            for key, frame in history:
                if client.catchup.history(key):
                    if not await client.outbox.push_paced(frame):
                        return
                    count += 1
            self._reply(client, replayed_frame(target, since_ms, count))
        except HistoryError as exc:
            self._reply(client, error_frame(str(exc), **target.to_json(), since=since_ms))
        finally:
            client.catchup.end()
            while (held := client.catchup.next_held()) is not None:
                if not await client.outbox.push_paced(held):
                    break


async def read_history(
    kafka: KafkaSettings,
    cutoff: dict[TopicPartition, int],
    since_ms: int,
    select: Callable[[ConsumerRecord], str | None],
) -> list[tuple[RecordKey, str]]:
    """Frames of the records with timestamp >= ``since_ms`` and offset < ``cutoff``, in time order.

    Within a partition Kafka's order is kept; partitions are merged by record
    timestamp. Raises :class:`HistoryError` when Kafka does not deliver in time
    or the history is longer than :data:`MAX_REPLAY_RECORDS`.
    """
    consumer = AIOKafkaConsumer(
        **client_options(kafka), group_id=None, enable_auto_commit=False, isolation_level=kafka.isolation_level
    )
    try:
        await consumer.start()
        tps = list(cutoff)
        consumer.assign(tps)
        starts = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        pending: dict[TopicPartition, int] = {}
        for tp in tps:
            start = starts.get(tp)
            if start is not None and start.offset < cutoff[tp]:
                consumer.seek(tp, start.offset)
                pending[tp] = cutoff[tp]
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
                    if record.offset >= cutoff[tp]:
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
                if await consumer.position(tp) >= cutoff[tp]:
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


async def _partitions(consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 30.0) -> list[int]:
    try:
        return await known_partitions(consumer, topic, timeout_s)
    except TopicMissingError as exc:
        raise BridgeStartError(str(exc)) from None


async def serve_bridge(settings: Settings) -> None:
    """Run a bridge until cancelled; exits with the live reader's error if it fails."""
    bridge = Bridge(settings)
    await bridge.start()
    try:
        await bridge.reader
    finally:
        await bridge.stop()
