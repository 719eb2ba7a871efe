"""Where an answer's by-products go on Kafka: streamed token chunks and response-cache entries.

:class:`~streams.answering.inference.Inference` knows nothing of Kafka; the worker hands it these
two adapters, which publish through callables it gives them (streams/worker.py).
"""

from __future__ import annotations

import asyncio
import json
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
    joined and its tool calls in the order they came."""

    def __init__(self, send: SendRecord, codec: Codec, request: InferenceRequest) -> None:
        self._send = send
        self._codec = codec
        self._request = request
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
            record_headers = [(headers.REPLY_TO, token.reply_to.encode())] if token.reply_to else None
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
