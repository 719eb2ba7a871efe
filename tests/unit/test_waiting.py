"""A model's waiting line for endpoint slots, without Kafka or HTTP: who is woken, when.

A freed slot wakes the oldest waiting request at once; a waiter that leaves by another
way leaves the line, so no later wake-up is spent on it. The clock is manual and never
moves unless a test says so: a lost wake-up leaves the waiter waiting and fails the test,
it is not rescued by the safety-net poll (routing.MAX_WAIT_S).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from nexus.settings import EndpointSettings, ModelSettings, Settings
from schemas import InferenceRequest
from streams.answering.cache import CacheEntry
from streams.answering.clock import ManualClock
from streams.answering.inference import Inference, Unavailable
from streams.answering.routing import MAX_WAIT_S
from streams.answering.scheduling import Ticket
from streams.answering.waiting import Expired, Slot, WaitingLine
from streams.backends.base import Generation
from streams.backends.memory import MemoryBackend
from streams.metrics import WorkerMetrics

URL = "http://a.invalid"


class NoCache:
    def get(self, key: bytes) -> CacheEntry | None:
        return None

    async def put(self, request: InferenceRequest, key: bytes, entry: CacheEntry) -> None:
        return None


@pytest.fixture()
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture()
async def inference(clock: ManualClock) -> AsyncIterator[Inference]:
    settings = Settings(models=(
        ModelSettings("m", (EndpointSettings(URL, max_concurrency=1),), fallback="b"),
        ModelSettings("b", (EndpointSettings("http://b.invalid"),)),
    ))
    inf = Inference(settings, None, WorkerMetrics(), NoCache(), clock, backend=MemoryBackend(clock))
    yield inf
    await inf.aclose()


@pytest.fixture()
def line(inference: Inference) -> WaitingLine:
    return inference.lines["m"]


async def until(condition: Callable[[], bool]) -> None:
    """Let the other tasks run until ``condition`` holds (bounded, the clock stands still)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def settle() -> None:
    """Let every task that can run do so (the clock stands still)."""
    for _ in range(20):
        await asyncio.sleep(0)


def acquire(line: WaitingLine, n: int, can_fall_back: bool = False) -> asyncio.Task[Slot]:
    return asyncio.ensure_future(line.acquire(f"s{n}", line.clock() + 30, frozenset(), can_fall_back))


async def test_a_freed_slot_wakes_the_oldest_waiter_at_once(line: WaitingLine) -> None:
    router = line.router
    await acquire(line, 0)
    waiters = [acquire(line, n) for n in (1, 2, 3)]
    await until(lambda: len(line) == 3)
    for turn, waiter in enumerate(waiters):
        router.succeeded(URL, 0.1)
        line.wake()
        await until(waiter.done)  # the oldest, with no time passing
        assert router.endpoints[URL].in_flight == 1
        assert [w.done() for w in waiters] == [i <= turn for i in range(3)], "one slot, one waiter"
        assert len(line) == 2 - turn


OUTCOMES: dict[str, Callable[[Slot], None]] = {
    "succeeded": lambda slot: slot.succeeded(Generation("out", 1, 1, "stop", 0.1, None)),
    "failed": lambda slot: slot.failed("refused"),
    "busy": lambda slot: slot.busy("503 server busy"),
    "released": lambda slot: slot.released(),
}


@pytest.mark.parametrize("outcome", OUTCOMES)
async def test_every_outcome_of_a_slot_frees_it_for_the_next_in_line(line: WaitingLine, outcome: str) -> None:
    held = await acquire(line, 0)
    waiter = acquire(line, 1)
    await until(lambda: len(line) == 1)
    OUTCOMES[outcome](held)
    await until(waiter.done)  # no time passes: only the wake-up can have served it
    assert waiter.result().url == URL and line.router.endpoints[URL].in_flight == 1 and len(line) == 0


async def test_a_waiter_served_by_the_safety_poll_leaves_the_line(line: WaitingLine, clock: ManualClock) -> None:
    """Otherwise the next freed slot's wake-up goes to a request that is no longer waiting."""
    router = line.router
    await acquire(line, 0)
    first = acquire(line, 1)
    await until(lambda: len(line) == 1)
    router.released(URL)  # a slot frees without a wake-up: only the safety-net poll finds it
    await asyncio.sleep(0)
    assert not first.done(), "no wake-up, no time passed"
    clock.advance(MAX_WAIT_S)
    await until(first.done)
    assert len(line) == 0
    second = acquire(line, 2)
    await until(lambda: len(line) == 1)
    router.succeeded(URL, 0.1)
    line.wake()
    await until(second.done)


async def test_a_cancelled_waiter_leaves_the_line(line: WaitingLine) -> None:
    router = line.router
    await acquire(line, 0)
    gone, staying = acquire(line, 1), acquire(line, 2)
    await until(lambda: len(line) == 2)
    gone.cancel()
    await until(lambda: len(line) == 1)
    router.succeeded(URL, 0.1)
    line.wake()
    await until(staying.done)


async def test_a_waiter_woken_for_a_slot_it_leaves_unused_passes_the_wake_up_on(line: WaitingLine) -> None:
    router = line.router
    await acquire(line, 0)
    woken, next_one = acquire(line, 1), acquire(line, 2)
    await until(lambda: len(line) == 2)
    router.succeeded(URL, 0.1)
    line.wake()  # wakes the first ...
    woken.cancel()  # ... which leaves before it runs
    await until(next_one.done)
    assert woken.cancelled() and len(line) == 0


async def test_a_waiter_expires_at_its_deadline(line: WaitingLine, clock: ManualClock) -> None:
    await acquire(line, 0)
    waiter = asyncio.ensure_future(line.acquire("s1", clock() + 1.2))
    await until(lambda: len(line) == 1)
    clock.advance(1.0)
    await settle()
    assert not waiter.done()
    clock.advance(0.1)
    await settle()
    assert not waiter.done(), "before its deadline it keeps waiting"
    clock.advance(0.1000001)
    await until(waiter.done)
    with pytest.raises(Expired):
        waiter.result()
    assert len(line) == 0


async def test_when_every_endpoint_is_down_waiters_with_a_fallback_leave_at_once(
    line: WaitingLine, clock: ManualClock
) -> None:
    router = line.router
    await acquire(line, 0)
    with_fallback, without = acquire(line, 1, can_fall_back=True), acquire(line, 2)
    await until(lambda: len(line) == 2)
    router.failed(URL, clock(), "refused")  # the held request fails ...
    for _ in range(2):  # ... and two more: the circuit opens
        router.endpoints[URL].in_flight += 1
        router.failed(URL, clock(), "refused")
    line.wake()
    await until(with_fallback.done)
    with pytest.raises(Unavailable):
        with_fallback.result()
    await asyncio.sleep(0)
    assert not without.done(), "without a fallback it waits for the endpoint to come back"
    assert len(line) == 1
    without.cancel()


def ticketed(line: WaitingLine, id_: str, tenant: str, priority: str = "interactive") -> asyncio.Task[Slot]:
    ticket = Ticket(id_, tenant, priority, session_id=f"s-{id_}")
    return asyncio.ensure_future(line.acquire(ticket.session_id, line.clock() + 30, ticket=ticket))


async def test_freed_slots_go_to_interactive_requests_before_batch_ones_that_waited_longer(
    line: WaitingLine,
) -> None:
    router = line.router
    await acquire(line, 0)
    batch = [ticketed(line, f"b{i}", "a", "batch") for i in range(3)]
    await until(lambda: len(line) == 3)
    interactive = ticketed(line, "i0", "b")
    await until(lambda: len(line) == 4)
    router.succeeded(URL, 0.1)
    line.wake()
    await until(interactive.done)
    assert not any(b.done() for b in batch)
    for task in batch:
        task.cancel()


async def test_a_newcomer_does_not_take_a_free_slot_from_those_waiting_their_turn(line: WaitingLine) -> None:
    router = line.router
    await acquire(line, 0)
    waiting = ticketed(line, "w", "a")
    await until(lambda: len(line) == 1)
    router.succeeded(URL, 0.1)  # a slot frees, no wake-up yet ...
    newcomer = ticketed(line, "n", "b", "batch")  # ... and a batch newcomer finds it free
    await until(waiting.done)
    assert not newcomer.done() and len(line) == 1, "the slot went to the one whose turn it was"
    newcomer.cancel()


async def test_the_report_lists_waiters_in_starting_order_with_their_expected_start(
    line: WaitingLine, clock: ManualClock
) -> None:
    router = line.router
    router.endpoints[URL].seconds_per_request = 2.0  # measured: one request takes 2 s, one at a time
    held = await acquire(line, 0)
    waiters = [ticketed(line, "b0", "a", "batch"), ticketed(line, "i0", "a"), ticketed(line, "i1", "b")]
    await until(lambda: len(line) == 3)
    clock.advance(0.5)
    waiting, running, rate = line.report(clock(), 100)
    assert [w["id"] for w in waiting] == ["i0", "i1", "b0"]
    assert [w["position"] for w in waiting] == [0, 1, 2]
    assert [w["eta_s"] for w in waiting] == [1.5, 3.5, 5.5], "the running one ends in 1.5 s, then 2 s each"
    assert [r["running_s"] for r in running] == [0.5] and rate == 0.5
    held.released()
    for task in waiters:
        task.cancel()
