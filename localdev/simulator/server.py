"""aiohttp shell around ``localdev.simulator.model``: a fake Ollama speaking the real REST protocol.

Every response carries ``X-Ollama-Simulator: nexus`` and the version is
``0.0.0-simulated`` so nobody mistakes it for a real model server.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, UTC
from typing import Any

from aiohttp import web

from localdev.simulator import conversation
from localdev.simulator.conversation import Answer
from localdev.simulator.model import (
    BUSY_ERROR,
    FAILURE_ERROR,
    MODEL_REQUIRED_ERROR,
    SIMULATOR_HEADER,
    SIMULATOR_HEADER_VALUE,
    VERSION,
    Admission,
    ApiError,
    GenerationStats,
    SimulatorConfig,
    SimulatorStats,
    SlotQueue,
    chat_chunk,
    chat_final,
    chat_load,
    compute_stats,
    context_ids,
    embed_response,
    embedding,
    generate_chunk,
    generate_final,
    generate_load,
    last_user_content,
    not_found_error,
    prompt_token_count,
    ps_response,
    resolve_model,
    rfc3339,
    should_fail,
    tags_response,
    tokenize,
    tools_unsupported_error,
)

__all__ = ["ApiError", "RunningSimulator", "SimulatorState", "create_app", "serve", "start_server"]

_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))  # like Go


@dataclass
class SimulatorState:
    """Everything mutable of one simulated server; lives in the app, never in the module."""

    config: SimulatorConfig
    slots: SlotQueue[asyncio.Future[None]]
    stats: SimulatorStats = field(default_factory=SimulatorStats)
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_config(cls, config: SimulatorConfig) -> SimulatorState:
        return cls(
            config=config,
            slots=SlotQueue(config.parallel, config.max_queue),
            stats=SimulatorStats(body_limit=config.record_bodies),
            rng=random.Random(config.seed),
        )


STATE_KEY = web.AppKey("simulator_state", SimulatorState)
STATS_KEY = web.AppKey("simulator_stats", SimulatorStats)


def _now() -> str:
    return rfc3339(datetime.now(UTC))


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


# --------------------------------------------------------------------------- plumbing


@web.middleware
async def _errors_and_counts(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count every request and map ApiError to a JSON error response."""
    stats = request.app[STATS_KEY]
    stats.received[request.path] += 1
    try:
        response = await handler(request)
    except ApiError as exc:
        if exc.status < 500:
            stats.client_errors += 1
        return _json({"error": exc.message}, status=exc.status)
    if response.status < 300:
        stats.served[request.path] += 1
    return response


async def _stamp_simulator_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook, so even streamed and 404 responses are marked simulated."""
    response.headers[SIMULATOR_HEADER] = SIMULATOR_HEADER_VALUE


async def _read_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from None
    request.app[STATS_KEY].record_body(request.path, body)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _requested_model(body: dict[str, Any], state: SimulatorState) -> str:
    """The model name as the client spelled it (Ollama echoes it back unchanged)."""
    model = body.get("model", "")
    if not isinstance(model, str):
        raise ApiError(400, MODEL_REQUIRED_ERROR)
    if not model.strip():  # Ollama 0.17.4 looks the empty name up like any other: 404
        raise ApiError(404, not_found_error(model))
    if resolve_model(model, state.config.models) is None:
        raise ApiError(404, not_found_error(model))
    return model


def _optional_str(body: dict[str, Any], key: str, struct: str = "GenerateRequest") -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise conversation.unmarshal_error(value, f"{struct}.{key}", "string")
    return value


def _stream_flag(body: dict[str, Any], struct: str = "GenerateRequest") -> bool:
    value = body.get("stream")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise conversation.unmarshal_error(value, f"{struct}.stream", "bool")
    return value


def _refuse_thinking(model: str, body: dict[str, Any]) -> None:
    refusal = conversation.thinking_refused(model, body.get("think"))
    if refusal is not None:
        raise refusal


def _unloading(keep_alive: float | None) -> bool:
    """keep_alive 0 with nothing to answer is Ollama's "unload the model now"."""
    return keep_alive == 0


def _release(state: SimulatorState) -> None:
    """Free a slot, handing it to the next live waiter (skipping ones that gave up)."""
    while (waiter := state.slots.release()) is not None:
        if not waiter.done():
            waiter.set_result(None)
            break
    state.stats.active = state.slots.active


@asynccontextmanager
async def _slot(state: SimulatorState) -> AsyncIterator[None]:
    """Hold one of ``parallel`` slots for the whole block, queueing or answering 503."""
    ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    decision = state.slots.admit(ticket)
    if decision is Admission.REJECT:
        state.stats.rejected_busy += 1
        raise ApiError(503, BUSY_ERROR)
    if decision is Admission.WAIT:
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                _release(state)  # the slot reached us just as we were cancelled
            else:
                state.slots.withdraw(ticket)
            state.stats.disconnects += 1
            raise
    state.stats.active = state.slots.active
    state.stats.max_concurrent = max(state.stats.max_concurrent, state.slots.max_active)
    try:
        yield
    finally:
        _release(state)


ToolCalls = list[dict[str, Any]]
ChunkFn = Callable[[str, str, ToolCalls], dict[str, Any]]
FinalFn = Callable[[str, str, GenerationStats, ToolCalls], dict[str, Any]]


def _pieces(answer: Answer) -> list[tuple[str, ToolCalls]]:
    """What each streamed chunk carries: a token of text, or one whole tool call (content "")."""
    return [(token, []) for token in answer.tokens] + [("", [call]) for call in answer.tool_calls]


async def _generate(
    request: web.Request,
    state: SimulatorState,
    *,
    stream: bool,
    answer: Answer,
    prompt_eval_count: int,
    started: int,
    chunk: ChunkFn,
    final: FinalFn,
    model: str = "",
    prompt: str = "",
) -> web.StreamResponse:
    """Pace the answer by ttft/tokens_per_s inside a slot; NDJSON if streaming, else one object.

    A client that goes away stops the generation where it is (as Ollama does), counted in
    the stats' ``generations_stopped`` with ``model`` and ``prompt`` to tell which it was.
    """
    config = state.config
    loop = asyncio.get_running_loop()
    pieces = _pieces(answer)

    def stopped(streamed: int) -> None:
        state.stats.disconnects += 1
        state.stats.record_stop(request.path, model, prompt, streamed, len(pieces), stream)

    async with _slot(state):
        t0 = loop.time()
        if not stream:
            delay = config.generation_seconds(len(pieces))
            if delay > 0:
                try:
                    await asyncio.sleep(delay)
                except asyncio.CancelledError:
                    stopped(0)
                    raise
            stats = compute_stats(config, prompt_eval_count, answer.eval_count, _elapsed_ns(started))
            state.stats.tokens_generated += answer.eval_count
            return _json(final(_now(), answer.text, stats, list(answer.tool_calls)))

        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        response.enable_chunked_encoding()
        streamed = 0
        try:
            await response.prepare(request)
            for i, (text, calls) in enumerate(pieces):
                due = t0 + config.ttft_ms / 1000.0 + i * config.token_interval_s
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await response.write(_line(chunk(_now(), text, calls)))
                state.stats.tokens_generated += 1
                streamed += 1
            stats = compute_stats(config, prompt_eval_count, answer.eval_count, _elapsed_ns(started))
            await response.write(_line(final(_now(), "", stats, [])))
            await response.write_eof()
        except ConnectionResetError:
            stopped(streamed)  # client went away; the slot is freed by _slot
        except asyncio.CancelledError:
            stopped(streamed)
            raise
        return response


def _line(obj: dict[str, Any]) -> bytes:
    return (_dumps(obj) + "\n").encode()


def _elapsed_ns(started: int) -> int:
    return time.perf_counter_ns() - started


def _maybe_fail(state: SimulatorState) -> None:
    if should_fail(state.rng, state.config.fail_rate):
        state.stats.simulated_failures += 1
        raise ApiError(500, FAILURE_ERROR)


# --------------------------------------------------------------------------- handlers


async def handle_generate(request: web.Request) -> web.StreamResponse:
    """POST /api/generate, checked in Ollama's order: the body's types (400), the model (404),
    unload/load calls, options (500), then ``format`` (500) when the runner would start."""
    started = time.perf_counter_ns()
    state = request.app[STATE_KEY]
    state.stats.record_arrival(time.monotonic())
    body = await _read_body(request)
    stream = _stream_flag(body)
    prompt = _optional_str(body, "prompt") or ""
    system = _optional_str(body, "system")
    conversation.images(body.get("images"), "GenerateRequest.images")
    keep_alive = conversation.keep_alive_seconds(body.get("keep_alive"))
    options = conversation.options_object(body, "GenerateRequest")
    model = _requested_model(body, state)
    if not prompt and _unloading(keep_alive):
        return _json(generate_load(model, _now(), "unload"))
    _refuse_thinking(model, body)
    parsed_options = conversation.parse_options(options)
    if not prompt:  # Ollama loads the model and answers nothing, even when images came along
        return _json(generate_load(model, _now(), "load"))
    _maybe_fail(state)
    answer_format = conversation.parse_format(body.get("format"))

    answer = conversation.generate_answer(model, prompt, answer_format, parsed_options)
    prompt_tokens = tokenize(prompt)

    def final(created_at: str, text: str, stats: GenerationStats, _calls: ToolCalls) -> dict[str, Any]:
        ctx = context_ids(prompt_tokens + list(answer.tokens))
        return generate_final(model, created_at, text, answer.done_reason, ctx, stats)

    response = await _generate(
        request,
        state,
        stream=stream,
        answer=answer,
        prompt_eval_count=prompt_token_count(prompt, system),
        started=started,
        chunk=lambda created_at, text, _calls: generate_chunk(model, created_at, text),
        final=final,
        model=model,
        prompt=prompt,
    )
    state.stats.served_by_model[model] += 1
    return response


async def handle_chat(request: web.Request) -> web.StreamResponse:
    """POST /api/chat, checked in Ollama's order (see handle_generate); tools offered to a model
    configured with ``no_tools`` are Ollama's 400, even with no messages."""
    started = time.perf_counter_ns()
    state = request.app[STATE_KEY]
    state.stats.record_arrival(time.monotonic())
    body = await _read_body(request)
    stream = _stream_flag(body, "ChatRequest")
    turns = conversation.messages(body)
    offered = conversation.tools(body)
    keep_alive = conversation.keep_alive_seconds(body.get("keep_alive"))
    options = conversation.options_object(body, "ChatRequest")
    model = _requested_model(body, state)
    if not turns and _unloading(keep_alive):
        return _json(chat_load(model, _now(), "unload"))
    _refuse_thinking(model, body)
    if offered and not state.config.supports_tools(model):
        served = resolve_model(model, state.config.models) or model
        raise ApiError(400, tools_unsupported_error(served))
    parsed_options = conversation.parse_options(options)
    if not turns:
        return _json(chat_load(model, _now(), "load"))
    _maybe_fail(state)
    answer_format = conversation.parse_format(body.get("format"))

    answer = conversation.chat_answer(model, turns, offered, answer_format, parsed_options)
    response = await _generate(
        request,
        state,
        stream=stream,
        answer=answer,
        prompt_eval_count=prompt_token_count(*conversation.history_texts(turns)),
        started=started,
        chunk=lambda created_at, text, calls: chat_chunk(model, created_at, text, calls),
        final=lambda created_at, text, stats, calls: chat_final(
            model, created_at, text, answer.done_reason, stats, calls
        ),
        model=model,
        prompt=last_user_content(list(turns)),
    )
    state.stats.served_by_model[model] += 1
    return response


def _embed_inputs(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ApiError(400, "invalid input type: 'input' must be a string or a list of strings")


async def handle_embed(request: web.Request) -> web.Response:
    started = time.perf_counter_ns()
    state = request.app[STATE_KEY]
    body = await _read_body(request)
    model = _requested_model(body, state)
    inputs = _embed_inputs(body.get("input"))
    async with _slot(state):
        vectors = [embedding(model, text) for text in inputs]
    state.stats.served_by_model[model] += 1
    return _json(
        embed_response(model, vectors, prompt_token_count(*inputs), _elapsed_ns(started))
    )


async def handle_embeddings_legacy(request: web.Request) -> web.Response:
    """Deprecated ``/api/embeddings`` ({prompt} -> {embedding}), still used by old clients."""
    state = request.app[STATE_KEY]
    body = await _read_body(request)
    model = _requested_model(body, state)
    prompt = _optional_str(body, "prompt", "EmbeddingRequest") or ""
    async with _slot(state):
        vector = embedding(model, prompt) if prompt else []
    state.stats.served_by_model[model] += 1
    return _json({"embedding": vector})


async def handle_tags(request: web.Request) -> web.Response:
    config = request.app[STATE_KEY].config
    return _json(tags_response(config, datetime.now(UTC)))


async def handle_ps(request: web.Request) -> web.Response:
    config = request.app[STATE_KEY].config
    return _json(ps_response(config, datetime.now(UTC)))


async def handle_version(request: web.Request) -> web.Response:
    return _json({"version": VERSION})


async def handle_root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def handle_stats(request: web.Request) -> web.Response:
    """Not part of Ollama: lets out-of-process benchmarks read the counters."""
    return _json(request.app[STATS_KEY].snapshot())


# --------------------------------------------------------------------------- app & serving


def create_app(config: SimulatorConfig) -> web.Application:
    """A fresh simulator app; its state is at ``app[STATE_KEY]``, counters at ``app[STATS_KEY]``."""
    app = web.Application(middlewares=[_errors_and_counts])
    state = SimulatorState.from_config(config)
    app[STATE_KEY] = state
    app[STATS_KEY] = state.stats
    app.on_response_prepare.append(_stamp_simulator_header)
    app.router.add_get("/", handle_root)  # also answers HEAD
    app.router.add_post("/api/generate", handle_generate)
    app.router.add_post("/api/chat", handle_chat)
    app.router.add_post("/api/embed", handle_embed)
    app.router.add_post("/api/embeddings", handle_embeddings_legacy)
    app.router.add_get("/api/tags", handle_tags)
    app.router.add_get("/api/ps", handle_ps)
    app.router.add_get("/api/version", handle_version)
    app.router.add_get("/simulator/stats", handle_stats)
    return app


@dataclass
class RunningSimulator:
    """A started simulator (see ``start_server``); usable as an async context manager."""

    app: web.Application
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stats(self) -> SimulatorStats:
        return self.app[STATS_KEY]

    async def close(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningSimulator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_server(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0
) -> RunningSimulator:
    """Start listening (port 0 = pick a free one) and return a handle with the real URL.

    ``handler_cancellation`` makes a client disconnect cancel its handler, so the slot
    is released at once instead of after the simulated generation would have ended.
    """
    app = create_app(config)
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound_port = int(address[1])
            break
    return RunningSimulator(app=app, runner=runner, host=host, port=bound_port)


def banner(config: SimulatorConfig, url: str) -> str:
    return (
        f"*** Nexus Ollama SIMULATOR on {url} — answers are SIMULATED, not from a real "
        f"model (models: {', '.join(config.models)}; ttft {config.ttft_ms:g} ms, "
        f"{config.tokens_per_s:g} tok/s, parallel {config.parallel}, "
        f"max queue {config.max_queue}, fail rate {config.fail_rate:g}"
        f"{'; no tools: ' + ', '.join(config.no_tools) if config.no_tools else ''}) ***"
    )


async def serve(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 11434) -> None:
    """Run the simulator until cancelled, announcing loudly on stderr that it is fake."""
    simulator = await start_server(config, host, port)
    try:
        print(banner(config, simulator.url), file=sys.stderr, flush=True)
        await asyncio.Event().wait()
    finally:
        await simulator.close()
