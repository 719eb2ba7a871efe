"""Per-client delivery state of the bridge: a bounded outbox and the history/live handover.

Plain classes without network I/O, so the ordering rules are unit-tested in
microseconds; the websocket shell (:mod:`consumers.bridge.server`) only moves frames.
"""

from __future__ import annotations

import asyncio
from collections import deque
from nexus.errors import NexusError

RecordKey = tuple[str, int, int]  # (topic, partition, offset): a record's identity in Kafka


class Outbox:
    """The frames waiting for one client, at most ``limit`` of them.

    Live frames and replies never wait: :meth:`push` refuses when the outbox is
    full (the client is too slow and gets closed), so one stalled client cannot
    hold up the Kafka reader or the others. History replay, which the bridge
    paces itself, waits in :meth:`push_paced` until the outbox is at most half
    full, leaving room for live frames.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"outbox limit must be positive, got {limit}")
        self.limit = limit
        self._frames: deque[str] = deque()
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._frames)

    def queued(self) -> list[str]:
        """The frames waiting, oldest first, without taking them."""
        return list(self._frames)

    def push(self, frame: str) -> bool:
        """Queue ``frame``; ``False`` when the outbox is full (or closed): the client is too slow."""
        if self.closed or len(self._frames) >= self.limit:
            return False
        self._frames.append(frame)
        self._ready.set()
        return True

    async def push_paced(self, frame: str) -> bool:
        """Queue ``frame`` once the outbox is at most half full; ``False`` if it was closed."""
        while not self.closed and len(self._frames) > self.limit // 2:
            self._space.clear()
            await self._space.wait()
        return self.push(frame)

    async def get(self) -> str:
        """The next frame to send, waiting for one."""
        while not self._frames:
            if self.closed:
                raise OutboxClosed()
            self._ready.clear()
            await self._ready.wait()
        frame = self._frames.popleft()
        if len(self._frames) <= self.limit // 2:
            self._space.set()
        return frame

    def close(self) -> None:
        """Drop the queued frames and wake every waiter; nothing is queued afterwards."""
        self.closed = True
        self._frames.clear()
        self._ready.set()
        self._space.set()


class OutboxClosed(NexusError):
    """The outbox was closed while waiting for a frame."""


class CatchUp:
    """Orders one client's frames while ``since`` replays run: history first, then live.

    When a subscription with ``since`` is registered, the bridge notes the live
    reader's positions (the cutoff); the replay reads history strictly before
    the cutoff and the live reader delivers from it on, so nothing is missed.
    While any replay of the client runs, and until the frames held meanwhile
    have been sent, its live frames are held here, in Kafka order. A held
    record that an overlapping replay also reads is sent once, from the held
    frames.
    """

    def __init__(self) -> None:
        self._active = 0
        self._held: deque[tuple[RecordKey, str]] = deque()
        self._held_keys: set[RecordKey] = set()

    @property
    def active(self) -> bool:
        return self._active > 0

    @property
    def held(self) -> int:
        return len(self._held)

    def begin(self) -> None:
        self._active += 1

    def live(self, key: RecordKey, frame: str) -> bool:
        """``True``: send ``frame`` now; ``False``: it is held until the replays end."""
        if not self._active and not self._held:
            return True
        self._held.append((key, frame))
        self._held_keys.add(key)
        return False

    def history(self, key: RecordKey) -> bool:
        """Whether a replayed record should be sent (it is not held to be sent live)."""
        return key not in self._held_keys

    def end(self) -> None:
        """A replay finished; take the held frames with :meth:`next_held`."""
        if self._active <= 0:
            raise RuntimeError("CatchUp.end() without a matching begin()")
        self._active -= 1

    def next_held(self) -> str | None:
        """The next held frame to send once no replay runs; ``None`` when there is none (yet).

        Live frames keep queueing behind the held ones until these are all taken,
        so the order holds however long sending them takes.
        """
        if self._active or not self._held:
            return None
        key, frame = self._held.popleft()
        self._held_keys.discard(key)
        return frame
