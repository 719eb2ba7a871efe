"""Acknowledge events in offset order, whatever order their answers finish in.

Requests are answered concurrently and finish out of order, but a committed offset
must never pass a request whose answer is not yet durable. Faust commits the run
of acked offsets it sees, and its gap check misses an unacked offset right after
the last commit, so the worker acks only the completed prefix of each partition.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

E = TypeVar("E")


class InOrderAcks(Generic[E]):
    def __init__(self) -> None:
        self._pending: dict[Hashable, OrderedDict[int, list]] = {}

    def add(self, partition: Hashable, offset: int, event: E) -> None:
        """Register an event in consumption order (offsets ascending per partition)."""
        self._pending.setdefault(partition, OrderedDict())[offset] = [event, False]

    def done(self, partition: Hashable, offset: int) -> list[E]:
        """Mark one event answered; return the events that may now be acked, in order."""
        queue = self._pending[partition]
        queue[offset][1] = True
        ready: list[E] = []
        while queue:
            first = next(iter(queue))
            event, finished = queue[first]
            if not finished:
                break
            queue.popitem(last=False)
            ready.append(event)
        return ready

    def outstanding(self) -> int:
        return sum(len(q) for q in self._pending.values())
