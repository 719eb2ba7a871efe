"""Endpoints of kind ``openai``: the OpenAI-compatible backend against an in-process server that
speaks chat completions (whole and streamed over server-sent events), how its failures are
classified (as Ollama's are), and the dispatcher that calls each endpoint through its kind."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from nexus.settings import ENDPOINT_KINDS, EndpointSettings, ModelSettings, Settings, load_settings
from schemas import BAD_REQUEST, InferenceOptions, InferenceRequest, ModelContext, ToolCall
from streams.answering.cache import CacheEntry
from streams.answering.inference import Inference
from streams.backends import BACKENDS, Backend, BackendError, EndpointsBackend, Inventory, OpenAIBackend
from streams.backends.ollama import OllamaBackend, new_session
from streams.backends.openai import openai_options, status_error
from streams.metrics import WorkerMetrics

OPTIONS = InferenceOptions(temperature=0.0, max_tokens=5, seed=7)


def ask(text: str, options: InferenceOptions = OPTIONS, **changes: Any) -> InferenceRequest:
    """A prompt request, as the backend is given it."""
    return InferenceRequest("r", "m", text, ModelContext("s"), options, **changes)


@dataclass
class FakeServer:
    """What the fake OpenAI server saw: the bodies posted, by path."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    ollama_bodies: list[dict[str, Any]] = field(default_factory=list)


def _error(status: int, message: str, type_: str, code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": None, "code": code}},
                             status=status)


def _sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


def _chunk(content: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {"role": "assistant", "content": content} if content is not None else {}
    return {"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@pytest.fixture()
async def server() -> AsyncIterator[FakeServer]:
    seen = FakeServer()
    released = asyncio.Event()  # set at teardown: a "slow" call still running ends then

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.bodies.append(body)
        prompt = body["messages"][-1]["content"]
        if body["model"] == "ghost":
            return _error(404, f"The model `{body['model']}` does not exist.", "invalid_request_error",
                          "model_not_found")
        if prompt == "bad":
            return _error(400, "temperature must be at most 2", "invalid_request_error")
        if prompt == "rate":
            return _error(429, "Rate limit reached", "rate_limit_error")
        if prompt == "full":
            return _error(503, "Service Unavailable", "api_error")
        if prompt == "boom":
            return _error(500, "internal failure", "api_error")
        if prompt == "slow":
            await released.wait()
        words = ["echo", " ", prompt]
        if not body["stream"]:
            return web.json_response({
                "id": "c1", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                             "finish_reason": "length" if body.get("max_tokens") == 1 else "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
            })
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": keep-alive comment\n\n")
        await response.write(_sse(_chunk("")))  # the role first, no text (as Ollama and vLLM do)
        for word in words:
            await response.write(_sse(_chunk(word)))
            if prompt == "cut":
                return response  # the server dies mid-answer: no final chunk, no [DONE]
            if prompt == "midstream":
                await response.write(_sse({"error": {"message": "out of memory", "type": "api_error"}}))
                return response
            if prompt == "bare":  # Ollama's /v1 writes an error met mid-stream as plain JSON, not an event
                await response.write(json.dumps({"error": {"message": "runner died", "type": "api_error"}}).encode()
                                     + b"\n")
                return response
        await response.write(_sse(_chunk(None, "stop")))
        if body.get("stream_options", {}).get("include_usage"):
            await response.write(_sse({"id": "c1", "object": "chat.completion.chunk", "choices": [],
                                       "usage": {"prompt_tokens": 11, "completion_tokens": 3}}))
        await response.write(_sse(b"[DONE]"))
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "smollm2:135m", "object": "model", "owned_by": "library"},
            {"id": "qwen", "object": "model"},
        ]})

    async def ollama_generate(request: web.Request) -> web.Response:
        body = await request.json()
        seen.ollama_bodies.append(body)
        return web.json_response({"response": f"ollama {body['prompt']}", "done": True, "eval_count": 1})

    async def ollama_version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.0.0"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/api/generate", ollama_generate)
    app.router.add_get("/api/version", ollama_version)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    seen.url = f"http://127.0.0.1:{port}"
    yield seen
    released.set()
    await runner.cleanup()


@pytest.fixture()
async def bare() -> AsyncIterator[str]:
    """A web server that is not OpenAI-compatible at all: every path is a plain 404."""
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# ----------------------------------------------------------------------------- calls


async def test_a_whole_answer_with_system_and_user_messages_options_and_usage(server: FakeServer) -> None:
    async with new_session() as http:
        backend: Backend = OpenAIBackend(http)
        whole = await backend.generate(server.url, "m", ask("hi"), "be brief", 5.0)
    assert (whole.text, whole.prompt_tokens, whole.completion_tokens) == ("echo hi", 11, 3)
    assert (whole.done_reason, whole.ttft_s) == ("stop", None) and whole.seconds > 0
    body = server.bodies[0]
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert (body["model"], body["stream"], body["temperature"], body["max_tokens"], body["seed"]) == (
        "m", False, 0.0, 5, 7)
    assert "stream_options" not in body


async def test_no_system_message_when_the_system_prompt_is_empty_and_unset_options_are_left_out(
    server: FakeServer,
) -> None:
    async with new_session() as http:
        cut = await OpenAIBackend(http).generate(server.url, "m", ask("hi", InferenceOptions(max_tokens=1)), "", 5.0)
    assert cut.done_reason == "length"
    body = server.bodies[0]
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert "temperature" not in body and "seed" not in body
    assert openai_options(InferenceOptions()) == {}


async def test_a_streamed_answer_arrives_chunk_by_chunk_with_usage_and_says_when_it_was_sent(
    server: FakeServer,
) -> None:
    chunks: list[str] = []
    sent: list[bool] = []

    async def on_chunk(text: str, calls: tuple[ToolCall, ...]) -> None:
        chunks.append(text)

    async with new_session() as http:
        streamed = await OpenAIBackend(http).generate(
            server.url, "m", ask("hi"), "sys", 5.0, on_chunk, lambda: sent.append(True)
        )
    assert chunks == ["echo", " ", "hi"] and streamed.text == "echo hi"
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.done_reason) == (11, 3, "stop")
    assert streamed.ttft_s is not None and sent == [True]
    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "prompt, status, retryable, busy",
    [
        ("bad", 400, False, False),
        ("rate", 429, True, True),
        ("full", 503, True, True),  # vLLM, TGI and llama.cpp's server say 503 when full or loading
        ("boom", 500, True, False),
    ],
)
async def test_error_statuses_are_classified_as_for_ollama(
    server: FakeServer, prompt: str, status: int, retryable: bool, busy: bool
) -> None:
    async with new_session() as http:
        with pytest.raises(BackendError, match=f"answered {status}") as caught:
            await OpenAIBackend(http).generate(server.url, "m", ask(prompt), "", 5.0)
    error = caught.value
    assert (error.retryable, error.busy, error.reached, error.missing_model) == (retryable, busy, True, False)
    assert str(error).startswith(server.url)


async def test_a_model_the_server_lacks_is_missing_model_not_a_server_failure(server: FakeServer) -> None:
    async with new_session() as http:
        with pytest.raises(BackendError, match="does not exist") as caught:
            await OpenAIBackend(http).generate(server.url, "ghost", ask("hi"), "", 5.0)
    assert caught.value.missing_model and not caught.value.busy and caught.value.reached


@pytest.mark.parametrize(
    "body",
    [
        # OpenAI's own
        {"error": {"message": "The model `x` does not exist", "type": "invalid_request_error", "code": "model_not_found"}},
        # Ollama's /v1
        {"error": {"message": "model \"x\" not found, try pulling it first", "type": "not_found_error", "param": None,
                   "code": None}},
        # Ollama 0.17.4's /v1 as it writes it (every error typed api_error)
        {"error": {"message": "model \"x\" not found, try pulling it first", "type": "api_error"}},
        # vLLM's
        {"object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError", "param": None,
         "code": 404},
    ],
)
def test_a_missing_model_is_recognised_in_each_servers_words(body: dict[str, Any]) -> None:
    assert status_error("http://a", 404, json.dumps(body).encode()).missing_model


async def test_a_server_without_the_openai_api_is_named_as_such(bare: str) -> None:
    async with new_session() as http:
        with pytest.raises(BackendError, match="OpenAI-compatible") as caught:
            await OpenAIBackend(http).generate(bare, "m", ask("hi"), "", 5.0)
        assert not caught.value.missing_model and not caught.value.retryable
        assert await OpenAIBackend(http).probe(bare, 2.0) is False


async def test_timeouts_and_unreachable_servers_are_retryable(server: FakeServer) -> None:
    down = closed_port()
    async with new_session() as http:
        backend = OpenAIBackend(http)
        with pytest.raises(BackendError, match="did not answer within 0.2s") as slow:
            await backend.generate(server.url, "m", ask("slow"), "", 0.2)
        assert slow.value.retryable and not slow.value.busy
        with pytest.raises(BackendError, match="unreachable") as unreachable:
            await backend.generate(down, "m", ask("x"), "", 5.0)
        assert unreachable.value.retryable and not unreachable.value.reached


async def test_a_stream_broken_or_failing_mid_way_fails_the_call(server: FakeServer) -> None:
    chunks: list[str] = []

    async def on_chunk(text: str, calls: tuple[ToolCall, ...]) -> None:
        chunks.append(text)

    async with new_session() as http:
        backend = OpenAIBackend(http)
        with pytest.raises(BackendError, match="without a final chunk") as cut:
            await backend.generate(server.url, "m", ask("cut"), "", 5.0, on_chunk)
        assert cut.value.retryable
        with pytest.raises(BackendError, match="failed mid-stream: out of memory") as failed:
            await backend.generate(server.url, "m", ask("midstream"), "", 5.0, on_chunk)
        assert not failed.value.retryable
        with pytest.raises(BackendError, match="failed mid-stream: runner died"):
            await backend.generate(server.url, "m", ask("bare"), "", 5.0, on_chunk)
    assert chunks == ["echo", "echo", "echo"]


async def test_probe_and_inventory_read_the_model_list(server: FakeServer) -> None:
    down = closed_port()
    async with new_session() as http:
        backend = OpenAIBackend(http)
        assert await backend.probe(server.url, 2.0) is True
        assert await backend.probe(down, 2.0) is False
        inventory = await backend.inventory(server.url, 2.0)
        assert inventory == Inventory(available=frozenset({"smollm2:135m", "qwen"}), loaded=None)
        assert inventory.has("qwen") and inventory.is_loaded("qwen") is None
        with pytest.raises(BackendError, match="unreachable"):
            await backend.inventory(down, 2.0)


# ----------------------------------------------------------------------------- the dispatcher


def test_every_endpoint_kind_the_settings_accept_has_a_backend() -> None:
    assert set(BACKENDS) == set(ENDPOINT_KINDS)
    with pytest.raises(ValueError, match="'vllm'"):
        EndpointsBackend({"ollama": object()}, {"http://a": "vllm"})  # type: ignore[dict-item]


async def test_the_dispatcher_calls_each_endpoint_through_its_kind(server: FakeServer, tmp_path: Path) -> None:
    config = tmp_path / "nexus.toml"
    config.write_text(
        f'[models.m]\nendpoints = [{{ url = "{server.url}/v1/", kind = "openai" }}]\n'
        f'[models.n]\nendpoints = ["http://localhost:1"]\n'
    )
    settings = load_settings(config, environ={})
    async with new_session() as http:
        backend = EndpointsBackend.from_settings(settings, http)
        assert backend.kind(server.url) == "openai" and isinstance(backend.backend(server.url), OpenAIBackend)
        assert backend.kind("http://localhost:1") == "ollama"
        assert isinstance(backend.backend("http://elsewhere"), OllamaBackend)  # not configured: Ollama
        answer = await backend.generate(server.url, "m", ask("hi"), "", 5.0)
        assert answer.text == "echo hi" and len(server.bodies) == 1 and not server.ollama_bodies
        assert await backend.probe(server.url, 2.0) is True
        assert (await backend.inventory(server.url, 2.0)).has("qwen")
    # The same server called as an Ollama endpoint goes to its native API.
    ollama = Settings(models=(ModelSettings("m", (EndpointSettings(server.url),)),))
    async with new_session() as http:
        answer = await EndpointsBackend.from_settings(ollama, http).generate(server.url, "m", ask("hi"), "", 5.0)
    assert answer.text == "ollama hi" and len(server.ollama_bodies) == 1


class DictCache:
    def __init__(self) -> None:
        self.entries: dict[bytes, CacheEntry] = {}

    def get(self, key: bytes) -> CacheEntry | None:
        return self.entries.get(key)

    async def put(self, request: InferenceRequest, key: bytes, entry: CacheEntry) -> None:
        self.entries[key] = entry


class Sink:
    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.tool_calls: list[ToolCall] = []

    async def chunk(self, text: str, tool_calls: tuple[ToolCall, ...] = (), *, flush: bool = False) -> None:
        self.chunks.append(text)
        self.tool_calls.extend(tool_calls)


async def test_the_worker_answers_streams_and_caches_through_an_openai_endpoint(server: FakeServer) -> None:
    """Inference built with only an HTTP session, as the worker builds it: the endpoint's kind decides."""
    settings = Settings(models=(ModelSettings("m", (EndpointSettings(server.url, kind="openai"),)),))
    deterministic = InferenceOptions(temperature=0.0, seed=1)
    async with new_session() as http:
        inference = Inference(settings, http, WorkerMetrics(), DictCache(), rng=random.Random(1))
        try:
            sink = Sink()
            first = (await inference.answer(
                InferenceRequest("r1", "m", "hi", ModelContext("s1"), options=deterministic, stream=True), sink
            )).response
            again = (await inference.answer(
                InferenceRequest("r2", "m", "hi", ModelContext("s1"), options=deterministic)
            )).response
            missing = (await inference.answer(InferenceRequest("r3", "m", "bad", ModelContext("s3")))).response
        finally:
            await inference.aclose()
    assert (first.status, first.output, first.endpoint, first.cached) == ("ok", "echo hi", server.url, False)
    assert (first.prompt_tokens, first.completion_tokens, first.done_reason) == (11, 3, "stop")
    assert sink.chunks == ["echo", " ", "hi"]
    assert (again.status, again.output, again.cached) == ("ok", "echo hi", True)
    assert (missing.status, missing.error_kind) == ("error", BAD_REQUEST)
    assert missing.error == "temperature must be at most 2", "the server's own words"
    assert len(server.bodies) == 2  # the cached answer made no call
