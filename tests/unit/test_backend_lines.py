"""Streamed lines longer than aiohttp's readline limit: a backend that sends a whole answer (or a
long tool call) as one NDJSON / SSE line is read, up to a cap; past it the request is answered
with an error naming the cap, never as an internal error."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from nexus.settings import EndpointSettings, ModelSettings, Settings
from schemas import InferenceOptions, InferenceRequest, ModelContext, ToolCall
from streams.answering.inference import Inference
from streams.backends import BackendError
from streams.backends.lines import MAX_LINE_BYTES, LineSplitter
from streams.backends.ollama import OllamaBackend, new_session
from streams.backends.openai import OpenAIBackend
from streams.metrics import WorkerMetrics
from tests.unit.test_inference import DictCache

ONE_MIB_TEXT = "x" * (1 << 20)  # one streamed chunk, one line: twice aiohttp 3.14's readline limit


# ----------------------------------------------------------------------------- the splitter (pure)


def test_lines_are_split_across_any_chunk_boundaries() -> None:
    body = b'{"a": 1}\n\n{"b": 2}\r\n{"c": 3}'
    for size in (1, 2, 3, 7, len(body)):
        splitter = LineSplitter("http://e", max_bytes=64)
        lines = [line for i in range(0, len(body), size) for line in splitter.feed(body[i:i + size])]
        assert lines + [splitter.finish()] == [b'{"a": 1}', b"", b'{"b": 2}', b'{"c": 3}'], size
        assert splitter.finish() is None


def test_a_line_of_exactly_the_cap_passes_and_one_byte_more_is_refused_naming_the_cap() -> None:
    assert LineSplitter("http://e", max_bytes=8).feed(b"12345678\n") == [b"12345678"]
    with pytest.raises(BackendError, match=r"http://e sent a streamed line longer than 8 bytes") as whole:
        LineSplitter("http://e", max_bytes=8).feed(b"123456789\n")
    assert not whole.value.retryable, "another endpoint would send the same line"
    growing = LineSplitter("http://e", max_bytes=8)
    assert growing.feed(b"ok\n1234") == [b"ok"]
    with pytest.raises(BackendError, match="longer than 8 bytes"):
        growing.feed(b"56789")  # refused while it grows: the worker never holds more than the cap


def test_the_default_cap_reads_as_an_operator_would_write_it() -> None:
    with pytest.raises(BackendError, match="longer than 16 MiB"):
        LineSplitter("http://e").feed(b"x" * (MAX_LINE_BYTES + 1))


# ----------------------------------------------------------------------------- both backends, over HTTP


@pytest.fixture()
async def server() -> AsyncIterator[str]:
    """A fake Ollama (NDJSON) and OpenAI server (SSE) that stream the prompt back as ONE line
    of one chunk, whatever its size."""

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(json.dumps({"response": body["prompt"], "done": False}).encode() + b"\n")
        await response.write(json.dumps({"response": "", "done": True, "eval_count": 1}).encode() + b"\n")
        return response

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = body["messages"][-1]["content"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        delta = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
        await response.write(b"data: " + json.dumps(delta).encode() + b"\n\n")
        stop = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await response.write(b"data: " + json.dumps(stop).encode() + b"\n\ndata: [DONE]\n\n")
        return response

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0"})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/api/generate", generate)
    app.router.add_get("/api/version", version)
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


def ask(text: str, **changes: object) -> InferenceRequest:
    return InferenceRequest("r", "m", text, ModelContext("s"), InferenceOptions(max_tokens=5), **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", [OllamaBackend, OpenAIBackend])
async def test_a_one_mib_single_line_chunk_is_parsed_whole(server: str, kind: type) -> None:
    chunks: list[str] = []

    async def on_chunk(text: str, calls: tuple[ToolCall, ...]) -> None:
        chunks.append(text)

    async with new_session() as http:
        answer = await kind(http).generate(server, "m", ask(ONE_MIB_TEXT), "", 10.0, on_chunk)
    assert answer.text == ONE_MIB_TEXT
    assert chunks == [ONE_MIB_TEXT]


@pytest.mark.parametrize("kind", [OllamaBackend, OpenAIBackend])
async def test_a_line_over_the_cap_fails_the_call_with_a_clear_backend_error(server: str, kind: type) -> None:
    async def on_chunk(text: str, calls: tuple[ToolCall, ...]) -> None:
        pass

    async with new_session() as http:
        with pytest.raises(BackendError, match="sent a streamed line longer than 512 KiB") as refused:
            await kind(http, max_line_bytes=512 << 10).generate(server, "m", ask(ONE_MIB_TEXT), "", 10.0, on_chunk)
    assert not refused.value.retryable


class Sink:
    started = False

    async def chunk(self, text: str, tool_calls: tuple[ToolCall, ...] = (), *, flush: bool = False) -> None:
        self.started = True


async def test_the_worker_answers_a_line_over_the_default_cap_with_an_error_naming_it(server: str) -> None:
    """As the worker builds it: the default 16 MiB cap; the request gets an error response (and a
    dead letter), not an internal error, and the endpoint is not blamed."""
    settings = Settings(models=(ModelSettings("m", (EndpointSettings(server),), retries=0),))
    huge = "y" * (MAX_LINE_BYTES + 1)
    async with new_session() as http:
        inference = Inference(settings, http, WorkerMetrics(), DictCache(), rng=random.Random(1))
        try:
            answer = await inference.answer(ask(huge, stream=True), Sink())
        finally:
            await inference.aclose()
    response = answer.response
    assert response.status == "error"
    assert "sent a streamed line longer than 16 MiB" in (response.error or ""), response.error
    assert "internal error" not in (response.error or "")
    assert answer.dead_letter_reason is not None
