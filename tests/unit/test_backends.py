"""The backend seam: the Ollama backend against an in-process HTTP server, the memory
backend and the manual clock the answering tests rely on, and that both backends
classify failures alike."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from schemas import InferenceOptions, InferenceRequest, Message, ModelContext, Tool, ToolCall
from streams.answering.clock import ManualClock, SystemClock, as_clock
from streams.backends import Backend, BackendError
from streams.backends.memory import Failure, Hold, MemoryBackend, Reply, bad_request, refused, server_busy, server_error
from streams.backends.ollama import OllamaBackend, _status_error, new_session

OPTIONS = InferenceOptions(temperature=0.0, max_tokens=5)


def prompt(text: str, options: InferenceOptions = OPTIONS, **changes: Any) -> InferenceRequest:
    """A prompt request, as a backend is given it."""
    return InferenceRequest("r", "m", text, ModelContext("s"), options, **changes)


# ----------------------------------------------------------------------------- ollama


@pytest.fixture()
async def server() -> AsyncIterator[str]:
    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["prompt"] == "busy":
            return web.json_response({"error": "server busy, please try again"}, status=503)
        if not body["stream"]:
            return web.json_response({"response": f"echo {body['prompt']}", "done": True, "eval_count": 2,
                                      "prompt_eval_count": 3, "done_reason": "stop"})
        response = web.StreamResponse()
        await response.prepare(request)
        for piece in ("echo", " ", body["prompt"]):
            await response.write(json.dumps({"response": piece, "done": False}).encode() + b"\n")
        await response.write(json.dumps({"response": "", "done": True, "eval_count": 3}).encode() + b"\n")
        return response

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0"})

    app = web.Application()
    app.router.add_post("/api/generate", generate)
    app.router.add_get("/api/version", version)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_ollama_backend_answers_whole_and_streamed_and_says_when_it_sent(server: str) -> None:
    async with new_session() as http:
        backend: Backend = OllamaBackend(http)
        whole = await backend.generate(server, "m", prompt("hi"), "sys", 5.0)
        assert (whole.text, whole.prompt_tokens, whole.completion_tokens, whole.ttft_s) == ("echo hi", 3, 2, None)
        chunks: list[str] = []
        sent: list[bool] = []

        async def on_chunk(text: str, calls: tuple[ToolCall, ...]) -> None:
            chunks.append(text)

        streamed = await backend.generate(server, "m", prompt("hi"), "sys", 5.0, on_chunk, lambda: sent.append(True))
        assert chunks == ["echo", " ", "hi"] and streamed.text == "echo hi" and streamed.ttft_s is not None
        assert sent == [True]


async def test_ollama_backend_failures_and_probes(server: str) -> None:
    down = closed_port()
    async with new_session() as http:
        backend = OllamaBackend(http)
        with pytest.raises(BackendError) as busy:
            await backend.generate(server, "m", prompt("busy"), "", 5.0)
        assert busy.value.busy and busy.value.retryable and busy.value.reached
        with pytest.raises(BackendError, match="unreachable") as unreachable:
            await backend.generate(down, "m", prompt("x"), "", 5.0)
        assert unreachable.value.retryable and not unreachable.value.reached
        assert await backend.probe(server, 2.0) is True
        assert await backend.probe(down, 2.0) is False


@pytest.mark.parametrize("status", [400, 404, 408, 429, 500, 502, 503])
def test_the_memory_backend_classifies_statuses_as_ollamas_does(status: int) -> None:
    reason = "server busy" if status == 503 else "boom"
    real = _status_error("http://a", status, json.dumps({"error": reason}).encode())
    scripted = server_error(status, reason)
    assert (scripted.retryable, scripted.busy, scripted.bad_request) == (real.retryable, real.busy, real.bad_request)
    assert f"http://a {scripted.message}" == str(real) and scripted.reason == real.reason == reason
    assert real.bad_request == (status == 400)


# ----------------------------------------------------------------------------- memory


async def test_memory_backend_follows_its_script_then_its_default() -> None:
    backend = MemoryBackend()
    backend.script("http://a", server_busy(), bad_request(), refused(), Reply("scripted", seconds=0.5))
    errors = []
    for _ in range(3):
        with pytest.raises(BackendError) as caught:
            await backend.generate("http://a", "m", prompt("p"), "", 1.0)
        errors.append((caught.value.retryable, caught.value.busy, caught.value.reached))
    assert errors == [(True, True, True), (False, False, True), (True, False, False)]
    scripted = await backend.generate("http://a", "m", prompt("p"), "", 1.0)
    assert (scripted.text, scripted.seconds) == ("scripted", 0.5)
    echoed = await backend.generate("http://a", "m", prompt("hello"), "", 1.0)
    assert echoed.text == "[memory m] hello" and backend.calls("http://a") == 5
    assert backend.calls("http://other") == 0


async def test_memory_backend_streams_and_breaks_streams() -> None:
    backend = MemoryBackend()
    backend.script("http://a", Reply("one two three"), Failure("failed mid-stream", retryable=False, chunks=("x",)))
    chunks: list[str] = []

    async def on_chunk(text: str, calls: tuple[ToolCall, ...]) -> None:
        chunks.append(text)

    generation = await backend.generate("http://a", "m", prompt("p"), "", 1.0, on_chunk)
    assert chunks == ["one", " two", " three"] and generation.ttft_s == 0.0
    with pytest.raises(BackendError, match="mid-stream"):
        await backend.generate("http://a", "m", prompt("p"), "", 1.0, on_chunk)
    assert chunks[-1] == "x" and backend.endpoint("http://a").calls[1].streamed


async def test_memory_backend_answers_tool_calls_after_the_text_and_keeps_the_request() -> None:
    backend = MemoryBackend()
    call = ToolCall("get_weather", '{"city": "Lyon"}')
    backend.script("http://a", Reply("Checking.", tool_calls=(call,), done_reason="stop"), then=Reply("x"))
    told: list[tuple[str, tuple[ToolCall, ...]]] = []

    async def on_chunk(text: str, calls: tuple[ToolCall, ...]) -> None:
        told.append((text, calls))

    chat = prompt("And in Lyon?", messages=(Message("user", "And in Lyon?"),), tools=(Tool("get_weather"),))
    generation = await backend.generate("http://a", "m", chat, "sys", 1.0, on_chunk)
    assert told == [("Checking.", ()), ("", (call,))] and generation.tool_calls == (call,)
    recorded = backend.endpoint("http://a").calls[0]
    assert recorded.request is chat and (recorded.prompt, recorded.system) == ("And in Lyon?", "sys")
    backend.script("http://a", bad_request("m does not support tools"))
    with pytest.raises(BackendError) as refused_tools:
        await backend.generate("http://a", "m", chat, "", 1.0)
    assert refused_tools.value.bad_request and refused_tools.value.client_message == "m does not support tools"


async def test_a_held_call_answers_when_released_or_times_out_on_the_clock() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock)
    gate = asyncio.Event()
    backend.script("http://a", Hold(gate, Reply("late")), Hold())
    released = asyncio.ensure_future(backend.generate("http://a", "m", prompt("p"), "", 10.0))
    timed_out = asyncio.ensure_future(backend.generate("http://a", "m", prompt("p"), "", 10.0))
    await asyncio.sleep(0)
    assert backend.endpoint("http://a").in_flight == 2
    gate.set()
    assert (await released).text == "late"
    clock.advance(9.9)
    await asyncio.sleep(0)
    assert not timed_out.done()
    clock.advance(0.1)
    with pytest.raises(BackendError, match="did not answer within 10s"):
        await timed_out
    assert backend.endpoint("http://a").in_flight == 0 and backend.endpoint("http://a").most_in_flight == 2


async def test_memory_backend_probes_say_what_the_test_set() -> None:
    backend = MemoryBackend()
    assert await backend.probe("http://a", 1.0) is True
    backend.endpoint("http://a").healthy = False
    assert await backend.probe("http://a", 1.0) is False and backend.probes("http://a") == 2


# ----------------------------------------------------------------------------- clocks


async def test_manual_clock_ends_sleeps_and_waits_only_when_time_reaches_them() -> None:
    clock = ManualClock(start=0.0)
    short, long = asyncio.ensure_future(clock.sleep(1.0)), asyncio.ensure_future(clock.sleep(3.0))
    event = asyncio.Event()
    waited = asyncio.ensure_future(clock.wait_for(event, 2.0))
    set_in_time = asyncio.ensure_future(clock.wait_for(asyncio.Event(), 0.0))
    await asyncio.sleep(0)
    assert clock.pending() == [1.0, 2.0, 3.0] and await set_in_time is False
    assert clock.advance_to_next() and clock() == 1.0
    await asyncio.sleep(0)
    assert short.done() and not long.done() and not waited.done()
    event.set()
    assert await waited is True
    assert clock.advance_to_next() and clock() == 3.0 and await long is None
    assert not clock.advance_to_next()


async def test_a_plain_callable_is_a_system_clock() -> None:
    clock = as_clock(lambda: 42.0)
    assert isinstance(clock, SystemClock) and clock() == 42.0
    assert await clock.wait_for(asyncio.Event(), 0.001) is False
    manual = ManualClock()
    assert as_clock(manual) is manual

