"""The bridge's routing core: events in, frames queued and actions out; no sockets, no Kafka."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, UTC

import pytest

from consumers.bridge import BridgeCore, Close, Peer, Produce, Replay
from consumers.bridge.core import TRY_AGAIN_LATER, Partition
from consumers.bridge.frames import Target
from nexus.access import AccessPolicy, Unauthenticated
from nexus.settings import AccessSettings, ApiKey
from schemas import (
    Codec,
    InferenceResponse,
    InferenceToken,
    ModelContext,
    encode_response,
    encode_token,
)

CODEC = Codec.from_directory()
RESPONSES, TOKENS = "inference.responses", "inference.tokens"
ALPHA = ApiKey("alpha", hashlib.sha256(b"alpha-token").digest())
BETA = ApiKey("beta", hashlib.sha256(b"beta-token").digest(), ("mistral",))


@dataclass(frozen=True)
class Rec:
    """A consumed record as the core reads it."""

    topic: str
    partition: int
    offset: int
    value: bytes | None


class Log:
    """Numbers records per partition, like Kafka would."""

    def __init__(self) -> None:
        self.next: dict[Partition, int] = {}

    def _at(self, topic: str, partition: int, value: bytes | None) -> Rec:
        offset = self.next.get((topic, partition), 0)
        self.next[(topic, partition)] = offset + 1
        return Rec(topic, partition, offset, value)

    def result(self, request_id: str, session_id: str, owner: str | None = None, partition: int = 0) -> Rec:
        response = InferenceResponse(
            id=request_id, model_id="llama3.1", status="ok", context=ModelContext(session_id),
            latency_ms=1, completed_at=datetime(2024, 5, 1, tzinfo=UTC), output=f"answer {request_id}",
            key_name=owner,
        )
        return self._at(RESPONSES, partition, encode_response(CODEC, response))

    def token(self, request_id: str, session_id: str, seq: int, owner: str | None = None, partition: int = 0) -> Rec:
        token = InferenceToken(id=request_id, model_id="llama3.1", session_id=session_id, seq=seq,
                               text=f"t{seq}", key_name=owner)
        return self._at(TOKENS, partition, encode_token(CODEC, token))


def core(keys: tuple[ApiKey, ...] = (), max_queue: int = 100) -> BridgeCore:
    bridge = BridgeCore(
        CODEC, responses_topic=RESPONSES, tokens_topic=TOKENS, access=AccessPolicy(AccessSettings(keys)),
        known_models=("llama3.1", "mistral"), max_queue=max_queue,
    )
    bridge.start_at({(RESPONSES, 0): 0, (RESPONSES, 1): 0, (TOKENS, 0): 0})
    return bridge


def sent(peer: Peer) -> list[dict]:
    """The frames queued for ``peer``, taken (the shell's writer would send them)."""
    frames = [json.loads(f) for f in peer.outbox.queued()]
    peer.outbox._frames.clear()
    return frames


def results(peer: Peer) -> list[str]:
    return [f["id"] for f in sent(peer) if f["type"] == "result"]


def send(bridge: BridgeCore, peer: Peer, frame: dict | str) -> list:
    return bridge.receive(peer, frame if isinstance(frame, str) else json.dumps(frame))


# -- subscriptions and routing -----------------------------------------------------------


def test_a_result_goes_to_its_session_request_and_all_subscribers_only() -> None:
    bridge, log = core(), Log()
    by_session, by_request, everything, bystander = (bridge.connect() for _ in range(4))
    assert send(bridge, by_session, {"type": "subscribe", "session_id": "s1"}) == []
    send(bridge, by_request, {"type": "subscribe", "request_ids": ["r2"]})
    send(bridge, everything, {"type": "subscribe", "all": True})
    send(bridge, bystander, {"type": "subscribe", "session_id": "nobody"})
    assert sent(by_session) == [{"type": "subscribed", "session_id": "s1"}]
    for peer in (by_request, everything, bystander):
        sent(peer)

    for record in (log.result("r1", "s1"), log.result("r2", "s2"), log.token("r1", "s1", 0)):
        assert bridge.route(record) == []
    assert [(f["type"], f["id"]) for f in sent(by_session)] == [("result", "r1"), ("token", "r1")]
    assert results(by_request) == ["r2"]
    assert results(everything) == ["r1", "r2"]  # the "all" feed: results, no tokens
    assert sent(bystander) == []
    assert bridge.positions[(RESPONSES, 0)] == 2 and bridge.positions[(TOKENS, 0)] == 1
    assert bridge.status() == {"clients": 4, "subscribed": 4}

    send(bridge, by_session, {"type": "unsubscribe", "session_id": "s1"})
    assert sent(by_session) == [{"type": "unsubscribed", "session_id": "s1"}]
    bridge.route(log.result("r3", "s1"))
    assert sent(by_session) == []
    bridge.disconnect(everything)
    bridge.route(log.result("r4", "s1"))
    assert everything.outbox.closed and bridge.status() == {"clients": 3, "subscribed": 2}


def test_in_one_fetch_tokens_are_routed_before_results_and_in_order() -> None:
    bridge, log = core(), Log()
    peer = bridge.connect()
    send(bridge, peer, {"type": "subscribe", "session_id": "s"})
    sent(peer)
    tokens = [log.token("r", "s", seq) for seq in range(3)]
    result = log.result("r", "s", partition=1)
    # The result's partition comes first in the fetch, as it may from Kafka.
    bridge.route_batch({(RESPONSES, 1): [result], (TOKENS, 0): tokens})
    assert [(f["type"], f.get("seq")) for f in sent(peer)] == [
        ("token", 0), ("token", 1), ("token", 2), ("result", None)
    ]
    assert bridge.positions[(RESPONSES, 1)] == 1 and bridge.positions[(TOKENS, 0)] == 3


def test_an_undecodable_record_is_skipped_and_passed() -> None:
    bridge = core()
    peer = bridge.connect()
    send(bridge, peer, {"type": "subscribe", "all": True})
    sent(peer)
    assert bridge.route(Rec(RESPONSES, 0, 7, b"\x00garbage")) == []
    assert sent(peer) == [] and bridge.positions[(RESPONSES, 0)] == 8


# -- broken frames and submits -----------------------------------------------------------


def test_a_broken_frame_is_answered_with_an_error_and_the_connection_kept() -> None:
    bridge = core()
    peer = bridge.connect()
    assert send(bridge, peer, "{not json") == []
    assert send(bridge, peer, {"type": "dance"}) == []
    assert send(bridge, peer, {"type": "submit", "model_id": "no-such-model", "input": "hi", "id": "x1"}) == []
    errors = sent(peer)
    assert [e["type"] for e in errors] == ["error"] * 3
    assert errors[0]["reason"].startswith("frame is not valid JSON")
    assert "unknown frame type 'dance'" in errors[1]["reason"]
    assert errors[2]["status"] == 404 and errors[2]["id"] == "x1"
    assert not peer.closing
    send(bridge, peer, {"type": "subscribe", "session_id": "still-here"})
    assert sent(peer) == [{"type": "subscribed", "session_id": "still-here"}]


def test_a_submit_subscribes_to_its_id_before_it_is_produced() -> None:
    bridge, log = core(), Log()
    peer = bridge.connect()
    actions = send(bridge, peer, {"type": "submit", "id": "q1", "model_id": "llama3.1", "input": "hi",
                                  "context": {"session_id": "s9"}})
    assert len(actions) == 1 and isinstance(actions[0], Produce) and actions[0].peer is peer
    request = actions[0].request
    assert request.id == "q1" and request.key_name is None
    bridge.route(log.result("q1", "s9"))  # the answer may come before the ack
    assert results(peer) == ["q1"]
    bridge.submitted(peer, request)
    assert sent(peer) == [{"type": "accepted", "id": "q1", "session_id": "s9"}]
    bridge.submit_failed(peer, request, "Kafka is down", 503)
    assert sent(peer) == [{"type": "error", "reason": "Kafka is down", "status": 503, "id": "q1"}]


# -- API keys ----------------------------------------------------------------------------


def test_keys_see_their_own_records_and_are_refused_others_sessions_and_models() -> None:
    bridge, log = core(keys=(ALPHA, BETA)), Log()
    alpha, beta = bridge.connect(ALPHA), bridge.connect(BETA)
    for peer in (alpha, beta):
        send(bridge, peer, {"type": "subscribe", "all": True})
        sent(peer)
    bridge.route(log.result("a1", "alpha-session", owner="alpha"))
    bridge.route(log.result("n1", "no-owner"))
    assert results(alpha) == ["a1"] and results(beta) == []

    send(bridge, beta, {"type": "subscribe", "session_id": "alpha-session"})
    refused = sent(beta)
    assert refused[0]["status"] == 403 and "belongs to another API key than 'beta'" in refused[0]["reason"]
    send(bridge, alpha, {"type": "subscribe", "session_id": "alpha-session"})
    assert sent(alpha)[0]["type"] == "subscribed"

    assert send(bridge, beta, {"type": "submit", "id": "b1", "model_id": "llama3.1", "input": "hi"}) == []
    forbidden = sent(beta)[0]
    assert forbidden["status"] == 403 and forbidden["id"] == "b1"
    (produce,) = send(bridge, beta, {"type": "submit", "id": "b2", "model_id": "mistral", "input": "hi"})
    assert isinstance(produce, Produce) and produce.request.key_name == "beta"


def test_the_handshake_key_comes_from_the_header_or_the_token_parameter() -> None:
    bridge = core(keys=(ALPHA,))
    assert bridge.authenticate("/ws", "Bearer alpha-token") == ALPHA
    assert bridge.authenticate("/ws?token=alpha-token", None) == ALPHA
    with pytest.raises(Unauthenticated):
        bridge.authenticate("/ws", None)
    with pytest.raises(Unauthenticated):
        bridge.authenticate("/ws?token=wrong", None)
    assert core().authenticate("/ws", None) is None


# -- since: history, then live -----------------------------------------------------------


def test_a_since_subscription_replays_up_to_the_cutoff_then_releases_held_live_frames() -> None:
    bridge, log = core(), Log()
    earlier = [log.result(f"old{i}", "s") for i in range(2)]
    for record in earlier:
        bridge.route(record)
    peer = bridge.connect()
    (replay,) = send(bridge, peer, {"type": "subscribe", "session_id": "s", "since": 1000})
    assert isinstance(replay, Replay) and replay.peer is peer and replay.since_ms == 1000
    assert replay.cutoff[(RESPONSES, 0)] == 2 and replay.target == Target(session_id="s")
    assert sent(peer) == [{"type": "subscribed", "session_id": "s", "since": 1000}]

    live = log.result("new", "s")
    bridge.route(live)  # while the history is read: held
    assert sent(peer) == []
    select = bridge.history_filter(peer, replay.target)
    assert select(log.result("elsewhere", "other")) is None
    history = [select(r) for r in earlier]
    assert all(history) and bridge.wants_history(peer, (RESPONSES, 0, 0))
    bridge.replayed(peer, replay.target, 1000, 2)
    bridge.replay_ended(peer)
    assert json.loads(bridge.next_held(peer) or "")["id"] == "new"
    assert bridge.next_held(peer) is None
    assert sent(peer) == [{"type": "replayed", "session_id": "s", "since": 1000, "count": 2}]
    bridge.route(log.result("later", "s"))
    assert results(peer) == ["later"]


def test_a_replay_that_fails_is_answered_with_an_error_frame() -> None:
    bridge = core()
    peer = bridge.connect()
    (replay,) = send(bridge, peer, {"type": "subscribe", "request_ids": ["r"], "since": 5})
    sent(peer)
    bridge.replay_failed(peer, replay.target, 5, "cannot read history")
    assert sent(peer) == [{"type": "error", "reason": "cannot read history", "request_ids": ["r"], "since": 5}]


# -- slow clients ------------------------------------------------------------------------


def test_a_client_whose_outbox_is_full_is_closed_once_and_routed_nothing_more() -> None:
    bridge, log = core(max_queue=3), Log()
    slow, fast = bridge.connect(), bridge.connect()
    for peer in (slow, fast):
        send(bridge, peer, {"type": "subscribe", "session_id": "s"})
    sent(fast)
    sent(slow)  # slow then reads nothing more; fast reads everything
    closes, received = [], []
    for i in range(4):
        closes += bridge.route(log.result(f"r{i}", "s"))
        received += results(fast)
    assert closes == [Close(slow, TRY_AGAIN_LATER, closes[0].reason)]
    assert "too slow: 3 frames unsent" in closes[0].reason and slow.closing and slow.outbox.closed
    assert received == ["r0", "r1", "r2", "r3"] and not fast.closing
    assert bridge.route(log.result("r4", "s")) == []  # no second close
    assert bridge.status()["subscribed"] == 1
