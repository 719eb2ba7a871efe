"""The worker's HTTP client (streams/backends/http.py) against scripted servers on real sockets:
kept-alive connections reused and only when the answer was whole, bodies by length, chunks or
the connection's end, chunks as they arrive, and each failure as the typed error it is."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from nexus.errors import NexusError
from streams.backends.http import ConnectError, Disconnected, HttpClient, HttpError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A local TCP server running ``handler`` per connection; counts the connections it accepted."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.current_task()
            assert task is not None
            self._handlers.add(task)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass  # the client went, or the test is over (__aexit__)
            finally:
                writer.close()

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """One request: its first line, its headers (lower-case names), its body."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if line)
    headers = {k.lower(): v for k, v in headers.items()}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return head[0], headers, body


def answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection with its line and JSON body."""
    while True:
        line, headers, body = await read_request(reader)
        writer.write(answer(json.dumps({"line": line, "host": headers["host"], "body": json.loads(body or b"null")})
                            .encode()))
        await writer.drain()


async def slow_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request with its body, a little later: calls sent at once overlap."""
    while True:
        _, _, body = await read_request(reader)
        await asyncio.sleep(0.01)
        writer.write(answer(body))


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    async with HttpClient() as http:
        yield http


async def test_a_post_sends_json_and_a_kept_alive_connection_carries_the_next_calls(client: HttpClient) -> None:
    async with Server(echo) as server:
        for i in range(3):
            async with client.post(f"{server.url}/api/generate?x=1", {"n": i}, 5.0) as response:
                assert response.status == 200
                data = json.loads(await response.read())
            assert data == {"line": "POST /api/generate?x=1 HTTP/1.1", "host": server.url[7:], "body": {"n": i}}
        assert server.connections == 1


async def test_calls_in_flight_at_once_each_get_their_own_connection_and_their_own_answer(client: HttpClient) -> None:
    async def call(url: str, n: int) -> object:
        async with client.post(url, {"n": n}, 5.0) as response:
            return json.loads(await response.read())

    async with Server(slow_echo) as server:
        got = await asyncio.gather(*(call(server.url, n) for n in range(5)))
        assert got == [{"n": n} for n in range(5)]
        assert server.connections == 5
        await call(server.url, 9)  # the five are kept: no sixth
        assert server.connections == 5


async def test_a_chunked_body_arrives_chunk_by_chunk_as_the_server_sends_it(client: HttpClient) -> None:
    sent_second = asyncio.Event()
    read_first = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"6\r\n{\"a\":1\r\n")
            await writer.drain()
            await read_first.wait()  # the client has the first chunk before the second is written
            writer.write(b"2\r\n}\n\r\n0\r\n\r\n")
            sent_second.set()
            await writer.drain()

    async with Server(stream) as server:
        async with client.post(server.url, {}, 5.0) as response:
            chunks = []
            async for chunk in response.chunks():
                chunks.append(chunk)
                read_first.set()
            assert b"".join(chunks) == b'{"a":1}\n' and chunks[0] == b'{"a":1'
        async with client.post(server.url, {}, 5.0) as response:  # the connection was whole: reused
            assert await response.read() == b'{"a":1}\n'
        assert server.connections == 1


async def test_a_body_without_length_ends_with_the_connection_which_is_not_reused(client: HttpClient) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"ok\": true}")
        await writer.drain()

    async with Server(until_close) as server:
        for _ in range(2):
            async with client.post(server.url, {}, 5.0) as response:
                assert json.loads(await response.read()) == {"ok": True}
        assert server.connections == 2


async def test_an_answer_with_connection_close_costs_the_connection(client: HttpClient) -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request(reader)
            writer.write(answer(b"{}", extra="Connection: close\r\n" if "close" in line else ""))

    async with Server(closing) as server:
        async with client.post(f"{server.url}/close", {}, 5.0) as response:
            await response.read()
        for _ in range(2):
            async with client.post(f"{server.url}/keep", {}, 5.0) as response:
                await response.read()
        assert server.connections == 2


async def test_an_error_status_comes_back_with_its_body(client: HttpClient) -> None:
    async def not_found(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b'{"error": "model \\"x\\" not found"}', status="404 Not Found"))

    async with Server(not_found) as server, client.post(server.url, {}, 5.0) as response:
        assert response.status == 404
        assert json.loads(await response.read()) == {"error": 'model "x" not found'}


async def test_a_refused_connection_is_a_connect_error_a_broken_one_disconnected(client: HttpClient) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"cut")

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await asyncio.sleep(1)

    async with Server(echo) as server:
        refused = server.url
    with pytest.raises(ConnectError, match="cannot connect to 127.0.0.1"):
        async with client.post(refused, {}, 5.0):
            pass
    async with Server(hang_up) as server, client.post(server.url, {}, 5.0) as response:
        with pytest.raises(Disconnected, match="closed the connection before its answer was whole"):
            await response.read()
    async with Server(not_http) as server:
        with pytest.raises(Disconnected, match="not HTTP"):
            async with client.post(server.url, {}, 5.0):
                pass
    with pytest.raises(ConnectError, match="not an http:// or https:// URL"):
        async with client.post("ftp://example.com", {}, 5.0):
            pass
    assert issubclass(HttpError, NexusError)


async def test_the_timeout_spans_the_whole_exchange_and_the_connection_is_dropped(client: HttpClient) -> None:
    async def stalls_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request(reader)
            if "stall" in line:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{")
                await writer.drain()
                await asyncio.sleep(5)
            writer.write(answer(b"{}"))

    async with Server(stalls_mid_body) as server:
        with pytest.raises(TimeoutError):
            async with client.post(f"{server.url}/stall", {}, 0.2) as response:
                assert response.status == 200  # the headers came in time; the body did not
                await response.read()
        async with client.post(f"{server.url}/ok", {}, 5.0) as response:
            assert await response.read() == b"{}"
        assert server.connections == 2


async def test_a_cancelled_call_drops_its_connection(client: HttpClient) -> None:
    answering = asyncio.Event()

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request(reader)
            if "never" in line:
                answering.set()
                await asyncio.sleep(5)
            writer.write(answer(b"{}"))

    async def call() -> None:
        async with client.post(f"{server.url}/never", {}, 5.0) as response:
            await response.read()

    async with Server(never) as server:
        task = asyncio.create_task(call())
        await answering.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with client.post(f"{server.url}/ok", {}, 5.0) as response:
            assert await response.read() == b"{}"
        assert server.connections == 2


async def test_on_sent_is_called_once_the_request_is_written(client: HttpClient) -> None:
    sent: list[bool] = []
    seen = asyncio.Event()

    async def waits(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        seen.set()
        await asyncio.sleep(0.05)
        writer.write(answer(b"{}"))

    async with Server(waits) as server, client.post(server.url, {}, 5.0, lambda: sent.append(seen.is_set())) as r:
        assert await r.read() == b"{}"
    assert sent == [False]  # called before the server had read it, once


async def test_a_connection_the_server_closed_while_idle_is_not_reused(client: HttpClient) -> None:
    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"{}"))  # keep-alive by default, then closed anyway
        await writer.drain()

    async def until_the_client_saw_the_close() -> None:
        async with asyncio.timeout(5):
            while not all(c.closed for idle in client._idle.values() for c in idle):
                await asyncio.sleep(0.001)

    async with Server(one_per_connection) as server:
        for _ in range(3):
            async with client.post(server.url, {}, 5.0) as response:
                assert await response.read() == b"{}"
            await until_the_client_saw_the_close()
        assert server.connections == 3


async def test_connections_idle_past_their_time_are_closed_not_kept() -> None:
    async def call(http: HttpClient, url: str) -> None:
        async with http.post(url, {}, 5.0) as response:
            await response.read()

    async with Server(slow_echo) as server, HttpClient(idle_s=0.2) as http:
        await asyncio.gather(*(call(http, server.url) for _ in range(4)))  # a burst: four connections
        assert server.connections == 4
        await asyncio.sleep(0.3)
        await call(http, server.url)  # after the burst's connections' time: a new one, the four closed
        assert server.connections == 5
        assert sum(len(idle) for idle in http._idle.values()) == 1
