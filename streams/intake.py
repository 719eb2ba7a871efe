"""A lane's intake: the records its stream delivers, handed to the worker in batches.

:class:`ReadyBatches` is the buffer between the reader (a task iterating the Faust stream) and
the lane's agent, applying :class:`streams.batching.BatchWindow`: a batch goes as soon as the
stream has nothing more ready, so a lone request is never held for a window (Faust's
``noack_take`` waited out ``within`` whatever came). Each item keeps the wall-clock time it
arrived (the ``fetched`` stage of the response's ``nexus-stages`` header).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from streams.batching import BatchWindow

T = TypeVar("T")


class ReadyBatches(Generic[T]):
    """Items put by one reader, taken in batches by one consumer (``async for batch in ...``).

    ``put`` waits while a full batch is not taken yet (back-pressure, as ``noack_take`` did);
    ``fail`` ends the iteration with the reader's error once what was read is handed over;
    ``close`` ends it without one.
    """

    def __init__(self, window: BatchWindow, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._window = window
        self._clock = clock
        self._wall = wall
        self._items: list[tuple[T, float]] = []
        self._first = 0.0
        self._arrived = asyncio.Event()
        self._taken = asyncio.Event()
        self._error: BaseException | None = None
        self._closed = False

    async def put(self, item: T) -> None:
        """Add ``item`` (stamped with the wall-clock time); waits while the batch is full."""
        while self._window.full(len(self._items)):
            self._taken.clear()
            await self._taken.wait()
        if not self._items:
            self._first = self._clock()
        self._items.append((item, self._wall()))
        self._arrived.set()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._arrived.set()

    def close(self) -> None:
        self._closed = True
        self._arrived.set()

    async def get(self) -> list[tuple[T, float]]:
        """The next batch: items with their arrival times, in order; raises the reader's error,
        or StopAsyncIteration once closed, when nothing is left."""
        while not self._items:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            self._arrived.clear()
            await self._arrived.wait()
        idle = 0
        while not (self._error is not None or self._closed
                   or self._window.hand_over(len(self._items), idle, self._clock() - self._first)):
            held = len(self._items)
            await asyncio.sleep(0)  # one turn of the loop: whatever is on its way arrives
            idle = idle + 1 if len(self._items) == held else 0
        batch, self._items = self._items, []
        self._taken.set()
        return batch

    def __aiter__(self) -> AsyncIterator[list[tuple[T, float]]]:
        return self

    async def __anext__(self) -> list[tuple[T, float]]:
        return await self.get()
