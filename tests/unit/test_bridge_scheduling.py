"""The bridge and scheduling: submit frames with priority and tenant, the cancel frame, and queued
frames to the subscribers of a waiting request or its session when its position or ETA moved."""

from __future__ import annotations

import json

import pytest

from consumers.bridge.core import BridgeCore, CancelRequest, Peer, Produce, worth_telling
from consumers.bridge.frames import Cancel, FrameError, parse_client_frame, queued_frame
from nexus.access import AccessPolicy
from nexus.settings import AccessSettings
from producers.queue import QueueBoard
from schemas.queue_state import QueueReport
from tests.unit.test_bridge_core import ALPHA, BETA, CODEC, RESPONSES, TOKENS, sent

NOW = 1_700_000_000.0


def core(keys=(), board: QueueBoard | None = None) -> BridgeCore:  # type: ignore[no-untyped-def]
    return BridgeCore(CODEC, responses_topic=RESPONSES, tokens_topic=TOKENS, access=AccessPolicy(AccessSettings(keys)),
                      known_models=("llama3.1", "mistral"), max_queue=100, queue=board, clock=lambda: NOW)


def waiting(request_id: str, position: int, eta_s: float, *, session: str = "s1", tenant: str = "t") -> dict:
    return {"id": request_id, "session_id": session, "tenant": tenant, "priority": "interactive",
            "position": position, "eta_s": eta_s, "waited_s": 0.0}


def report(*entries: dict, at: float = NOW, worker: str = "w1") -> QueueReport:
    return QueueReport(worker=worker, model="llama3.1", at=at, rate_per_s=1.0, waiting=list(entries))


def test_the_cancel_frame_parses_and_bad_ones_say_why() -> None:
    assert parse_client_frame('{"type":"cancel","id":"r1"}') == Cancel("r1")
    for message, reason in (('{"type":"cancel"}', "'id' must be a non-empty string"),
                            ('{"type":"cancel","id":""}', "non-empty"),
                            ('{"type":"cancel","id":"r1","why":"x"}', "unknown field 'why'"),
                            ('{"type":"cancel","id":"' + "x" * 300 + '"}', "longer than 256")):
        with pytest.raises(FrameError) as info:
            parse_client_frame(message)
        assert reason in info.value.reason
    with pytest.raises(FrameError, match='"cancel"'):
        parse_client_frame('{"type":"stop"}')


def test_a_cancel_frame_asks_the_shell_to_cancel_with_the_clients_key() -> None:
    bridge = core(keys=(ALPHA,))
    peer = bridge.connect(ALPHA)
    (action,) = bridge.receive(peer, '{"type":"cancel","id":"r1"}')
    assert action == CancelRequest(peer, "r1", "alpha")
    bridge.cancel_sent(peer, "r1")
    bridge.cancel_failed(peer, "r2", "Kafka is down")
    assert sent(peer) == [{"type": "cancelling", "id": "r1"},
                          {"type": "error", "reason": "Kafka is down", "status": 503, "id": "r2"}]
    bridge.receive(peer, '{"type":"cancel","id":""}')
    assert sent(peer)[0]["type"] == "error"


def test_submit_frames_carry_priority_and_tenant() -> None:
    bridge = core()
    peer = bridge.connect()
    (action,) = bridge.receive(peer, json.dumps({"type": "submit", "model_id": "llama3.1", "input": "hi",
                                                 "priority": "batch", "tenant": "team-x"}))
    assert isinstance(action, Produce) and (action.request.priority, action.request.tenant) == ("batch", "team-x")
    (action,) = bridge.receive(peer, json.dumps({"type": "submit", "model_id": "llama3.1", "input": "hi",
                                                 "context": {"session_id": "s9"}}))
    assert isinstance(action, Produce) and (action.request.priority, action.request.tenant) == ("interactive", "s9")
    bridge.receive(peer, json.dumps({"type": "submit", "model_id": "llama3.1", "input": "hi", "priority": "now"}))
    (error,) = sent(peer)
    assert error["type"] == "error" and error["status"] == 400 and "'priority' must be one of" in error["reason"]


def test_with_keys_a_submits_tenant_is_the_keys_name() -> None:
    bridge = core(keys=(ALPHA,))
    peer = bridge.connect(ALPHA)
    (action,) = bridge.receive(peer, json.dumps({"type": "submit", "model_id": "llama3.1", "input": "hi",
                                                 "tenant": "someone-else"}))
    assert isinstance(action, Produce) and action.request.tenant == "alpha"


def test_worth_telling_the_first_time_then_on_noticeable_moves() -> None:
    assert worth_telling(None, 500, 100_000)
    assert not worth_telling((500, 100_000), 480, 99_000)  # 20 of 500 and 1 s: not worth a frame
    assert worth_telling((500, 100_000), 450, 99_000)  # 10% of the position
    assert worth_telling((500, 100_000), 500, 79_000)  # 20% of the ETA
    assert worth_telling((3, 3000), 2, 3000)  # near the front, every move
    assert not worth_telling((3, 3000), 3, 4500)  # an ETA 1.5 s off: under 2 s
    assert worth_telling((1, 1000), 0, 0)


def test_queued_frames_go_to_the_subscribers_of_the_request_or_its_session_when_they_move() -> None:
    bridge = core()
    by_id, by_session, everything, other = (bridge.connect() for _ in range(4))
    bridge.receive(by_id, '{"type":"subscribe","request_ids":["r2"]}')
    bridge.receive(by_session, '{"type":"subscribe","session_id":"s1"}')
    bridge.receive(everything, '{"type":"subscribe","all":true}')
    bridge.receive(other, '{"type":"subscribe","session_id":"s-other"}')
    for peer in (by_id, by_session, everything, other):
        sent(peer)
    bridge.route_queue(report(waiting("r1", 0, 1.0), waiting("r2", 20, 20.0)), NOW + 0.5)
    assert sent(by_id) == [{"type": "queued", "id": "r2", "model": "llama3.1", "position": 20, "eta_ms": 19500}]
    assert [f["id"] for f in sent(by_session)] == ["r1", "r2"]
    assert sent(everything) == [] and sent(other) == []  # "all" carries results only
    # Nothing worth telling: no frame.
    bridge.route_queue(report(waiting("r1", 0, 1.0), waiting("r2", 19, 19.5), at=NOW + 0.5), NOW + 0.5)
    assert sent(by_id) == [] and sent(by_session) == []
    # r1 started, r2 moved to the front: only r2's subscribers hear of it.
    bridge.route_queue(report(waiting("r2", 0, 0.5), at=NOW + 20), NOW + 20)
    assert sent(by_id) == [{"type": "queued", "id": "r2", "model": "llama3.1", "position": 0, "eta_ms": 500}]
    assert [f["id"] for f in sent(by_session)] == ["r2"]
    # Once it leaves the queue, what it was told is forgotten.
    bridge.route_queue(report(at=NOW + 21), NOW + 21)
    assert bridge._told == {} and bridge._told_by_report == {}


def test_queued_frames_respect_api_keys() -> None:
    bridge = core(keys=(ALPHA, BETA))
    alpha, beta = bridge.connect(ALPHA), bridge.connect(BETA)
    bridge.receive(alpha, '{"type":"subscribe","request_ids":["a1","b1"]}')
    bridge.receive(beta, '{"type":"subscribe","request_ids":["a1","b1"]}')
    sent(alpha), sent(beta)
    bridge.route_queue(report(waiting("a1", 0, 1.0, tenant="alpha"), waiting("b1", 1, 2.0, tenant="beta")), NOW)
    assert [f["id"] for f in sent(alpha)] == ["a1"] and [f["id"] for f in sent(beta)] == ["b1"]


def test_a_new_subscriber_hears_at_once_where_its_requests_wait() -> None:
    board = QueueBoard()
    board.ingest(report(waiting("r1", 2, 3.0), waiting("r2", 5, 6.0, session="s2")))
    board.ingest(QueueReport(worker="w1", model="mistral", at=NOW, running=[
        {"id": "r3", "session_id": "s1", "tenant": "t", "priority": "interactive", "running_s": 1.0}]))
    bridge = core(board=board)
    peer = bridge.connect()
    bridge.receive(peer, '{"type":"subscribe","session_id":"s1"}')
    assert sent(peer) == [{"type": "subscribed", "session_id": "s1"},
                          {"type": "queued", "id": "r1", "model": "llama3.1", "position": 2, "eta_ms": 3000}]
    bridge.receive(peer, '{"type":"subscribe","request_ids":["r2","nope"]}')
    assert [f["type"] for f in sent(peer)] == ["subscribed", "queued"]


def test_queued_frame_shape() -> None:
    assert json.loads(queued_frame("r1", "m", 3, 1500)) == {"type": "queued", "id": "r1", "model": "m",
                                                            "position": 3, "eta_ms": 1500}


def test_routing_a_big_report_renders_only_what_someone_listens_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's report lists every waiting request (thousands); the bridge renders a position only
    for those with a subscriber, so a big queue costs a dictionary lookup per entry, not a frame."""
    import producers.queue

    rendered: list[str] = []
    to_json = producers.queue.Whereabouts.to_json

    def counting(self: producers.queue.Whereabouts, now: float) -> dict:
        rendered.append(self.entry["id"])
        return to_json(self, now)

    monkeypatch.setattr(producers.queue.Whereabouts, "to_json", counting)
    bridge = core()
    peer: Peer = bridge.connect()
    bridge.receive(peer, '{"type":"subscribe","request_ids":["r4999"]}')
    big = report(*(waiting(f"r{i}", i, i / 10, session=f"s{i}") for i in range(5000)))
    bridge.route_queue(big, NOW)
    assert rendered == ["r4999"]
    assert [f["id"] for f in sent(peer) if f["type"] == "queued"] == ["r4999"]
