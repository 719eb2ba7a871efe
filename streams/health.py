"""What the worker's ``/health`` says: failures of its own tasks, recent enough to matter.

A failed task is also logged with its request and counted in ``nexus_worker_task_failures``;
this keeps the last ones so an operator sees them where they look first.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    at: float
    what: str  # the request id, or the task
    error: str


class WorkerHealth:
    """Unhealthy while a task failed within the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self._window_s = window_s
        self._clock = clock
        self._failures: deque[Failure] = deque(maxlen=20)
        self.total = 0

    def failed(self, what: str, error: BaseException | str) -> None:
        self.total += 1
        self._failures.append(Failure(self._clock(), what, error if isinstance(error, str) else repr(error)))

    def recent(self) -> list[Failure]:
        since = self._clock() - self._window_s
        return [f for f in self._failures if f.at >= since]

    def report(self, **details: object) -> tuple[bool, dict[str, object]]:
        """(healthy, the JSON body of ``/health``)."""
        recent = self.recent()
        body: dict[str, object] = {
            "status": "ok" if not recent else "failing",
            "task_failures_total": self.total,
            "recent_failures": [{"at": f.at, "what": f.what, "error": f.error} for f in recent],
            **details,
        }
        return not recent, body
