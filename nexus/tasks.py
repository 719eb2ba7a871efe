"""Background tasks that log when they die, start again, and say so to ``/health``.

Why: a reader that follows a topic for the whole life of a process (the gateway's
reply and model readers, the bridge's) used to die silently, and the process kept
answering ``/health`` with ``ok`` while every call it served failed. A
:class:`Background` runs each such loop, logs its failure with the traceback,
restarts it after a growing pause, and reports each task's state.

A loop that returns is done (not restarted); a cancelled one is stopped (not
restarted either). A loop may come with a ``ready`` probe: until it says so the task
counts as down, e.g. a reader that is connecting again and has not fixed its
positions yet, so ``/health`` stays red until the restart really is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Background", "TaskState"]

log = logging.getLogger(__name__)

RESTART_PAUSE_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # then 10 s between attempts
STABLE_S = 30.0  # a task that ran this long before failing starts its pauses again from the first

Status = Literal["running", "restarting", "done", "stopped"]


@dataclass
class TaskState:
    """What ``/health`` says about one background task.

    ``status``: ``running`` (its loop runs), ``restarting`` (it failed and waits for
    its pause), ``done`` (its loop returned) or ``stopped`` (cancelled).
    """

    name: str
    status: Status = "running"
    restarts: int = 0
    last_error: str | None = None
    failed_at: float | None = None  # seconds since the epoch, of the last failure
    ready: Callable[[], bool] | None = field(default=None, repr=False, compare=False)

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def up(self) -> bool:
        """Running, and ready if the task has a readiness probe."""
        return self.running and (self.ready is None or bool(self.ready()))

    @property
    def healthy(self) -> bool:
        """Up, or ended on purpose; a task waiting for its restart (or its readiness) is not."""
        return self.up or self.status in ("done", "stopped")

    def report(self) -> dict[str, object]:
        return {"running": self.running, "up": self.up, "status": self.status, "restarts": self.restarts,
                "last_error": self.last_error, "failed_at": self.failed_at}


class Background:
    """A set of long-running loops, each restarted when it fails.

    ``start(name, loop)`` runs ``loop()`` until it returns (the task is done) or
    raises (logged with the traceback, restarted after a pause). ``healthy`` is false
    while any task is between a failure and being up again; ``report()`` gives the
    details. ``sleep`` and ``clock`` are there for tests.
    """

    def __init__(
        self,
        pauses: tuple[float, ...] = RESTART_PAUSE_S,
        stable_s: float = STABLE_S,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not pauses or any(p < 0 for p in pauses):
            raise ValueError(f"restart pauses must be a non-empty tuple of seconds >= 0, got {pauses!r}")
        self._pauses = pauses
        self._stable_s = stable_s
        self._sleep = sleep
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.states: dict[str, TaskState] = {}

    def start(
        self, name: str, loop: Callable[[], Awaitable[None]], *, ready: Callable[[], bool] | None = None
    ) -> TaskState:
        """Run ``loop`` under supervision; ``ready`` (optional) says when a running loop is really up."""
        running = self._tasks.get(name)
        if running is not None and not running.done():
            raise ValueError(f"a background task named {name!r} is already running")
        state = self.states[name] = TaskState(name, ready=ready)
        self._tasks[name] = asyncio.create_task(self._supervise(state, loop), name=name)
        return state

    def pause(self, failures: int) -> float:
        """The pause before the restart that follows ``failures`` failures in a row (1 or more)."""
        return self._pauses[min(failures, len(self._pauses)) - 1]

    @property
    def healthy(self) -> bool:
        return all(state.healthy for state in self.states.values())

    def report(self) -> dict[str, dict[str, object]]:
        return {name: state.report() for name, state in self.states.items()}

    async def stop(self, name: str) -> None:
        """Cancel one task, wait for it, and forget it; a no-op for an unknown name."""
        task = self._tasks.pop(name, None)
        state = self.states.pop(name, None)
        await self._cancel([task] if task else [], [state] if state else [])

    async def aclose(self) -> None:
        """Cancel every task and wait for it to finish."""
        tasks, self._tasks = list(self._tasks.values()), {}
        await self._cancel(tasks, list(self.states.values()))

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task[None]], states: list[TaskState]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for state in states:  # also those cancelled before their loop ever ran
            if state.status in ("running", "restarting"):
                state.status = "stopped"

    async def _supervise(self, state: TaskState, loop: Callable[[], Awaitable[None]]) -> None:
        failures = 0
        try:
            while True:
                state.status, since = "running", self._clock()
                try:
                    await loop()
                except Exception as exc:
                    state.status = "restarting"
                    state.last_error = f"{type(exc).__name__}: {exc}"
                    state.failed_at = time.time()
                    failures = 1 if self._clock() - since >= self._stable_s else failures + 1
                    pause = self.pause(failures)
                    log.error("background task %s failed; starting it again in %.1f s", state.name, pause,
                              exc_info=exc)
                else:
                    state.status = "done"
                    log.info("background task %s finished", state.name)
                    return
                await self._sleep(pause)
                state.restarts += 1
                log.warning("starting background task %s again (restart %d)", state.name, state.restarts)
        except BaseException:  # cancelled (stop) or the process is going down: not restarted
            state.status = "stopped"
            raise
