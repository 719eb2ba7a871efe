"""Where an answer's by-products go on Kafka: streamed token chunks and response-cache entries.

:class:`~streams.answering.inference.Inference` knows nothing of Kafka; the worker hands it these
two adapters, which publish through callables it gives them (streams/worker.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust
from aiokafka.partitioner import DefaultPartitioner

from schemas import Codec, InferenceRequest, InferenceToken, ToolCall, encode_token, headers
from streams.answering import cache

TOKEN_FLUSH_S = 0.025
_PARTITIONER = DefaultPartitioner()  # murmur2, as every Kafka producer's default (the producer API's too)

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


# Writes one cache entry (partition, key, value) to the table's changelog.
WriteEntry = Callable[[int, bytes, bytes], Awaitable[None]]


class TableCache:
    """The response cache: the Faust table in this worker's memory, and its changelog.

    An answer's entry is written into memory at once, and onto the changelog partition of the
    requests it answers: its model's partition, as requests are keyed by model, so the worker
    that owns a model's requests owns its entries and recovers them after a restart. Faust's
    own table write asks the current event for that partition, and the answers of a batch have
    none; the partition is computed instead, as the producers' partitioner places the model's
    requests. (Entries used to go through an updates topic to an agent that wrote them with an
    event: two more records per answer, and the response waited for the first one's ack.)
    """

    def __init__(self, keeper: CacheKeeper, partitions: int, write: WriteEntry) -> None:
        self._keeper = keeper
        self._partitions = list(range(partitions))
        self._write = write

    def get(self, key: bytes) -> cache.CacheEntry | None:
        raw = self._keeper.get(key)
        return cache.CacheEntry.from_bytes(raw) if raw else None

    async def put(self, request: InferenceRequest, key: bytes, entry: cache.CacheEntry) -> None:
        value = entry.to_bytes()
        partition = self.partition_of(request.model_id)
        self._keeper.store(key, value, partition)
        await self._write(partition, key, value)

    def partition_of(self, model_id: str) -> int:
        """The partition of the requests of ``model_id``, as Kafka's default partitioner puts them."""
        return cast(int, _PARTITIONER(model_id.encode(), self._partitions, self._partitions))


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

    def get(self, key: bytes) -> bytes | None:
        return cast(bytes | None, self._table.get(key))

    def store(self, key: bytes, value: bytes, partition: int) -> None:
        """Hold an entry of changelog ``partition`` in memory (its changelog record is the
        caller's: :class:`TableCache`), then sweep."""
        self._table.data[key] = value
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
