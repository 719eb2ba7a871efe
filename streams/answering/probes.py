"""Health probes of endpoints whose circuit is open, and the loop that keeps looking for them.

Probing only when a request waits would leave a recovered endpoint shut for good while
its siblings keep up with the traffic, and show it open with no traffic: so a background
loop asks every model's waiting line for due probes, started with the first request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

from streams.answering.clock import Clock
from streams.backends.base import Backend

PROBE_TIMEOUT_S = 2.0
PROBE_POLL_S = 0.25  # how often open circuits are checked for a due probe


class HasProbes(Protocol):
    def probe_due(self, now: float) -> None: ...


class CircuitProbes:
    """Runs probes through the backend in the background; each tells its result to ``done``."""

    def __init__(self, backend: Backend, clock: Clock) -> None:
        self._backend = backend
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None

    def start(self, url: str, done: Callable[[bool], None]) -> None:
        async def probe() -> None:
            ok = False
            try:
                ok = await self._backend.probe(url, PROBE_TIMEOUT_S)
            finally:
                done(ok)  # a cancelled or broken probe is a failed one: the circuit opens again

        task = asyncio.ensure_future(probe())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def watch(self, lines: Iterable[HasProbes]) -> None:
        """Keep probing ``lines``' open circuits in the background (a no-op once running)."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch(tuple(lines)))

    async def _watch(self, lines: tuple[HasProbes, ...]) -> None:
        while True:
            now = self._clock()
            for line in lines:
                line.probe_due(now)
            await self._clock.sleep(PROBE_POLL_S)

    async def aclose(self) -> None:
        """Stop probing (before the HTTP client the backend uses is closed)."""
        tasks = [t for t in (self._watcher, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
