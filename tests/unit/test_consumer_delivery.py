"""The worker's Kafka consumer (streams/consumer.py): on the worker's own loop, and each record
delivered in the fetch loop's own turn when its delivery does not wait, else exactly as a task
would run it (waits, results, errors and cancels all reach the delivery)."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path

import pytest

from nexus.settings import Settings
from streams.app import create_app
from streams.consumer import SameLoopConsumer, SameLoopConsumerThread, run_now
from tests.eventually import eventually

GUARD_S = 30.0


async def test_a_delivery_that_does_not_wait_runs_in_the_callers_turn_without_a_task() -> None:
    ran: list[str] = []

    async def deliver() -> int:
        ran.append("delivered")
        return 7

    tasks = len(asyncio.all_tasks())
    assert run_now(deliver()) == (True, 7)
    assert ran == ["delivered"] and len(asyncio.all_tasks()) == tasks


async def test_a_delivery_that_fails_at_once_raises_to_the_caller() -> None:
    async def deliver() -> None:
        raise ValueError("undecodable")

    with pytest.raises(ValueError, match="undecodable"):
        run_now(deliver())


async def test_a_delivery_that_waits_goes_on_once_what_it_waits_for_is_done() -> None:
    room = asyncio.get_running_loop().create_future()
    seen: list[object] = []

    async def deliver() -> str:
        seen.append("started")
        seen.append(await room)  # a full stream buffer: waits for room
        await asyncio.sleep(0)  # a bare yield too
        return "put"

    finished, rest = run_now(deliver())
    assert not finished and seen == ["started"]
    going = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    assert not going.done()
    room.set_result("room")
    assert await asyncio.wait_for(going, GUARD_S) == "put"
    assert seen == ["started", "room"]


async def test_an_error_of_what_it_waits_for_is_raised_inside_the_delivery() -> None:
    room = asyncio.get_running_loop().create_future()

    async def deliver() -> str:
        try:
            await room
        except ConnectionError as exc:
            return f"handled {exc}"
        return "not reached"

    finished, rest = run_now(deliver())
    assert not finished
    going = asyncio.ensure_future(rest)
    room.set_exception(ConnectionError("gone"))
    assert await asyncio.wait_for(going, GUARD_S) == "handled gone"


async def test_a_cancel_reaches_the_waiting_delivery_and_what_it_waits_for() -> None:
    room = asyncio.get_running_loop().create_future()
    cleaned: list[str] = []

    async def deliver() -> None:
        try:
            await room
        finally:
            cleaned.append("cleaned up")

    finished, rest = run_now(deliver())
    assert not finished
    going = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    going.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(going, GUARD_S)
    assert cleaned == ["cleaned up"] and room.cancelled()


@pytest.fixture
async def consumer(tmp_path: Path) -> SameLoopConsumer:
    """The worker app's own consumer, made as the worker makes it (not started: no broker)."""
    app = create_app(Settings(), data_dir=tmp_path)
    made = app.consumer
    assert isinstance(made, SameLoopConsumer)
    return made


async def test_the_workers_consumer_runs_on_the_apps_loop_without_a_thread(consumer: SameLoopConsumer) -> None:
    thread = consumer._thread
    assert isinstance(thread, SameLoopConsumerThread)
    assert thread.thread_loop is thread.parent_loop
    assert await thread.call_thread(asyncio.sleep, 0, "called") == "called"


async def test_a_record_is_delivered_without_waiting_and_the_flow_wait_is_not_left_behind(
    consumer: SameLoopConsumer,
) -> None:
    delivered: list[int] = []
    delivering: list[asyncio.Task[object] | None] = []

    async def callback(offset: int) -> None:
        delivered.append(offset)
        delivering.append(asyncio.current_task())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a coroutine never awaited would warn
        results = await consumer.wait_first(callback(1), consumer.suspend_flow.wait())
    assert delivered == [1] and not results.stopped and results.results == [None]
    assert delivering == [asyncio.current_task()]  # in the fetch loop's own turn, no task of its own


async def test_a_delivery_held_up_is_abandoned_when_the_flow_stops(consumer: SameLoopConsumer) -> None:
    room = asyncio.get_running_loop().create_future()

    async def callback() -> None:
        await room  # the stream's buffer stays full

    flow_stopped = consumer.suspend_flow.wait()
    waiting = asyncio.ensure_future(consumer.wait_first(callback(), flow_stopped))
    await asyncio.sleep(0)
    assert not waiting.done()
    consumer.stop_flow()  # a rebalance: Faust drops what it was delivering
    results = await asyncio.wait_for(waiting, GUARD_S)
    assert results.done == [flow_stopped]
    assert await eventually(room.cancelled, "the abandoned delivery cancelled")
