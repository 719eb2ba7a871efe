"""The bridge's protocol and routing, with no sockets, no Kafka and no tasks: events in, actions out.

Why a core: every rule of the bridge (who gets which record, in which order, what a
broken frame is answered with, who may see or submit what, when a client is too slow)
is decided here and unit-tested in microseconds; :mod:`consumers.bridge.server` only
moves bytes between websockets, Kafka and this class.

Each connection is a :class:`Peer`. "Sending" a frame means queueing it in the peer's
bounded :class:`~consumers.bridge.delivery.Outbox`, which the shell drains into the
socket. What needs I/O is returned as actions: :class:`Close` a connection,
:class:`Produce` a submitted request, :class:`CancelRequest` a request, :class:`Replay`
history from Kafka. The shell reports back what happened (``submitted``, ``cancel_sent``,
``replayed``, ``replay_failed``...).

The workers' queue reports (:class:`schemas.queue_state.QueueReport`, read by the shell with
:class:`producers.queue.QueueReader`) come in through :meth:`BridgeCore.route_queue`: a client
subscribed to a waiting request, or to its session, gets a ``queued`` frame when its position or
estimated start changed noticeably (:func:`worth_telling`), not on every report.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from nexus.access import AccessPolicy, Forbidden
from nexus.settings import ApiKey
from nexus.tracing import trace_id_of
from producers.queue import QueueBoard, Whereabouts
from schemas import Codec, InferenceRequest, SchemaError, decode_response, decode_token
from schemas.queue_state import QueueReport
from schemas.validation import RejectedRequest, effective_tenant, request_from_json

from consumers.bridge.delivery import CatchUp, Outbox, RecordKey
from consumers.bridge.frames import (
    Cancel,
    FrameError,
    Subscribe,
    Target,
    Unsubscribe,
    accepted_frame,
    cancelling_frame,
    error_frame,
    parse_client_frame,
    queued_frame,
    replayed_frame,
    result_frame,
    subscribed_frame,
    token_frame,
    unsubscribed_frame,
)
from consumers.bridge.owners import SessionOwners
from consumers.bridge.subscriptions import SubscriptionIndex, TooManySubscriptions

__all__ = ["Action", "BridgeCore", "CancelRequest", "Close", "KafkaRecord", "Partition", "Peer", "Produce", "Replay",
           "worth_telling"]

log = logging.getLogger(__name__)

# A websocket close code: the server is overloaded, try again later (RFC 6455 registry).
TRY_AGAIN_LATER = 1013
# The query parameter a browser puts its token in (browsers cannot set headers on a websocket).
TOKEN_PARAM = "token"

Partition = tuple[str, int]  # (topic, partition)


class KafkaRecord(Protocol):
    """What the core reads of a consumed record (aiokafka's ``ConsumerRecord`` has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(eq=False)
class Peer:
    """One connection as the protocol sees it: its key, its outbox, its replay state."""

    number: int
    key: ApiKey | None  # the API key it authenticated with; None when access is open
    outbox: Outbox
    catchup: CatchUp = field(default_factory=CatchUp)
    address: str = ""  # where it connected from, for logs
    closing: bool = False  # set once: nothing more is routed to it

    def __repr__(self) -> str:
        who = "" if self.key is None else f" key {self.key.name}"
        where = f" {self.address}" if self.address else ""
        return f"<client {self.number}{where}{who}>"


@dataclass(frozen=True)
class Close:
    """Close ``peer``'s connection with ``code``; it is already out of every route."""

    peer: Peer
    code: int
    reason: str


@dataclass(frozen=True)
class Produce:
    """Write ``request`` to Kafka, then report :meth:`BridgeCore.submitted` or ``submit_failed``."""

    peer: Peer
    request: InferenceRequest


@dataclass(frozen=True)
class CancelRequest:
    """Write a cancel of ``request_id``, then report :meth:`BridgeCore.cancel_sent` or ``cancel_failed``."""

    peer: Peer
    request_id: str
    key_name: str | None  # the client's key: the worker honours only the submitting key's cancel


@dataclass(frozen=True)
class Replay:
    """Read ``target``'s records from ``since_ms`` up to ``cutoff`` (exclusive) and send them."""

    peer: Peer
    target: Target
    since_ms: int
    cutoff: dict[Partition, int]


Action = Close | Produce | CancelRequest | Replay

# A queued frame is worth sending when the position moved by this share of the last one told
# (at least 1), or the estimated start by this share (at least MIN_ETA_CHANGE_MS).
POSITION_CHANGE = 0.1
ETA_CHANGE = 0.2
MIN_ETA_CHANGE_MS = 2000


def worth_telling(told: tuple[int, int] | None, position: int, eta_ms: int) -> bool:
    """Whether a client told ``told`` (position, eta_ms) should hear of the new ones: the first
    time, a move of 10% of its position (any move near the front), or an ETA 20% (2 s) off."""
    if told is None:
        return True
    last_position, last_eta = told
    if position != last_position and abs(position - last_position) >= max(1, int(last_position * POSITION_CHANGE)):
        return True
    return abs(eta_ms - last_eta) >= max(MIN_ETA_CHANGE_MS, int(last_eta * ETA_CHANGE))
Wanted = Callable[[str, str, str | None], Any]  # (session id, request id, owner) -> who wants it


class BridgeCore:
    """The bridge's state and decisions; one per bridge, driven by its shell."""

    def __init__(
        self,
        codec: Codec,
        *,
        responses_topic: str,
        tokens_topic: str,
        access: AccessPolicy,
        known_models: Iterable[str],
        max_queue: int,
        queue: QueueBoard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._codec = codec
        self._responses = responses_topic
        self._tokens = tokens_topic
        self._access = access
        self._known_models = frozenset(known_models)
        self._max_queue = max_queue
        self._owners = SessionOwners()
        self._index: SubscriptionIndex[Peer] = SubscriptionIndex()
        self._peers: set[Peer] = set()
        self._numbers = itertools.count(1)
        # Next offset the live reader routes, per partition: the cutoff of a replay.
        self._positions: dict[Partition, int] = {}
        # The workers' schedules (the shell's queue reader fills it); what each waiting request's
        # subscribers were last told, and which requests of each report that is about.
        self._queue = queue
        self._clock = clock
        self._told: dict[str, tuple[int, int]] = {}
        self._told_by_report: dict[bytes, set[str]] = {}

    # -- connections -----------------------------------------------------------------------

    def authenticate(self, path: str, authorization: str | None) -> ApiKey | None:
        """The key of a handshake: ``Authorization: Bearer`` (programs) or ``?token=`` (browsers).

        Raises :class:`nexus.access.Unauthenticated`; ``None`` when access is open.
        """
        if authorization is not None:
            return self._access.authenticate_header(authorization)
        tokens = parse_qs(urlsplit(path).query).get(TOKEN_PARAM)
        return self._access.authenticate(tokens[0] if tokens else None)

    def connect(self, key: ApiKey | None = None, address: str = "") -> Peer:
        peer = Peer(next(self._numbers), key, Outbox(self._max_queue), address=address)
        self._peers.add(peer)
        return peer

    def disconnect(self, peer: Peer) -> None:
        """The connection ended: forget it, wake whatever waits on its outbox, route nothing more."""
        peer.closing = True
        self._peers.discard(peer)
        self._index.drop(peer)
        peer.outbox.close()

    def status(self) -> dict[str, int]:
        """The counts ``/health`` shows."""
        return {"clients": len(self._peers), "subscribed": len(self._index)}

    # -- Kafka -> clients ------------------------------------------------------------------

    def start_at(self, positions: Mapping[Partition, int]) -> None:
        """The live reader was (re)placed: it routes these offsets next."""
        self._positions = {(topic, partition): offset for (topic, partition), offset in positions.items()}

    @property
    def positions(self) -> dict[Partition, int]:
        return dict(self._positions)

    def route_batch(self, batch: Mapping[Partition, Sequence[KafkaRecord]]) -> list[Action]:
        """Route one fetch: token partitions before result partitions.

        The worker writes a request's chunks before its result, and one fetch holds
        both in no set order of partitions; a client must get the chunks before the
        result that ends them.
        """
        actions: list[Action] = []
        for _, records in sorted(batch.items(), key=lambda item: item[0][0] == self._responses):
            for record in records:
                actions += self.route(record)
        return actions

    def route(self, record: KafkaRecord) -> list[Action]:
        """Deliver one live record to the clients that want it and may see it."""
        self._positions[(record.topic, record.partition)] = record.offset + 1
        selected = self._decode(record, self._live_results, self._live_tokens)
        if selected is None:
            return []
        peers, frame = selected
        key = (record.topic, record.partition, record.offset)
        actions: list[Action] = []
        for peer in peers:
            actions += self._deliver_live(peer, key, frame)
        return actions

    def _live_results(self, session_id: str, request_id: str, owner: str | None) -> list[Peer]:
        if self._access.enabled:
            self._owners.saw(session_id, owner)
        return self._visible(self._index.for_result(session_id, request_id), owner)

    def _live_tokens(self, session_id: str, request_id: str, owner: str | None) -> list[Peer]:
        return self._visible(self._index.for_token(session_id, request_id), owner)

    def _visible(self, peers: set[Peer], owner: str | None) -> list[Peer]:
        """Only the clients whose key may see a record of ``owner``: a key sees its own records only."""
        return [p for p in peers if self._access.may_see(p.key, owner)]

    def _decode(self, record: KafkaRecord, results: Wanted, tokens: Wanted) -> tuple[Any, str] | None:
        """Decode ``record``; ask ``results``/``tokens`` who wants it; build its frame only then."""
        try:
            if record.topic == self._responses:
                response = decode_response(self._codec, record.value)  # type: ignore[arg-type]
                wanted = results(response.context.session_id, response.id, response.key_name)
                # Its trace id, for the client to find its trace (read only for a wanted one).
                return (wanted, result_frame(response, trace_id_of(getattr(record, "headers", None)))
                        ) if wanted else None
            token = decode_token(self._codec, record.value)  # type: ignore[arg-type]
            wanted = tokens(token.session_id, token.id, token.key_name)
            return (wanted, token_frame(token)) if wanted else None
        except SchemaError as exc:
            log.warning(
                "skipping undecodable record %s/%d/%d: %s", record.topic, record.partition, record.offset, exc
            )
            return None

    def _deliver_live(self, peer: Peer, key: RecordKey, frame: str) -> list[Action]:
        if peer.catchup.live(key, frame):
            return self._send(peer, frame)
        if peer.catchup.held > peer.outbox.limit:
            return self._too_slow(peer)
        return []

    # -- clients -> bridge -----------------------------------------------------------------

    def receive(self, peer: Peer, message: str | bytes) -> list[Action]:
        """One client frame; a broken one is answered with an error frame, the connection kept."""
        try:
            frame = parse_client_frame(message)
        except FrameError as exc:
            return self._send(peer, error_frame(exc.reason))
        if isinstance(frame, Subscribe):
            return self._subscribe(peer, frame)
        if isinstance(frame, Unsubscribe):
            self._index.remove(peer, frame.target)
            return self._send(peer, unsubscribed_frame(frame.target))
        if isinstance(frame, Cancel):
            return [CancelRequest(peer, frame.request_id, AccessPolicy.owner(peer.key))]
        return self._submit(peer, frame.body)

    def _subscribe(self, peer: Peer, frame: Subscribe) -> list[Action]:
        session_id = frame.target.session_id
        if session_id is not None and not self._access.may_subscribe(peer.key, self._owners.of(session_id)):
            assert peer.key is not None
            reason = f"session {session_id!r} belongs to another API key than {peer.key.name!r}"
            return self._send(peer, error_frame(reason, status=403, **frame.target.to_json()))
        try:
            self._index.add(peer, frame.target)
        except TooManySubscriptions as exc:
            return self._send(peer, error_frame(str(exc), **frame.target.to_json()))
        actions = self._send(peer, subscribed_frame(frame.target, frame.since_ms))
        actions += self._queued_now(peer, frame.target)
        if frame.since_ms is not None and not peer.closing:
            # Registered and cut at the same instant: live delivery starts exactly
            # where the replay stops.
            peer.catchup.begin()
            actions.append(Replay(peer, frame.target, frame.since_ms, dict(self._positions)))
        return actions

    def _submit(self, peer: Peer, body: dict[str, Any]) -> list[Action]:
        raw_id = body.get("id")
        try:
            request = request_from_json(body, self._known_models)
        except RejectedRequest as exc:
            detail = {"id": raw_id} if isinstance(raw_id, str) else {}
            return self._send(peer, error_frame(exc.message, status=exc.status, **detail))
        try:
            self._access.authorize(peer.key, request.model_id)
        except Forbidden as exc:
            return self._send(peer, error_frame(exc.reason, status=403, id=request.id))
        key_name = AccessPolicy.owner(peer.key)
        request = dataclasses.replace(
            request, key_name=key_name,
            tenant=effective_tenant(key_name, request.tenant, request.context.session_id))
        if self._access.enabled:
            self._owners.saw(request.context.session_id, request.key_name)
        try:
            # Before producing: the answer cannot overtake the subscription.
            self._index.add(peer, Target(request_ids=(request.id,)))
        except TooManySubscriptions as exc:
            return self._send(peer, error_frame(str(exc), status=429, id=request.id))
        return [Produce(peer, request)]

    def submitted(self, peer: Peer, request: InferenceRequest) -> list[Action]:
        """Kafka acknowledged ``request``."""
        return self._send(peer, accepted_frame(request.id, request.context.session_id))

    def submit_failed(
        self, peer: Peer, request: InferenceRequest, reason: str, status: int, *, written: bool = True,
        **detail: object,
    ) -> list[Action]:
        """Kafka refused ``request`` (503), it did not encode (400), it is too big for one record
        (413, ``written=False``) or over its tenant's limits (429 with ``limit`` and
        ``retry_after_s``, ``written=False``). The subscription stays when it may have been written
        (a request that timed out may still be answered); it goes when it certainly was not."""
        if not written:
            self._index.remove(peer, Target(request_ids=(request.id,)))
        return self._send(peer, error_frame(reason, status=status, id=request.id, **detail))

    def cancel_sent(self, peer: Peer, request_id: str) -> list[Action]:
        """Kafka acknowledged the cancel of ``request_id``."""
        return self._send(peer, cancelling_frame(request_id))

    def cancel_failed(self, peer: Peer, request_id: str, reason: str) -> list[Action]:
        return self._send(peer, error_frame(reason, status=503, id=request_id))

    # -- queue reports -> clients ----------------------------------------------------------

    def route_queue(self, report: QueueReport, now: float) -> list[Action]:
        """Tell the subscribers of each waiting request of ``report`` where it stands, when worth it.

        Subscribers of its id or of its session hear of it (not the "all" feed, which carries
        results only), if their key may see it (its tenant is the key's name when keys are on).
        """
        before = self._told_by_report.pop(report.key, set())
        listed: set[str] = set()
        actions: list[Action] = []
        for entry in report.waiting:
            where = Whereabouts(report, False, entry)
            request_id = entry["id"]
            peers = self._visible(self._index.for_token(where.session_id or "", request_id), where.tenant)
            if not peers:
                continue
            listed.add(request_id)
            state = where.to_json(now)
            position, eta_ms = state["position"], state["eta_ms"]
            if not worth_telling(self._told.get(request_id), position, eta_ms):
                continue
            self._told[request_id] = (position, eta_ms)
            frame = queued_frame(request_id, report.model, position, eta_ms)
            for peer in peers:
                actions += self._send(peer, frame)
        for request_id in before - listed:  # started, answered, or nobody listens any more
            self._told.pop(request_id, None)
        if listed:
            self._told_by_report[report.key] = listed
        return actions

    def _queued_now(self, peer: Peer, target: Target) -> list[Action]:
        """A new subscriber hears at once where its requests wait, if a report lists them."""
        if self._queue is None or target.all:
            return []
        now = self._clock()
        if target.session_id is not None:
            found = self._queue.in_session(target.session_id, now)
        else:
            found = [w for w in (self._queue.find(i, now) for i in target.request_ids) if w is not None]
        actions: list[Action] = []
        for where in found:
            if where.running or not self._access.may_see(peer.key, where.tenant):
                continue
            state = where.to_json(now)
            actions += self._send(peer, queued_frame(state["id"], state["model"], state["position"], state["eta_ms"]))
        return actions

    # -- history ---------------------------------------------------------------------------

    def history_filter(self, peer: Peer, target: Target) -> Callable[[KafkaRecord], str | None]:
        """The frame of a history record ``peer`` should get for ``target``, or ``None``."""

        def wanted(is_token: bool) -> Wanted:
            return lambda session_id, request_id, owner: (
                target.matches(session_id, request_id, is_token) and self._access.may_see(peer.key, owner)
            )

        def select(record: KafkaRecord) -> str | None:
            selected = self._decode(record, wanted(False), wanted(True))
            return None if selected is None else selected[1]

        return select

    @staticmethod
    def wants_history(peer: Peer, key: RecordKey) -> bool:
        """Whether a replayed record is sent from history (it is not held to be sent live)."""
        return peer.catchup.history(key)

    def replayed(self, peer: Peer, target: Target, since_ms: int, count: int) -> list[Action]:
        """The replay sent ``count`` records; what follows for ``target`` is live."""
        return self._send(peer, replayed_frame(target, since_ms, count))

    def replay_failed(self, peer: Peer, target: Target, since_ms: int, reason: str) -> list[Action]:
        return self._send(peer, error_frame(reason, **target.to_json(), since=since_ms))

    @staticmethod
    def replay_ended(peer: Peer) -> None:
        """A replay is over (sent, failed or cancelled); then send :meth:`next_held` until ``None``."""
        peer.catchup.end()

    @staticmethod
    def next_held(peer: Peer) -> str | None:
        """The next live frame held during replays, to send paced; ``None`` when there is none."""
        return peer.catchup.next_held()

    # -- sending ---------------------------------------------------------------------------

    def _send(self, peer: Peer, frame: str) -> list[Action]:
        """Queue ``frame``; a client whose outbox is full is too slow and is closed."""
        if peer.outbox.push(frame):
            return []
        return self._too_slow(peer)

    def _too_slow(self, peer: Peer) -> list[Action]:
        return self.close(
            peer,
            TRY_AGAIN_LATER,
            f"too slow: {peer.outbox.limit} frames unsent; reconnect and subscribe with since",
        )

    def close(self, peer: Peer, code: int, reason: str) -> list[Action]:
        """Stop routing to ``peer`` at once; the shell closes the connection. Once per peer."""
        if peer.closing:
            return []
        log.warning("closing %r: %d %s", peer, code, reason)
        peer.closing = True
        self._index.drop(peer)
        peer.outbox.close()
        return [Close(peer, code, reason)]
