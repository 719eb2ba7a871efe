"""The one clock of the answering path: what time it is, and every wait on time.

Deadlines, backoff, waiting for a slot, probing and (in the memory backend) call
timeouts all go through a :class:`Clock`. The worker uses :class:`SystemClock`; tests
use :class:`ManualClock`, whose time moves only when the test says so, so a five-second
circuit cool-down or a deadline passes in microseconds and deterministically.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    def __call__(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait_for(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait until ``event`` is set (``True``) or ``timeout`` seconds passed (``False``)."""
        ...


class SystemClock:
    """Real time: ``now`` (``time.monotonic`` unless told otherwise) and asyncio's timers."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now

    def __call__(self) -> float:
        return self._now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_for(self, event: asyncio.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        try:  # a timeout scope, not asyncio.wait_for: no task per wait (a waiting request's each turn)
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        return True


def as_clock(clock: Callable[[], float] | Clock) -> Clock:
    """A plain ``() -> float`` (the old ``clock=`` argument) becomes a clock with real waits."""
    return clock if isinstance(clock, Clock) else SystemClock(clock)


class ManualClock:
    """Time that moves only on :meth:`advance`; sleeps and timed waits end when it passes them."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self._now

    def _timer(self, seconds: float) -> asyncio.Future[None]:
        """A future done when time reaches now + ``seconds``; due from the moment it is asked for."""
        timer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if seconds <= 0:
            timer.set_result(None)
            return timer
        heapq.heappush(self._timers, (self._now + seconds, next(self._seq), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        timer = self._timer(seconds)
        try:
            await timer
        finally:
            timer.cancel()  # a cancelled sleep leaves a done timer behind, skipped when due

    async def wait_for(self, event: asyncio.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        timer = self._timer(timeout)
        waiting = asyncio.ensure_future(event.wait())
        try:
            both: set[asyncio.Future[Any]] = {waiting, timer}
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            timer.cancel()
        return event.is_set()

    def pending(self) -> list[float]:
        """When the live timers are due, soonest first."""
        return sorted(when for when, _, timer in self._timers if not timer.done())

    def advance(self, seconds: float) -> None:
        """Move time forward and end every sleep that is now due."""
        self._now += seconds
        while self._timers and self._timers[0][0] <= self._now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.done():
                timer.set_result(None)

    def advance_to_next(self) -> bool:
        """Jump to the soonest live timer; ``False`` when no one is waiting on time."""
        due = self.pending()
        if not due:
            return False
        self.advance(max(0.0, due[0] - self._now))
        return True
