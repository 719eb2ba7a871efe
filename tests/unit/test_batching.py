"""The worker's batches: handed over as soon as the stream has nothing more ready (a lone request
is never held for the window), full ones at once, a steady trickle at most the window after its
first request; the reader waits while a full batch is not taken; its failure reaches the agent.

No timing: the window is an hour unless a test moves the fake clock, so a batch that waited for it
would never come (each test is bounded by ``asyncio.wait_for`` only as a guard)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from schemas import headers
from streams.batching import IDLE_TURNS, BatchWindow
from streams.intake import ReadyBatches
from streams.worker import Answering, read_into

HOUR = 3600.0
GUARD_S = 30.0


def test_the_rule_hands_over_when_full_idle_or_the_window_is_out() -> None:
    window = BatchWindow(max_batch=4, within_s=0.005, idle_turns=2)
    assert not window.hand_over(0, idle_turns=10, since_first_s=1.0)  # nothing to hand over
    assert not window.hand_over(1, idle_turns=1, since_first_s=0.0)  # something may still be on its way
    assert window.hand_over(1, idle_turns=2, since_first_s=0.0)  # nothing more ready: no window for it
    assert window.hand_over(3, idle_turns=0, since_first_s=0.005)  # a trickle: held at most the window
    assert window.hand_over(4, idle_turns=0, since_first_s=0.0)  # full
    assert window.full(4) and not window.full(3)


async def test_a_lone_request_goes_at_once_not_after_the_window() -> None:
    batches: ReadyBatches[str] = ReadyBatches(BatchWindow(32, HOUR), wall=lambda: 12.5)
    await batches.put("r1")
    assert await asyncio.wait_for(batches.get(), GUARD_S) == [("r1", 12.5)]


async def test_what_arrives_together_goes_together() -> None:
    batches: ReadyBatches[int] = ReadyBatches(BatchWindow(32, HOUR))

    async def burst() -> None:  # one fetch handed over a record per turn of the loop or two
        for i in range(10):
            await batches.put(i)
            for _ in range(i % 2 + 1):
                await asyncio.sleep(0)

    getting = asyncio.ensure_future(batches.get())
    await burst()
    batch = await asyncio.wait_for(getting, GUARD_S)
    assert [item for item, _ in batch] == list(range(10))


async def test_a_full_batch_goes_at_once_and_holds_the_reader_until_taken() -> None:
    batches: ReadyBatches[int] = ReadyBatches(BatchWindow(2, HOUR))
    putting = asyncio.ensure_future(asyncio.gather(*(batches.put(i) for i in range(5))))
    for _ in range(IDLE_TURNS * 4):
        await asyncio.sleep(0)
    assert not putting.done()  # 2 held, the third waits for the batch to be taken
    sizes: list[int] = []
    while sum(sizes) < 5:
        sizes.append(len(await asyncio.wait_for(batches.get(), GUARD_S)))
    await putting
    assert sizes == [2, 2, 1]


async def test_a_steady_trickle_is_held_no_longer_than_the_window() -> None:
    now = [0.0]
    batches: ReadyBatches[int] = ReadyBatches(BatchWindow(1000, 0.005), clock=lambda: now[0])
    stop = asyncio.Event()

    async def trickle() -> None:  # a record every turn, each 1 ms later: never idle
        i = 0
        while not stop.is_set():
            await batches.put(i)
            i += 1
            now[0] += 0.001
            await asyncio.sleep(0)

    feeding = asyncio.ensure_future(trickle())
    try:
        batch = await asyncio.wait_for(batches.get(), GUARD_S)
    finally:
        stop.set()
        await feeding
    assert 1 < len(batch) <= 7  # handed over once the first had waited the 5 ms window


async def test_the_readers_failure_ends_the_batches_after_what_was_read() -> None:
    batches: ReadyBatches[str] = ReadyBatches(BatchWindow(32, HOUR))
    await batches.put("read")
    batches.fail(RuntimeError("consumer crashed"))
    assert [item for item, _ in await batches.get()] == ["read"]
    with pytest.raises(RuntimeError, match="consumer crashed"):
        await batches.get()


async def test_closed_batches_end_the_iteration() -> None:
    batches: ReadyBatches[str] = ReadyBatches(BatchWindow(32, HOUR))
    await batches.put("last")
    batches.close()
    assert [[item for item, _ in batch] async for batch in batches] == [["last"]]


def test_an_answers_stages_go_into_the_stages_header_in_order() -> None:
    answering = Answering(["p0:1"], fetched=100.0015, batched=100.002)
    answering.calls()
    assert answering.dispatched is not None
    dispatched = answering.dispatched
    answering.calls()  # a retry: the first call's start stays
    assert answering.dispatched == dispatched
    stages = answering.stages(100.0, 100.5)
    value = headers.stages_value({**stages, "sent": 100.501})
    assert value.startswith(b"appended=100000.000,fetched=100001.500,batched=100002.000,dispatched=")
    read = headers.read_stages(value + b",junk,later=x")
    assert list(read) == list(headers.STAGE_NAMES)
    assert read["fetched"] == pytest.approx(100.0015) and read["sent"] == pytest.approx(100.501)
    cached = Answering(["p0:2"], fetched=1.0, batched=1.0).stages(None, 2.0)  # no model call, no timestamp
    assert list(cached) == ["fetched", "batched", "answered"]


class _Stream:
    """What read_into uses of a Faust stream: ``enable_acks`` and ``events()``."""

    def __init__(self, events: list[str], error: Exception | None = None) -> None:
        self.enable_acks = True
        self._events = events
        self._error = error

    async def events(self) -> Any:
        for event in self._events:
            yield event
        if self._error is not None:
            raise self._error


async def test_the_lanes_reader_puts_its_events_unacked_and_ends_with_its_stream() -> None:
    stream = _Stream(["e1", "e2"])
    batches: ReadyBatches[str] = ReadyBatches(BatchWindow(32, HOUR))
    await read_into(stream, batches)  # type: ignore[arg-type]
    assert stream.enable_acks is False  # the worker commits from its ledger, not Faust's acks
    assert [[e for e, _ in batch] async for batch in batches] == [["e1", "e2"]]


async def test_the_lanes_reader_hands_its_failure_to_the_agent() -> None:
    batches: ReadyBatches[str] = ReadyBatches(BatchWindow(32, HOUR))
    await read_into(_Stream(["e1"], RuntimeError("fetch failed")), batches)  # type: ignore[arg-type]
    assert [e for e, _ in await batches.get()] == ["e1"]
    with pytest.raises(RuntimeError, match="fetch failed"):
        await batches.get()
