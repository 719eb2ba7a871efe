"""A lane's intake: the records Faust fetched for it, handed to the worker in batches.

Faust's conductor puts the event of each record the consumer fetched into the queue of the
lane's channel, every record of one fetch in the same turn of the event loop (the consumer
delivers a fetch in one go: streams/consumer.py). :class:`LaneBatches` takes them from that
queue: a batch is whatever the queue holds when the worker asks, at least one event and at most
``worker.max_batch``. A lone request goes at once, the records of a fetch go together, and
nothing waits for company, which would gain nothing.

Faust's own stream over that queue handed the events out one per turn of the loop (each with a
``sleep(0)``, its sensors and its current event), so a batch had to wait a few idle turns to be
sure it held the whole fetch: a third of a millisecond per request, and a tenth of the worker's
CPU (docs/performance.md, section 9).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class EventQueue(Protocol[T_co]):
    """What is used of the channel's queue (mode's ``ThrowableQueue``, bounded: the conductor
    waits while it is full)."""

    async def get(self) -> T_co: ...

    def get_nowait(self) -> T_co: ...

    def empty(self) -> bool: ...


class LaneBatches(Generic[T]):
    """The events of ``queue`` in batches (``async for batch in ...``), each event with the
    wall-clock time it was taken (the ``fetched`` stage of the response's ``nexus-stages``
    header). Events ``current`` refuses are dropped: Faust's stream dropped those of an earlier
    consumer generation (fetched before a rebalance, read again from the committed offsets).
    An error thrown into the channel is raised from :meth:`get`."""

    def __init__(self, queue: EventQueue[T], max_batch: int, current: Callable[[T], bool] = lambda _: True,
                 wall: Callable[[], float] = time.time) -> None:
        self._queue = queue
        self._max = max_batch
        self._current = current
        self._wall = wall
        self._error: Exception | None = None

    async def get(self) -> list[tuple[T, float]]:
        """The next batch: what the queue holds now, in order, once it holds anything. An error
        met while taking a batch is raised at the next call, after the events taken before it."""
        queue = self._queue
        while True:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            event = await queue.get()
            at = self._wall()
            batch: list[tuple[T, float]] = []
            while True:
                if self._current(event):
                    batch.append((event, at))
                if len(batch) >= self._max or queue.empty():
                    break
                try:
                    event = queue.get_nowait()
                except Exception as exc:  # thrown into the channel (its queue raises it in order)
                    self._error = exc
                    break
            if batch:
                return batch

    def __aiter__(self) -> AsyncIterator[list[tuple[T, float]]]:
        return self

    async def __anext__(self) -> list[tuple[T, float]]:
        return await self.get()


def channel_queue(stream: Any) -> EventQueue[Any]:
    """The queue a Faust agent's stream reads: its channel's, which the conductor fills."""
    return stream.channel.queue
