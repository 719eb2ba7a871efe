"""The worker's HTTP/1.1 client to its model endpoints: kept-alive connections per origin, a JSON
body out, the answer's body whole or chunk by chunk as it arrives.

Why not aiohttp's client: every model call crosses it, and its layers (session, connector, trace
signals, cookie jar, payload objects, stream reader) cost 40–80 µs of CPU per call more than this
client, which costs what a bare asyncio protocol does; with the rest of the worker trimmed, that
was its largest single piece (issue 17, ``docs/performance.md``).
A model endpoint's exchange is narrow: ``POST`` a JSON object, read a JSON object or an NDJSON /
SSE stream; ``GET`` a listing. Parsing is httptools' (llhttp, the parser of Node.js): content
length, chunked bodies, keep-alive and a body read to the connection's end all as HTTP/1.1 says.

No redirects, cookies, proxies or compression (a model server needs none and the endpoints are
configured URLs); ``https`` endpoints are verified against the system's certificates.

Errors (:class:`HttpError`, a :class:`~nexus.errors.NexusError`)::

    HttpError            the exchange failed: nothing about the answer is known
    ├── ConnectError     no connection was made: the request reached no server
    └── Disconnected     the connection broke or spoke no HTTP after the request was sent

A timeout is :class:`TimeoutError`, over the whole exchange: connecting, sending, the body read.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from nexus.errors import NexusError

__all__ = ["ConnectError", "Disconnected", "HttpClient", "HttpError", "Response", "new_session"]

# A kept-alive connection idle longer than this is closed, not reused: servers close idle
# connections on their own clock (uvicorn after 5 s), and a request written into one that the
# server is closing fails although the endpoint is fine.
IDLE_S = 4.0


class HttpError(NexusError):
    """The exchange with an endpoint failed; the message says how (see the module's tree)."""


class ConnectError(HttpError):
    """No connection to the endpoint: refused, unresolvable, TLS refused. The request reached no server."""


class Disconnected(HttpError):
    """The connection broke, or the server answered something that is not HTTP, before the answer was whole."""


@dataclass(frozen=True, slots=True)
class _Target:
    """One URL, taken apart once: where to connect and the request's first lines."""

    origin: tuple[str, str, int]  # scheme, host, port: the connections it may share
    host: str
    port: int
    tls: bool
    head: str  # "{method} {path} HTTP/1.1\r\nHost: ...\r\n" without the method


@functools.lru_cache(maxsize=1024)
def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConnectError(f"cannot call {url!r}: not an http:// or https:// URL")
    tls = parts.scheme == "https"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise ConnectError(f"cannot call {url!r}: its port is not a number from 0 to 65535") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    netloc = parts.netloc.rpartition("@")[2]  # no credentials in Host
    return _Target((parts.scheme, parts.hostname, port), parts.hostname, port, tls,
                   f" {path} HTTP/1.1\r\nHost: {netloc}\r\nUser-Agent: nexus\r\nAccept: */*\r\n")


class Response:
    """An answer's status, then its body: :meth:`read` whole or :meth:`chunks` as they arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self._loop = loop
        self._chunks: list[bytes] = []
        self._complete = False
        self._error: HttpError | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        async for chunk in self.chunks():
            parts.append(chunk)
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes in the pieces they arrived in."""
        while True:
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                for chunk in chunks:
                    yield chunk
                continue
            if self._error is not None:
                raise self._error
            if self._complete:
                return
            await self._wait()

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One kept-alive connection: a request written, its answer parsed as bytes arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: tuple[str, str, int], name: str) -> None:
        self._loop = loop
        self.origin = origin
        self._name = name
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.response: Response | None = None
        self._headers: asyncio.Future[Response] | None = None
        self._length_known = False  # a content-length or chunked body: its end is not the connection's
        self._reusable = False  # the last answer was whole and the server keeps the connection

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Disconnected(f"{self._name} answered with something that is not HTTP/1.1: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        self.closed = True  # not to be taken from the pool in the turns before connection_lost
        return None  # close: a half-closed connection is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and response.status and not self._length_known and exc is None:
            response._complete = True  # a body that ends with the connection (HTTP/1.0 style)
            response._wake()
            return
        reason = f": {exc}" if exc else ""
        self._fail(Disconnected(f"{self._name} closed the connection before its answer was whole{reason}"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
            self._length_known = True

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:  # an answer nobody asked for
            self.close()
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self._length_known = False
            return
        response.status = status
        if self._headers is not None and not self._headers.done():
            self._headers.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._chunks.append(body)
            self.response._wake()

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or not response.status:
            return
        self._reusable = self._parser.should_keep_alive()
        response._complete = True
        response._wake()

    # The client's side

    def send(self, data: bytes, response: Response) -> asyncio.Future[Response]:
        """Write a request; the future is the answer, once its headers are in."""
        assert self.transport is not None
        self.response = response
        self._headers = self._loop.create_future()
        self._length_known = False
        self._reusable = False
        self.transport.write(data)
        return self._headers

    def done_with(self, response: Response) -> bool:
        """Whether the connection may carry another request now that ``response`` is left."""
        reusable = response._complete and response._error is None and self._reusable and not self.closed
        self.response = None
        self._headers = None
        return reusable

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: HttpError) -> None:
        if self._headers is not None and not self._headers.done():
            self._headers.set_exception(error)
            self._headers.exception()  # retrieved: the caller may have gone (cancelled)
        if self.response is not None and not self.response._complete:
            self.response._error = error
            self.response._wake()


class _Exchange:
    """``async with client.post(...) as response``: the timeout spans the block, and the connection
    goes back to the pool only if the answer was read whole."""

    def __init__(self, client: HttpClient, method: str, url: str, body: bytes | None,
                 timeout_s: float, on_sent: Callable[[], None] | None) -> None:
        self._client = client
        self._request = (method, url, body, on_sent)
        self._timeout = asyncio.timeout(timeout_s)
        self._connection: _Connection | None = None
        self._response: Response | None = None

    async def __aenter__(self) -> Response:
        await self._timeout.__aenter__()
        try:
            self._connection, self._response = await self._client._send(*self._request)
        except BaseException as exc:
            await self._leave(type(exc), exc, exc.__traceback__)
            raise
        return self._response

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._leave(kind, exc, tb)

    async def _leave(self, kind: type[BaseException] | None, exc: BaseException | None,
                     tb: TracebackType | None) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and self._response is not None:
            self._client._release(connection, self._response)
        await self._timeout.__aexit__(kind, exc, tb)  # an expired timeout: TimeoutError


class HttpClient:
    """Keep-alive connections to each origin, as many as calls in flight (the router bounds those)."""

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self._idle_s = idle_s
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    def post(self, url: str, body: Any, timeout_s: float, on_sent: Callable[[], None] | None = None) -> _Exchange:
        """``POST`` ``body`` (JSON bytes, or an object to encode) to ``url``; ``on_sent`` is
        called once the request is written."""
        data = body if isinstance(body, bytes) else _json(body)
        return _Exchange(self, "POST", url, data, timeout_s, on_sent)

    def get(self, url: str, timeout_s: float) -> _Exchange:
        return _Exchange(self, "GET", url, None, timeout_s, None)

    async def close(self) -> None:
        """Close every connection; calls still in flight fail with :class:`Disconnected`."""
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        for connection in list(self._busy):
            connection.close()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _send(self, method: str, url: str, body: bytes | None,
                    on_sent: Callable[[], None] | None) -> tuple[_Connection, Response]:
        if self._closed:
            raise ConnectError(f"cannot call {url}: the client is closed")
        target = _target(url)
        connection = self._idle_connection(target) or await self._connect(target)
        self._busy.add(connection)
        response = Response(connection._loop)
        head = method + target.head
        if body is None:
            data = (head + "\r\n").encode("latin-1")
        else:
            data = (head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode(
                "latin-1") + body
        try:
            answered = connection.send(data, response)
            if on_sent is not None:
                on_sent()
            await answered
        except BaseException:
            self._release(connection, response)
            raise
        return connection, response

    def _idle_connection(self, target: _Target) -> _Connection | None:
        connections = self._idle.get(target.origin)
        now = time.monotonic()
        while connections:
            connection = connections.pop()  # the most recently used: the least likely to be closing
            transport = connection.transport
            if (not connection.closed and transport is not None and not transport.is_closing()
                    and now - connection.idle_since < self._idle_s):
                return connection
            connection.close()
        return None

    async def _connect(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        name = f"{target.host}:{target.port}"
        tls: ssl.SSLContext | None = None
        if target.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(loop, target.origin, name), target.host, target.port, ssl=tls,
                server_hostname=target.host if tls else None)
        except OSError as exc:  # refused, unresolvable (gaierror), TLS (SSLError)
            raise ConnectError(f"cannot connect to {name}: {exc}") from None
        return connection

    def _release(self, connection: _Connection, response: Response) -> None:
        self._busy.discard(connection)
        if connection.done_with(response) and not self._closed:
            now = connection.idle_since = time.monotonic()
            idle = self._idle.setdefault(connection.origin, [])
            idle.append(connection)
            # The least recently used first: once past their time, they are closed, not kept
            # open for a burst that is over (LIFO reuse never reaches them).
            while idle and (now - idle[0].idle_since >= self._idle_s or idle[0].closed):
                idle.pop(0).close()
        else:
            connection.close()


def _json(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def new_session() -> HttpClient:
    """The worker's one client to every endpoint; the router bounds the calls, not the pool."""
    return HttpClient()
