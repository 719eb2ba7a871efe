"""Admission (producers.admission): per-tenant windows, concurrency from the queue reports,
deadlines against the estimated wait, and Retry-After from the window or the drain rate. A fake
clock; no I/O, microseconds each."""

from __future__ import annotations

from datetime import datetime, timedelta, UTC
from typing import Any

import pytest

from nexus.settings import Settings, TenantSettings
from producers.admission import Admission, Rejection, estimate_tokens, retry_after
from producers.queue import QueueBoard
from schemas import InferenceOptions, InferenceRequest, Message, ModelContext
from schemas.queue_state import QueueReport

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def request(request_id: str = "r", *, tenant: str | None = "a", text: str = "", max_tokens: int | None = 10,
            model: str = "m", priority: str = "interactive", timeout_s: float | None = None,
            messages: tuple[Message, ...] = (), session: str = "s") -> InferenceRequest:
    created = datetime.fromtimestamp(T0, UTC)
    return InferenceRequest(
        id=request_id, model_id=model, input=text, context=ModelContext(session),
        options=InferenceOptions(max_tokens=max_tokens), created_at=created, messages=messages,
        deadline=None if timeout_s is None else created + timedelta(seconds=timeout_s),
        priority=priority, tenant=tenant)


def limits(**tenants: TenantSettings) -> Any:
    return Settings(tenants=tenants).tenant


def admission(clock: Clock, queue: QueueBoard | None = None, **tenants: TenantSettings) -> Admission:
    return Admission(limits(**tenants), queue, clock)


def test_the_token_estimate_is_a_quarter_of_the_text_plus_the_answer() -> None:
    assert estimate_tokens(request(text="x" * 400, max_tokens=50)) == 150
    assert estimate_tokens(request(text="", max_tokens=None)) == 256
    turns = (Message("system", "s" * 40), Message("user", "u" * 40))
    assert estimate_tokens(request(text="u" * 40, messages=turns, max_tokens=None)) == 30 + 256


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert [retry_after(s) for s in (0.0, 0.2, 1.0, 1.01, 59.5)] == [1, 1, 1, 2, 60]
    assert retry_after(1e9) == 3600


def test_no_limits_admits_everything_and_remembers_nothing() -> None:
    clock = Clock()
    gate = admission(clock)
    assert all(gate.admit(request(f"r{i}")) is None for i in range(1000))
    assert gate._windows == {} and gate._recent == {}


def test_requests_per_minute_with_retry_after_from_the_window() -> None:
    clock = Clock()
    gate = admission(clock, a=TenantSettings(requests_per_minute=3))
    for i in range(3):
        assert gate.admit(request(f"r{i}")) is None
        clock.now += 10  # at 0, 10, 20
    rejection = gate.admit(request("r3"))  # at 30: the first leaves the window at 60
    assert rejection == Rejection("requests_per_minute", "tenant 'a' is over its limit of 3 requests per minute; "
                                  "retry in 30 s", 30)
    assert gate.admit(request("x", tenant="b")) is None  # another tenant: the "*" defaults, unlimited
    clock.now = T0 + 60.5
    assert gate.admit(request("r4")) is None
    assert gate.admit(request("r5")).retry_after_s == 10  # the one at 10 leaves at 70
    assert gate.rejected == {"requests_per_minute": 2}


def test_tokens_per_minute_waits_until_enough_tokens_left_the_window() -> None:
    clock = Clock()
    gate = admission(clock, a=TenantSettings(tokens_per_minute=100))
    assert gate.admit(request("r1", max_tokens=40)) is None  # 40 at 0
    clock.now += 20
    assert gate.admit(request("r2", max_tokens=40)) is None  # 40 at 20
    clock.now += 10
    rejection = gate.admit(request("r3", max_tokens=50))  # 80 + 50 > 100: r1 must leave (at 60)
    assert rejection is not None and rejection.limit == "tokens_per_minute" and rejection.retry_after_s == 30
    assert "estimated at 50" in rejection.message
    big = gate.admit(request("r4", max_tokens=90))  # needs both gone: r2 leaves at 80
    assert big is not None and big.retry_after_s == 50
    assert gate.admit(request("r5", max_tokens=20)) is None  # fits now


def test_a_request_over_the_whole_budget_is_413_without_retry() -> None:
    gate = admission(Clock(), a=TenantSettings(tokens_per_minute=100))
    rejection = gate.admit(request(max_tokens=None))
    assert rejection is not None and rejection.status == 413 and rejection.retry_after_s is None
    assert "256 tokens" in rejection.message and "max_tokens" in rejection.message


def test_the_star_table_limits_every_tenant_without_its_own() -> None:
    clock = Clock()
    gate = admission(clock, **{"*": TenantSettings(requests_per_minute=1), "vip": TenantSettings()})
    assert gate.admit(request("a1", tenant="a")) is None and gate.admit(request("a2", tenant="a")) is not None
    assert gate.admit(request("b1", tenant="b")) is None  # each tenant its own window
    assert all(gate.admit(request(f"v{i}", tenant="vip")) is None for i in range(5))


def test_a_request_without_a_tenant_counts_against_its_session() -> None:
    gate = admission(Clock(), **{"*": TenantSettings(requests_per_minute=1)})
    assert gate.admit(request("1", tenant=None, session="s1")) is None
    assert gate.admit(request("2", tenant=None, session="s1")) is not None
    assert gate.admit(request("3", tenant=None, session="s2")) is None


def test_refund_gives_back_what_kafka_never_took() -> None:
    gate = admission(Clock(), a=TenantSettings(requests_per_minute=1, max_concurrent=1))
    first = request("r1")
    assert gate.admit(first) is None
    gate.refund(first)
    assert gate.admit(request("r2")) is None


def queued(request_id: str, tenant: str, position: int = 0, priority: str = "interactive") -> dict[str, Any]:
    return {"id": request_id, "session_id": "s", "tenant": tenant, "priority": priority, "position": position,
            "eta_s": 0.0, "waited_s": 0.0}


def report(*waiting: dict[str, Any], running: tuple[str, ...] = (), rate: float = 1.0, at: float = T0,
           worker: str = "w") -> QueueReport:
    return QueueReport(worker=worker, model="m", at=at, rate_per_s=rate, waiting=list(waiting),
                       running=[{"id": r, "session_id": "s", "tenant": "a", "priority": "interactive",
                                 "running_s": 1.0} for r in running])


def test_max_concurrent_counts_the_reports_and_the_unreported_recent_ones() -> None:
    clock, board = Clock(), QueueBoard()
    gate = admission(clock, board, a=TenantSettings(max_concurrent=3))
    board.ingest(report(queued("q1", "a"), running=("x1",), rate=2.0))  # 2 of a's reported
    assert gate.admit(request("n1")) is None  # 2 + 0 -> taken, now 1 unreported
    rejection = gate.admit(request("n2"))  # 2 reported + 1 unreported = 3
    assert rejection is not None and rejection.limit == "max_concurrent"
    assert "has 3 requests waiting or running, its limit is 3" in rejection.message
    assert rejection.retry_after_s == 1  # (3 - 3 + 1) / 2 per s, rounded up to 1
    # The report that lists n1 does not count it twice.
    board.ingest(report(queued("q1", "a"), queued("n1", "a", 1), running=("x1",), rate=2.0, at=T0 + 1))
    clock.now = T0 + 1
    assert gate.admit(request("n2")) is not None
    # Once a report listed it, the reports count it: when they drop it (answered), it is gone.
    board.ingest(report(queued("q1", "a"), running=("x1",), rate=2.0, at=T0 + 2))
    clock.now = T0 + 2
    assert gate.admit(request("n2")) is None
    # One never listed counts for UNREPORTED_S (5 s) after it was taken.
    assert gate.admit(request("n3")) is not None
    clock.now = T0 + 7.5
    board.ingest(report(queued("q1", "a"), running=("x1",), rate=2.0, at=T0 + 7))
    assert gate.admit(request("n3")) is None
    assert gate.admit(request("other", tenant="b")) is None  # b has no limit


def test_max_concurrent_retry_after_follows_the_tenants_drain_rate() -> None:
    clock, board = Clock(), QueueBoard()
    gate = admission(clock, board, a=TenantSettings(max_concurrent=2))
    # a has 6 waiting; with b sharing the model, a starts 0.5 per second (rate 1, equal weights).
    board.ingest(report(*(queued(f"a{i}", "a", i) for i in range(6)), queued("b0", "b", 6), rate=1.0))
    rejection = gate.admit(request("n"))
    assert rejection is not None and rejection.retry_after_s == 10  # (6 - 2 + 1) / 0.5


def test_without_queue_reports_only_this_gateways_recent_requests_count() -> None:
    clock = Clock()
    gate = admission(clock, None, a=TenantSettings(max_concurrent=1))
    assert gate.admit(request("1")) is None
    assert gate.admit(request("2")).retry_after_s == 1
    clock.now += 6
    assert gate.admit(request("3")) is None


def test_a_deadline_shorter_than_the_estimated_wait_is_refused() -> None:
    clock, board = Clock(), QueueBoard()
    gate = admission(clock, board)
    board.ingest(report(*(queued(f"q{i}", "a", i) for i in range(20)), rate=2.0))  # 10 s of a's requests
    rejection = gate.admit(request("late", timeout_s=4))  # a's own backlog: 10 s > 4 s
    assert rejection is not None and rejection.limit == "deadline" and rejection.retry_after_s == 6
    assert "estimated wait of 10.0 s" in rejection.message and "timeout_ms" in rejection.message
    assert gate.admit(request("ok", timeout_s=11)) is None
    assert gate.admit(request("nodeadline")) is None
    # Another tenant gets its fair share: one of a's, then its own.
    assert gate.admit(request("fair", tenant="b", timeout_s=4)) is None
    # An interactive request is not held up by a batch backlog (this report replaces the one above).
    board.ingest(report(*(queued(f"b{i}", "z", i, "batch") for i in range(100)), rate=1.0, at=T0 + 1))
    assert gate.admit(request("i", tenant="z", timeout_s=1)) is None
    assert gate.admit(request("b", tenant="z", priority="batch", timeout_s=1)) is not None
    assert gate.admit(request("m2", model="unknown", timeout_s=1)) is None  # no estimate: taken


def test_a_big_queue_within_the_limits_admits_everyone() -> None:
    clock, board = Clock(), QueueBoard()
    board.ingest(report(*(queued(f"q{i}", f"t{i % 10}", i) for i in range(1000)), rate=100.0))
    gate = admission(clock, board, **{"*": TenantSettings(requests_per_minute=10**6, tokens_per_minute=10**9,
                                                          max_concurrent=10**6)})
    refused = []
    for i in range(2000):
        clock.now += 0.001
        if (refusal := gate.admit(request(f"r{i}", tenant=f"t{i % 10}", timeout_s=60))) is not None:
            refused.append(refusal)
    assert refused == []


@pytest.mark.parametrize("limit", ["requests_per_minute", "tokens_per_minute", "max_concurrent", "deadline"])
def test_every_rejection_names_its_limit_and_a_retry(limit: str) -> None:
    clock, board = Clock(), QueueBoard()
    board.ingest(report(*(queued(f"q{i}", "a", i) for i in range(10)), rate=1.0))
    settings = {"requests_per_minute": TenantSettings(requests_per_minute=1),
                "tokens_per_minute": TenantSettings(tokens_per_minute=300),
                "max_concurrent": TenantSettings(max_concurrent=10),
                "deadline": TenantSettings()}[limit]
    gate = admission(clock, board, a=settings)
    first = gate.admit(request("1", max_tokens=200))  # over max_concurrent already: 10 of a's reported
    assert (first is None) == (limit != "max_concurrent")
    rejection = first or gate.admit(request("2", max_tokens=200, timeout_s=1))
    assert rejection is not None and rejection.limit == limit and rejection.status == 429
    assert isinstance(rejection.retry_after_s, int) and rejection.retry_after_s >= 1
