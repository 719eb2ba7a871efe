"""Background tasks that log when they die, start again, and say so to ``/health``.

Why: a reader that follows a topic for the whole life of a process (the gateway's
reply and model readers, the bridge's) used to die silently, and the process kept
answering ``/health`` with ``ok`` while every call it served failed. A
:class:`Background` runs each such loop, logs its failure with the traceback,
restarts it after a growing pause, and reports each task's state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["Background", "TaskState"]

log = logging.getLogger(__name__)

RESTART_PAUSE_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # then 10 s between attempts
STABLE_S = 30.0  # a task that ran this long before failing starts its pauses again from the first


@dataclass
class TaskState:
    """What ``/health`` says about one background task."""

    name: str
    running: bool = False
    restarts: int = 0
    last_error: str | None = None
    failed_at: float | None = None
    _since: float = field(default=0.0, repr=False)

    def report(self) -> dict[str, object]:
        return {"running": self.running, "restarts": self.restarts, "last_error": self.last_error,
                "failed_at": self.failed_at}


class Background:
    """A set of long-running loops, each restarted when it fails.

    ``start(name, loop)`` runs ``loop()`` until it returns (the task is done) or
    raises (logged, restarted after a pause). ``healthy`` is false while any task
    is between a failure and its restart; ``report()`` gives the details.
    """

    def __init__(self, pauses: tuple[float, ...] = RESTART_PAUSE_S) -> None:
        self._pauses = pauses
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.states: dict[str, TaskState] = {}

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        if name in self._tasks:
            raise ValueError(f"a background task named {name!r} is already running")
        state = self.states[name] = TaskState(name)
        self._tasks[name] = asyncio.create_task(self._supervise(state, loop), name=name)

    @property
    def healthy(self) -> bool:
        return all(s.running or s.last_error is None for s in self.states.values())

    def report(self) -> dict[str, dict[str, object]]:
        return {name: state.report() for name, state in self.states.items()}

    async def aclose(self) -> None:
        """Cancel every task and wait for it to finish."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _supervise(self, state: TaskState, loop: Callable[[], Awaitable[None]]) -> None:
        failures = 0
        while True:
            state.running, state._since = True, time.monotonic()
            try:
                await loop()
                state.running = False
                return
            except asyncio.CancelledError:
                state.running = False
                raise
            except Exception as exc:
                state.running = False
                state.last_error = f"{type(exc).__name__}: {exc}"
                state.failed_at = time.time()
                if time.monotonic() - state._since >= STABLE_S:
                    failures = 0
                pause = self._pauses[min(failures, len(self._pauses) - 1)]
                failures += 1
                log.error("%s failed; starting it again in %.1f s", state.name, pause, exc_info=exc)
            await asyncio.sleep(pause)
            state.restarts += 1
