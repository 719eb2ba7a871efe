"""The bridge's protocol, routing index and delivery ordering, without network or Kafka."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, UTC

import pytest

from consumers.bridge.delivery import CatchUp, Outbox, OutboxClosed
from consumers.bridge.frames import (
    FrameError,
    Submit,
    Subscribe,
    Target,
    Unsubscribe,
    parse_client_frame,
    parse_since,
    result_frame,
    token_frame,
)
from consumers.bridge.subscriptions import SubscriptionIndex, TooManySubscriptions
from schemas import InferenceResponse, InferenceToken, ModelContext


# -- frames ------------------------------------------------------------------------------


def test_subscribe_frames_parse_to_targets() -> None:
    assert parse_client_frame('{"type":"subscribe","session_id":"s1"}') == Subscribe(Target(session_id="s1"))
    assert parse_client_frame('{"type":"subscribe","request_ids":["r1","r2","r1"]}') == Subscribe(
        Target(request_ids=("r1", "r2"))
    )
    assert parse_client_frame('{"type":"subscribe","all":true,"since":1700000000000}') == Subscribe(
        Target(all=True), 1_700_000_000_000
    )
    assert parse_client_frame(b'{"type":"unsubscribe","session_id":"s1"}') == Unsubscribe(Target(session_id="s1"))


def test_submit_frame_keeps_the_infer_body_without_its_type() -> None:
    frame = parse_client_frame('{"type":"submit","model_id":"m","input":"hi","stream":true}')
    assert frame == Submit({"model_id": "m", "input": "hi", "stream": True})


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("not json", "not valid JSON"),
        ("[1,2]", "JSON object"),
        ('{"type":"dance"}', "unknown frame type 'dance'"),
        ('{"session_id":"s"}', "unknown frame type None"),
        ('{"type":"subscribe"}', "exactly one of"),
        ('{"type":"subscribe","session_id":"s","all":true}', "exactly one of"),
        ('{"type":"subscribe","session_id":""}', "non-empty string"),
        ('{"type":"subscribe","session_id":7}', "non-empty string"),
        ('{"type":"subscribe","request_ids":[]}', "non-empty list"),
        ('{"type":"subscribe","request_ids":"r1"}', "non-empty list"),
        ('{"type":"subscribe","request_ids":["ok", 3]}', "request_ids[]"),
        ('{"type":"subscribe","all":false}', "'all' must be true"),
        ('{"type":"subscribe","session_id":"s","sinse":1}', "unknown field 'sinse'"),
        ('{"type":"subscribe","session_id":"s","since":"yesterday"}', "neither ISO-8601"),
        ('{"type":"subscribe","session_id":"s","since":true}', "not a boolean"),
        ('{"type":"subscribe","session_id":"s","since":-5}', "before 1970"),
        ('{"type":"unsubscribe","session_id":"s","since":1}', "unknown field 'since'"),
    ],
)
def test_malformed_frames_say_why(message: str, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_client_frame(message)
    assert reason in info.value.reason


def test_too_many_request_ids_in_one_frame_is_refused() -> None:
    with pytest.raises(FrameError, match="at most 1000"):
        parse_client_frame(json.dumps({"type": "subscribe", "request_ids": [str(i) for i in range(1001)]}))


def test_since_accepts_iso_8601_and_epoch_milliseconds() -> None:
    when = datetime(2024, 5, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    ms = int(when.timestamp() * 1000)
    assert parse_since("2024-05-01T12:00:00.250Z") == ms
    assert parse_since("2024-05-01T12:00:00.250+00:00") == ms
    assert parse_since("2024-05-01T14:00:00.250+02:00") == ms
    assert parse_since("2024-05-01T12:00:00.250") == ms  # no offset: UTC
    assert parse_since(ms) == ms
    assert parse_since(float(ms)) == ms
    assert parse_since(str(ms)) == ms


def test_server_frames_carry_the_protocol_fields() -> None:
    token = InferenceToken(id="r1", model_id="m", session_id="s1", seq=3, text="wor")
    assert json.loads(token_frame(token)) == {"type": "token", "id": "r1", "seq": 3, "text": "wor"}
    response = InferenceResponse(
        id="r1", model_id="m", status="ok", context=ModelContext("s1", {"u": "a"}),
        latency_ms=12, completed_at=datetime(2024, 5, 1, tzinfo=UTC), output="hello",
        endpoint="http://e",
    )
    frame = json.loads(result_frame(response))
    assert frame == {"type": "result", **response.to_json()}
    assert frame["output"] == "hello" and frame["endpoint"] == "http://e" and frame["latency_ms"] == 12


def test_target_matching_used_by_replays() -> None:
    assert Target(session_id="s").matches("s", "r", is_token=True)
    assert not Target(session_id="s").matches("t", "r", is_token=False)
    assert Target(request_ids=("r", "q")).matches("any", "q", is_token=True)
    assert Target(all=True).matches("any", "any", is_token=False)
    assert not Target(all=True).matches("any", "any", is_token=True)


# -- routing index -----------------------------------------------------------------------


def test_index_routes_by_session_and_request_and_all_each_client_once() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a", Target(session_id="s1"))
    index.add("b", Target(request_ids=("r1", "r2")))
    index.add("c", Target(all=True))
    index.add("d", Target(session_id="s1"))
    index.add("d", Target(request_ids=("r1",)))  # both: still once
    assert index.for_result("s1", "r1") == {"a", "b", "c", "d"}
    assert index.for_result("s2", "r2") == {"b", "c"}
    assert index.for_result("s2", "r9") == {"c"}
    # The "all" feed is results only.
    assert index.for_token("s1", "r1") == {"a", "b", "d"}
    assert index.for_token("s9", "r9") == set()


def test_unsubscribe_and_drop_leave_no_empty_entries() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a", Target(session_id="s1"))
    index.add("a", Target(request_ids=("r1", "r2")))
    index.add("a", Target(all=True))
    index.add("b", Target(session_id="s1"))
    index.remove("a", Target(request_ids=("r1",)))
    assert index.for_result("x", "r1") == {"a"}  # through "all" only
    index.remove("a", Target(all=True))
    assert index.for_result("x", "r1") == set()
    assert index.for_result("x", "r2") == {"a"}
    index.drop("a")
    assert index.for_result("s1", "r2") == {"b"}
    index.remove("b", Target(session_id="s1"))
    assert len(index) == 0
    assert index._by_session == {} and index._by_request == {} and index._all == set()
    index.remove("ghost", Target(session_id="s1"))  # unknown client: no-op


def test_subscription_limit_per_client() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex(max_per_client=3)
    index.add("a", Target(request_ids=("1", "2")))
    index.add("a", Target(request_ids=("1", "2")))  # same keys: no growth
    with pytest.raises(TooManySubscriptions, match="at most 3"):
        index.add("a", Target(request_ids=("3", "4")))
    assert index.for_result("s", "3") == set()  # refused whole
    index.add("a", Target(session_id="s"))
    assert index.subscriptions_of("a") == 3


def test_routing_does_not_scan_clients() -> None:
    """Routing one record touches the clients it goes to, not the 20,000 others."""
    touched = 0

    class Client:
        def __init__(self, n: int) -> None:
            self.n = n

        def __hash__(self) -> int:
            nonlocal touched
            touched += 1
            return self.n

    index: SubscriptionIndex[Client] = SubscriptionIndex()
    clients = [Client(n) for n in range(20_000)]
    for client in clients:
        index.add(client, Target(session_id=f"s{client.n}"))
    touched = 0
    assert index.for_result("s123", "r") == {clients[123]}
    assert touched <= 2


# -- delivery ----------------------------------------------------------------------------


def test_catchup_holds_live_until_replays_end_and_dedupes_overlap() -> None:
    catchup = CatchUp()
    assert catchup.live(("t", 0, 1), "live-1")  # no replay: send now
    catchup.begin()
    assert not catchup.live(("t", 0, 5), "live-5")
    catchup.begin()  # a second, overlapping replay
    assert not catchup.live(("t", 0, 6), "live-6")
    assert catchup.history(("t", 0, 4))
    assert not catchup.history(("t", 0, 5))  # already held: sent once, from the held frames
    catchup.end()  # the first replay ends; the second still runs
    assert catchup.next_held() is None
    assert not catchup.live(("t", 0, 7), "live-7")
    assert catchup.held == 3
    catchup.end()
    assert catchup.next_held() == "live-5"
    # While held frames are being sent, new live frames queue behind them.
    assert not catchup.live(("t", 0, 8), "live-8")
    assert [catchup.next_held() for _ in range(4)] == ["live-6", "live-7", "live-8", None]
    assert not catchup.active and catchup.held == 0
    assert catchup.history(("t", 0, 5))  # no longer held
    assert catchup.live(("t", 0, 9), "live-9")
    with pytest.raises(RuntimeError):
        catchup.end()


async def test_outbox_refuses_past_its_limit_and_paces_history() -> None:
    outbox = Outbox(4)
    assert all(outbox.push(f"f{i}") for i in range(4))
    assert not outbox.push("f4")  # full: the caller closes the client
    assert await outbox.get() == "f0"

    # History waits while the outbox is more than half full (3 > 4 // 2).
    paced = asyncio.create_task(outbox.push_paced("history"))
    await asyncio.sleep(0)  # one loop turn (not a delay): lets the task reach its wait
    assert not paced.done() and len(outbox) == 3
    assert await outbox.get() == "f1"  # now 2: half full, history may go
    assert await paced is True
    assert [await outbox.get() for _ in range(3)] == ["f2", "f3", "history"]

    waiting = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    outbox.close()
    with pytest.raises(OutboxClosed):
        await waiting
    assert not outbox.push("late")
    assert await outbox.push_paced("late") is False


def test_the_page_finds_the_bridge_from_settings() -> None:
    from nexus.settings import BridgeSettings, Settings
    from producers.gateway.page import STATIC_DIR, page_config

    assert page_config(Settings()) == {"bridge_url": None, "bridge_port": 8765, "bridge_path": "/ws"}
    public = Settings(bridge=BridgeSettings(public_url="wss://nexus.example/ws"))
    assert page_config(public)["bridge_url"] == "wss://nexus.example/ws"
    assert {p.name for p in STATIC_DIR.iterdir()} >= {"index.html", "nexus.js", "nexus.css"}
