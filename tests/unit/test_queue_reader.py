"""The edges' picture of the workers' schedules (producers.queue): the board answers where a request
stands, how busy a tenant is and how long a new request would wait; the reader follows nexus.queue,
restarts when it fails and shows on /health."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from nexus.kafka import readers
from nexus.settings import Settings
from nexus.tasks import Background
from producers.gateway.app import reader_checks
from producers.queue import STALE_AFTER_S, QueueBoard, QueueReader
from schemas.queue_state import QueueReport
from tests.eventually import eventually

NOW = 1_700_000_000.0


def waiting(request_id: str, position: int, *, tenant: str = "t", priority: str = "interactive",
            session: str = "s", eta_s: float = 1.0, waited_s: float = 0.5) -> dict[str, Any]:
    return {"id": request_id, "session_id": session, "tenant": tenant, "priority": priority, "position": position,
            "eta_s": eta_s, "waited_s": waited_s}


def running(request_id: str, *, tenant: str = "t", session: str = "s", running_s: float = 2.0) -> dict[str, Any]:
    return {"id": request_id, "session_id": session, "tenant": tenant, "priority": "interactive",
            "running_s": running_s}


def report(*entries: dict[str, Any], worker: str = "w1", model: str = "m", at: float = NOW, rate: float = 2.0,
           total: int = -1) -> QueueReport:
    return QueueReport(worker=worker, model=model, at=at, rate_per_s=rate,
                       waiting=[e for e in entries if "position" in e],
                       running=[e for e in entries if "running_s" in e], waiting_total=total)


def test_find_counts_the_eta_down_and_the_wait_up_since_the_report() -> None:
    board = QueueBoard()
    board.ingest(report(waiting("r1", 3, eta_s=4.0, waited_s=1.0), running("r0", running_s=2.0)))
    where = board.find("r1", NOW + 1.5)
    assert where is not None and where.to_json(NOW + 1.5) == {
        "id": "r1", "state": "queued", "model": "m", "priority": "interactive", "tenant": "t",
        "position": 3, "eta_ms": 2500, "waited_ms": 2500, "worker": "w1"}
    assert board.find("r1", NOW + 10).to_json(NOW + 10)["eta_ms"] == 0  # late: 0, never negative
    started = board.find("r0", NOW + 1)
    assert started is not None and started.to_json(NOW + 1) == {
        "id": "r0", "state": "running", "model": "m", "priority": "interactive", "tenant": "t",
        "running_ms": 3000, "worker": "w1"}
    assert board.find("nope", NOW) is None


def test_a_newer_report_replaces_the_old_one_and_an_empty_one_clears_it() -> None:
    board = QueueBoard()
    board.ingest(report(waiting("r1", 0), waiting("r2", 1)))
    board.ingest(report(waiting("r2", 0), at=NOW + 1))
    assert board.find("r1", NOW + 1) is None and board.find("r2", NOW + 1).entry["position"] == 0
    board.ingest(report(waiting("r9", 0), at=NOW))  # older than what is held: ignored
    assert board.find("r9", NOW + 1) is None
    board.ingest(report(at=NOW + 2))
    assert board.find("r2", NOW + 2) is None and board.reports(NOW + 2) == []
    assert board.in_session("s", NOW + 2) == []


def test_stale_reports_do_not_count() -> None:
    board = QueueBoard()
    board.ingest(report(waiting("r1", 0), running("r0")))
    later = NOW + STALE_AFTER_S + 1
    assert board.find("r1", later) is None and board.active("t", later) == 0 and board.reports(later) == []
    assert board.estimated_wait_s("m", "interactive", "t", later) is None


def test_the_worker_that_took_over_wins_for_a_request_two_report() -> None:
    board = QueueBoard()
    board.ingest(report(waiting("r1", 7), worker="new", at=NOW + 5))
    board.ingest(report(waiting("r1", 2), worker="dead", at=NOW))
    assert board.find("r1", NOW + 5).report.worker == "new"


def test_sessions_and_tenants_are_indexed() -> None:
    board = QueueBoard()
    board.ingest(report(waiting("a1", 0, tenant="a", session="sa"), waiting("b1", 1, tenant="b", session="sb"),
                        running("a0", tenant="a", session="sa")))
    board.ingest(report(waiting("a2", 0, tenant="a", session="sa"), model="other"))
    assert sorted(w.entry["id"] for w in board.in_session("sa", NOW)) == ["a0", "a1", "a2"]
    assert board.active("a", NOW) == 3 and board.active("b", NOW) == 1 and board.active("c", NOW) == 0


def test_the_wait_estimate_puts_urgent_classes_first_and_shares_by_weight() -> None:
    board = QueueBoard()
    flood = [waiting(f"b{i}", i, tenant="flood", priority="batch") for i in range(100)]
    board.ingest(report(*flood, waiting("i1", 100, tenant="other"), rate=10.0))
    # An interactive request waits behind the one interactive request only.
    assert board.estimated_wait_s("m", "interactive", "me", NOW) == pytest.approx(0.1)
    # A batch request of a third tenant: the interactive one, then one turn of the flood's.
    assert board.estimated_wait_s("m", "batch", "me", NOW) == pytest.approx(0.2)
    # The flooding tenant waits behind its own hundred.
    assert board.estimated_wait_s("m", "batch", "flood", NOW) == pytest.approx(10.1)
    # Weights: a tenant with a third of the flood's weight lets it go three times per turn.
    weights = {"flood": 3.0, "me": 1.0}
    assert board.estimated_wait_s("m", "batch", "me", NOW, weights.__getitem__) == pytest.approx(0.4)
    assert board.estimated_wait_s("m", "interactive", "x", NOW + 0) is not None
    board.ingest(report(waiting("z", 0), model="unmeasured", rate=0.0))
    assert board.estimated_wait_s("unmeasured", "interactive", "x", NOW) is None  # no rate: no estimate


def test_drain_rate_is_the_tenants_weighted_share() -> None:
    board = QueueBoard()
    board.ingest(report(running("a1", tenant="a"), waiting("b1", 0, tenant="b"), rate=4.0))
    assert board.drain_per_s("a", NOW) == pytest.approx(2.0)
    assert board.drain_per_s("a", NOW, {"a": 3.0, "b": 1.0}.__getitem__) == pytest.approx(3.0)
    assert board.drain_per_s("nobody", NOW) == 0.0


def test_model_queue_counts_waiting_per_priority() -> None:
    board = QueueBoard()
    board.ingest(report(waiting("i", 0), waiting("b", 1, priority="batch"), running("r"), total=10, rate=1.5))
    board.ingest(report(waiting("i2", 0), worker="w2", rate=0.5))
    assert board.model_queue("m", NOW) == {"waiting": {"interactive": 2, "batch": 9}, "waiting_total": 11,
                                           "running": 1, "rate_per_s": 2.0, "workers_reporting": 2}
    assert board.model_queue("idle", NOW) == {"waiting": {"interactive": 0, "batch": 0}, "waiting_total": 0,
                                              "running": 0, "rate_per_s": 0, "workers_reporting": 0}


def test_a_big_board_answers_in_microseconds() -> None:
    board = QueueBoard()
    board.ingest(report(*(waiting(f"r{i}", i, tenant=f"t{i % 50}") for i in range(5000))))
    loop = asyncio.new_event_loop()
    started = loop.time()
    for i in range(1000):
        assert board.find(f"r{i}", NOW) is not None
        board.active("t1", NOW)
    assert loop.time() - started < 0.5
    loop.close()


# --------------------------------------------------------------------------- the reader


class FakeConsumer:
    def __init__(self) -> None:
        self.feed: asyncio.Queue[Any] = asyncio.Queue()
        self.stopped = False
        self.seeks: list[str] = []

    async def start(self) -> None: ...

    async def stop(self) -> None:
        self.stopped = True

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = tps

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        self.seeks.append("beginning")

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Any]]:
        item = await self.feed.get()
        if isinstance(item, BaseException):
            raise item
        return item


@pytest.fixture()
def consumers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeConsumer]]:
    made: list[FakeConsumer] = []

    def reader(kafka: Any, client_id: str = "nexus", **options: Any) -> FakeConsumer:
        made.append(FakeConsumer())
        return made[-1]

    async def known_partitions(consumer: FakeConsumer, topic: str, timeout_s: float = 5.0) -> list[int]:
        return [0]

    monkeypatch.setattr(readers, "reader", reader)
    monkeypatch.setattr(readers, "known_partitions", known_partitions)
    yield made


def records(*values: bytes | None) -> dict[TopicPartition, list[Any]]:
    return {TopicPartition("nexus.queue", 0): [SimpleNamespace(value=v) for v in values]}


async def test_the_reader_follows_the_topic_and_restarts_from_the_beginning(consumers: list[FakeConsumer]) -> None:
    seen: list[QueueReport] = []
    go = asyncio.Event()

    async def pause(seconds: float) -> None:
        await go.wait()

    reader = QueueReader(Settings(), Background((0.5,), sleep=pause), on_report=seen.append)
    await reader.start()
    [first] = consumers
    assert first.seeks == ["beginning"] and first.assigned == [TopicPartition("nexus.queue", 0)]
    assert reader_checks([reader.state])["reader:queue"]["status"] == "ok"
    first.feed.put_nowait(records(report(waiting("r1", 0), at=1e12).to_bytes(), b"not json", None))
    await eventually(lambda: reader.board.find("r1", 1e12) is not None, "the report is on the board")
    assert [r.worker for r in seen] == ["w1"] and reader.malformed == 1

    first.feed.put_nowait(ConnectionError("broker gone"))
    await eventually(lambda: reader.state is not None and not reader.state.up, "the reader is down")
    check = reader_checks([reader.state])["reader:queue"]
    assert check["status"] == "down" and "broker gone" in check["reason"] and first.stopped
    assert reader.board.find("r1", 1e12) is not None  # what was read stays
    go.set()
    await eventually(lambda: len(consumers) == 2 and reader.state.up, "the reader is back")
    assert consumers[1].seeks == ["beginning"]
    await reader.stop()
    assert consumers[1].stopped


async def test_a_reader_that_cannot_connect_keeps_trying_in_the_background(monkeypatch: pytest.MonkeyPatch,
                                                                           consumers: list[FakeConsumer]) -> None:
    attempts = 0
    real = readers.known_partitions

    async def missing(consumer: Any, topic: str, timeout_s: float = 5.0) -> list[int]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("no topic yet")
        return await real(consumer, topic, timeout_s)

    monkeypatch.setattr(readers, "known_partitions", missing)
    reader = QueueReader(Settings(), Background((0.01,)))
    await reader.start()
    assert attempts == 1
    await eventually(lambda: reader.state is not None and reader.state.up, "connected on the second try")
    await reader.stop()
