"""Where an answer's by-products go on Kafka: streamed token chunks and response-cache entries.

:class:`~streams.answering.inference.Inference` knows nothing of Kafka; the worker hands it these
two adapters, which publish through callables it gives them (streams/worker.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from schemas import Codec, InferenceRequest, InferenceToken, ToolCall, encode_token, headers
from streams.answering import cache

TOKEN_FLUSH_S = 0.025

# Queues one record (key, value, headers); returns the future of its acknowledgement.
SendRecord = Callable[[bytes | None, bytes, Any], Awaitable[Any]]


class KafkaTokenSink:
    """Publishes a streamed answer's chunks in order: the first at once (it is the time to first
    token the client sees), the rest batched over ``TOKEN_FLUSH_S``; a batch is one token, its texts
    joined and its tool calls in the order they came. Each carries ``trace_headers``: the request's
    trace context (nexus/tracing.py)."""

    def __init__(self, send: SendRecord, codec: Codec, request: InferenceRequest,
                 trace_headers: list[tuple[str, bytes]] | None = None) -> None:
        self._send = send
        self._codec = codec
        self._request = request
        self._trace_headers = trace_headers or []
        self._buffer: list[str] = []
        self._calls: list[ToolCall] = []
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: list[asyncio.Future[None]] = []
        self._acks: list[Any] = []
        self._texts: list[str] = []
        self.sent = 0
        self.started = False

    @property
    def text(self) -> str:
        """Everything given so far: the partial output of an answer stopped midway."""
        return "".join(self._texts)

    async def chunk(self, text: str, tool_calls: tuple[ToolCall, ...] = (), *, flush: bool = False) -> None:
        """Add a chunk (its text, and the tool calls that came with it); with ``flush``, or when it is
        the first, publish it now rather than batched with the next ones."""
        flush = flush or not self.started
        self.started = True
        self._texts.append(text)
        self._buffer.append(text)
        self._calls.extend(tool_calls)
        if flush:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            await self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(TOKEN_FLUSH_S, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        self._flushes.append(asyncio.ensure_future(self._flush()))

    async def _flush(self) -> None:
        async with self._lock:  # one flush at a time keeps seq order on the wire
            if not self._buffer:
                return
            token = InferenceToken(
                id=self._request.id,
                model_id=self._request.model_id,
                session_id=self._request.context.session_id,
                seq=self.sent,
                text="".join(self._buffer),
                reply_to=self._request.reply_to,
                key_name=self._request.key_name,
                tool_calls=tuple(self._calls),
            )
            self._buffer.clear()
            self._calls.clear()
            self.sent += 1
            # The waiting gateway skips everyone else's chunks by this header, without decoding them.
            reply = [(headers.REPLY_TO, token.reply_to.encode())] if token.reply_to else []
            record_headers = (reply + self._trace_headers) or None
            self._acks.append(
                await self._send(token.session_id.encode(), encode_token(self._codec, token), record_headers)
            )

    async def close(self) -> None:
        """Flush what is left and wait until Kafka acknowledged every chunk."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await asyncio.gather(*self._flushes)
        await self._flush()
        await asyncio.gather(*self._acks)


class TableCache:
    """The response cache: reads the Faust table, writes through the updates topic.

    Tables cannot be written from inside a ``take()`` batch (there is no current event to tie
    the changelog to), so an entry goes to the updates topic and the ``nexus.cache`` agent
    writes it into the table (streams/app.py).
    """

    def __init__(self, table: faust.Table, send_update: Callable[[bytes, bytes], Awaitable[None]]) -> None:
        self._table = table
        self._send_update = send_update

    def get(self, key: bytes) -> cache.CacheEntry | None:
        raw = self._table.get(key)
        return cache.CacheEntry.from_bytes(raw) if raw else None

    async def put(self, request: InferenceRequest, key: bytes, entry: cache.CacheEntry) -> None:
        await self._send_update(request.model_id.encode(), cache_update(key, entry))


def cache_update(key: bytes, entry: cache.CacheEntry) -> bytes:
    """The updates topic's record value for one cache entry; :func:`read_cache_update` reads it."""
    return json.dumps({"key": key.decode(), "entry": entry.to_bytes().decode()}).encode()


def read_cache_update(value: bytes) -> tuple[bytes, bytes]:
    """The table key and value of an updates-topic record."""
    update = json.loads(value)
    return update["key"].encode(), update["entry"].encode()


class CacheKeeper:
    """The cache table's memory and changelog kept bounded: entries are written through it, and
    the expired ones (and, past ``max_entries``, those closest to expiry) are deleted, each with
    a tombstone on its changelog partition, so compaction drops them from Kafka too.

    The decisions are :class:`~streams.answering.cache.CacheIndex`'s. A deletion needs no current
    event: its tombstone names its changelog partition, which the index knows (Faust's own delete
    asks the current event for it, so it cannot run from a timer or a ``take()`` batch). Entries
    of partitions this worker does not own (a standby's copy, a partition revoked) leave memory
    without a tombstone: their owner writes it. Entries recovered from the changelog join the
    index through :meth:`on_changelog` (the table's ``on_changelog_event``).
    """

    def __init__(
        self,
        table: faust.Table,
        max_entries: int,
        owned: Callable[[], set[int]],
        clock: Callable[[], float] = time.time,
        deleted: Callable[[cache.Doomed], None] | None = None,
    ) -> None:
        self._table = table
        self._max = max_entries
        self._owned = owned
        self._clock = clock
        self._deleted = deleted
        self.index = cache.CacheIndex()
        table.on_recover(self._recovered)

    def __len__(self) -> int:
        return len(self._table)

    def store(self, key: bytes, value: bytes, partition: int) -> None:
        """Write an entry (from the cache agent: a table write needs its event), then sweep."""
        self._table[key] = value
        self.index.add(key, partition, _expires_at(value))
        self.sweep()

    async def on_changelog(self, event: Any) -> None:
        """A changelog record read while recovering (or following as a standby): index it."""
        key = event.key
        if not isinstance(key, bytes):
            return
        if event.message.value is None:
            self.index.remove(key)
        else:
            self.index.add(key, event.message.partition, _expires_at(event.value))

    def sweep(self) -> list[cache.Doomed]:
        """Delete what is due now: from memory, and with a tombstone when this worker owns its partition."""
        doomed = self.index.due(self._clock(), self._max)
        if not doomed:
            return doomed
        owned = self._owned()
        store = self._table.data
        for entry in doomed:
            store.pop(entry.key, None)
            if entry.partition in owned:
                # What Faust's on_key_del sends, with the partition named instead of asked of an event.
                self._table.send_changelog(entry.partition, entry.key, None, value_serializer="raw")
            if self._deleted is not None:
                self._deleted(entry)
        return doomed

    async def _recovered(self) -> None:
        """After each recovery (a table ``on_recover`` callback): drop from the index what Faust
        dropped from memory itself (the partitions this worker no longer owns), so it counts
        against no bound; then delete what expired meanwhile."""
        store = self._table.data
        for key in self.index:
            if key not in store:
                self.index.remove(key)
        self.sweep()


def _expires_at(value: Any) -> float:
    """When a stored entry expires; an entry that cannot be read is due at once (0)."""
    try:
        return float(cache.CacheEntry.from_bytes(value).expires_at)
    except (ValueError, TypeError, KeyError):
        return 0.0
