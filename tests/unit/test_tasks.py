"""nexus.tasks.Background: failing loops are logged, restarted after a pause and reported."""

from __future__ import annotations

import asyncio
import logging

import pytest

from nexus.tasks import Background, TaskState
from tests.eventually import eventually


class Pauses:
    """A ``sleep`` for Background that records each pause and waits until the test lets it end."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self._go = asyncio.Semaphore(0)

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        await self._go.acquire()

    def end_one(self) -> None:
        self._go.release()


class Script:
    """A loop whose every run does what the test puts in its queue: fail, return, or block."""

    def __init__(self) -> None:
        self.runs = 0
        self.actions: asyncio.Queue[BaseException | None] = asyncio.Queue()

    async def loop(self) -> None:
        self.runs += 1
        action = await self.actions.get()  # blocks, like a reader following a topic
        if action is not None:
            raise action


def waiting(state: TaskState) -> bool:
    return state.status == "restarting"


async def test_a_failing_loop_is_logged_restarted_after_a_pause_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    pauses, script = Pauses(), Script()
    background = Background((0.5, 1.0), sleep=pauses.sleep)
    state = background.start("reader", script.loop)
    await eventually(lambda: script.runs == 1, "the first run", interval=0.001)
    assert background.healthy and state.up and state.report()["status"] == "running"

    with caplog.at_level(logging.ERROR, logger="nexus.tasks"):
        script.actions.put_nowait(ConnectionError("broker gone"))
        await eventually(lambda: waiting(state), "the failure", interval=0.001)
    # Down until restarted: /health says so, with the error.
    assert not background.healthy and not state.up
    assert background.report()["reader"] == {
        "running": False, "up": False, "status": "restarting", "restarts": 0,
        "last_error": "ConnectionError: broker gone", "failed_at": state.failed_at,
    }
    assert state.failed_at is not None
    [record] = caplog.records
    assert "reader failed; starting it again in 0.5 s" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ConnectionError  # with the traceback
    assert pauses.asked == [0.5] and script.runs == 1  # nothing runs during the pause

    pauses.end_one()
    await eventually(lambda: script.runs == 2, "the restart", interval=0.001)
    assert background.healthy and state.up and state.restarts == 1
    assert state.last_error == "ConnectionError: broker gone"  # kept for the record
    await background.aclose()
    assert state.status == "stopped"


async def test_pauses_grow_while_failures_follow_each_other_and_start_over_after_a_stable_run() -> None:
    now = [0.0]
    pauses, script = Pauses(), Script()
    background = Background((0.5, 1.0, 2.0), stable_s=30.0, sleep=pauses.sleep, clock=lambda: now[0])
    state = background.start("reader", script.loop)
    for expected in (0.5, 1.0, 2.0, 2.0):
        script.actions.put_nowait(RuntimeError("again"))
        await eventually(lambda: waiting(state), "a failure", interval=0.001)
        assert pauses.asked[-1] == expected
        pauses.end_one()
        await eventually(lambda: state.running, "a restart", interval=0.001)
    now[0] += 30.0  # this run lasts: the next failure is a first one again
    script.actions.put_nowait(RuntimeError("after a long run"))
    await eventually(lambda: waiting(state), "a failure", interval=0.001)
    assert pauses.asked == [0.5, 1.0, 2.0, 2.0, 0.5]
    assert state.restarts == 4
    await background.aclose()


async def test_a_cancelled_loop_is_not_restarted() -> None:
    pauses, script = Pauses(), Script()
    background = Background(sleep=pauses.sleep)
    state = background.start("reader", script.loop)
    await eventually(lambda: script.runs == 1, "the first run", interval=0.001)
    await background.stop("reader")
    assert state.status == "stopped" and not state.up
    assert pauses.asked == [] and script.runs == 1
    assert background.report() == {} and background.healthy  # stop() forgets it
    background.start("reader", script.loop)  # the name is free again
    await eventually(lambda: script.runs == 2, "the second start", interval=0.001)
    await background.aclose()
    assert script.runs == 2


async def test_a_loop_cancelled_during_its_pause_stays_stopped() -> None:
    pauses, script = Pauses(), Script()
    background = Background(sleep=pauses.sleep)
    state = background.start("reader", script.loop)
    script.actions.put_nowait(OSError("x"))
    await eventually(lambda: waiting(state), "the failure", interval=0.001)
    await background.aclose()
    assert state.status == "stopped" and script.runs == 1 and background.healthy


async def test_a_loop_that_returns_is_done_and_healthy() -> None:
    script = Script()
    background = Background()
    state = background.start("once", script.loop)
    script.actions.put_nowait(None)
    await eventually(lambda: state.status == "done", "the return", interval=0.001)
    assert background.healthy and not state.running and script.runs == 1
    background.start("once", script.loop)  # a finished task's name may be used again
    await background.aclose()


async def test_a_running_loop_that_is_not_ready_is_down() -> None:
    ready = [False]
    script = Script()
    background = Background()
    state = background.start("reader", script.loop, ready=lambda: ready[0])
    await eventually(lambda: script.runs == 1, "the first run", interval=0.001)
    assert state.running and not state.up and not background.healthy
    ready[0] = True
    assert state.up and background.healthy
    await background.aclose()


async def test_a_second_task_of_the_same_name_is_refused() -> None:
    background = Background()
    background.start("reader", Script().loop)
    with pytest.raises(ValueError, match="'reader' is already running"):
        background.start("reader", Script().loop)
    await background.aclose()


def test_pauses_must_be_given() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        Background(())
    with pytest.raises(ValueError, match="seconds >= 0"):
        Background((1.0, -1.0))
    background = Background((0.5, 1.0))
    assert [background.pause(n) for n in (1, 2, 3, 9)] == [0.5, 1.0, 1.0, 1.0]
