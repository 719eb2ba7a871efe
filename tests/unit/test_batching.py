"""The worker's batches: what a lane's queue holds when the worker asks (a lone request goes at once,
what arrived together goes together, at most ``max_batch``), events of an earlier consumer
generation dropped, an error thrown into the channel raised after what came before it.

The queue is mode's ``ThrowableQueue``, the one Faust's conductor fills; no timing (each test is
bounded by ``asyncio.wait_for`` only as a guard)."""

from __future__ import annotations

import asyncio

import pytest
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from schemas import headers
from streams.intake import LaneBatches
from streams.worker import Answering

GUARD_S = 30.0


def queue_of(*items: object) -> ThrowableQueue:
    queue: ThrowableQueue = ThrowableQueue(maxsize=100, flow_control=FlowControlEvent(initially_suspended=False))
    for item in items:
        queue.put_nowait(item)
    return queue


async def test_a_lone_request_goes_at_once_stamped_when_taken() -> None:
    batches: LaneBatches[str] = LaneBatches(queue_of("r1"), 32, wall=lambda: 12.5)
    assert await asyncio.wait_for(batches.get(), GUARD_S) == [("r1", 12.5)]


async def test_what_arrived_together_goes_together_and_a_full_batch_leaves_the_rest_queued() -> None:
    queue = queue_of(*range(5))
    batches: LaneBatches[int] = LaneBatches(queue, 2)
    sizes = [len(await asyncio.wait_for(batches.get(), GUARD_S)) for _ in range(3)]
    assert sizes == [2, 2, 1] and queue.empty()
    whole: LaneBatches[int] = LaneBatches(queue_of(*range(10)), 32)
    assert [item for item, _ in await whole.get()] == list(range(10))


async def test_the_worker_waits_for_the_first_request_and_takes_it_when_put() -> None:
    queue = queue_of()
    batches: LaneBatches[str] = LaneBatches(queue, 32)
    getting = asyncio.ensure_future(batches.get())
    for _ in range(10):
        await asyncio.sleep(0)
    assert not getting.done()
    queue.put_nowait("late")
    assert [item for item, _ in await asyncio.wait_for(getting, GUARD_S)] == ["late"]


async def test_events_of_an_earlier_generation_are_dropped_and_a_batch_of_only_those_is_none() -> None:
    queue = queue_of("old-1", "old-2")
    batches: LaneBatches[str] = LaneBatches(queue, 32, current=lambda e: not e.startswith("old"))
    getting = asyncio.ensure_future(batches.get())
    for _ in range(10):
        await asyncio.sleep(0)
    assert not getting.done() and queue.empty(), "the stale ones were taken and dropped; it waits on"
    queue.put_nowait("new")
    queue.put_nowait("old-3")
    queue.put_nowait("newer")
    assert [item for item, _ in await asyncio.wait_for(getting, GUARD_S)] == ["new", "newer"]


async def test_an_error_thrown_into_the_channel_comes_after_the_events_before_it() -> None:
    queue = queue_of("read")
    batches: LaneBatches[str] = LaneBatches(queue, 32)
    getting = asyncio.ensure_future(batches.get())
    await asyncio.sleep(0)
    queue._throw(RuntimeError("consumer crashed"))
    assert [item for item, _ in await asyncio.wait_for(getting, GUARD_S)] == ["read"]
    with pytest.raises(RuntimeError, match="consumer crashed"):
        await batches.get()
    queue2 = queue_of("a", "b")
    queue2._throw(RuntimeError("later"))
    mixed: LaneBatches[str] = LaneBatches(queue2, 32)
    with pytest.raises(RuntimeError, match="later"):  # mode's queue raises a thrown error first
        await mixed.get()


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
