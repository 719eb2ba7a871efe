"""Ollama's HTTP API on Nexus: existing Ollama clients point their host at the gateway.

``POST /api/generate`` and ``POST /api/chat`` (NDJSON streaming by default, or one object
with ``"stream": false``, ending with Ollama's statistics), ``GET /api/tags`` (the models
Nexus routes), ``GET /api/version``. Each call becomes an :class:`InferenceRequest` on
``inference.requests`` (batching, routing, caching, metrics and the audit log see it like
any other) and is answered from Kafka through :mod:`producers.gateway.replies`.

The body rules and answer shapes are plain functions (``parse_generate``, ``parse_chat``,
``final_object``...); the handlers at the bottom are the aiohttp shell.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nexus.access import AccessPolicy, Forbidden
from schemas import InferenceOptions, InferenceRequest, InferenceResponse, new_id, utcnow

from producers.gateway import access as access_http
from producers.client import SubmitError
from producers.gateway.dropin.conversation import (
    IGNORED_HEADER,
    REQUEST_ID_HEADER,
    CallContext,
    DropInError,
    call_context,
    flag,
    integer,
    number,
    render_conversation,
    require_model,
    resolve_model,
    unsupported,
)
from producers.gateway.replies import ReplyError, ReplyTimeoutError

if TYPE_CHECKING:
    from producers.gateway.dropin.call import DropIn

NDJSON = "application/x-ndjson"
MODEL_REQUIRED = "model is required"  # Ollama's own message
_MAPPED_OPTIONS = {"temperature", "num_predict", "seed"}


@dataclass(frozen=True)
class OllamaCall:
    """A parsed generate or chat call."""

    model: str  # as the client spelled it; Ollama echoes it back unchanged
    chat: bool
    stream: bool
    request: InferenceRequest | None  # None: Ollama's "load the model" call, answered at once
    ignored: tuple[str, ...] = ()


def parse_generate(body: Any, known: Collection[str], call: CallContext) -> OllamaCall:
    """``POST /api/generate``: ``prompt`` (with ``system``, if given, as a two-turn conversation)."""
    body = _object(body)
    model, model_id = require_model(body, known, "model", MODEL_REQUIRED)
    for key in ("suffix", "template", "context", "images", "format"):
        if body.get(key):
            raise unsupported(key)
    for key in ("raw", "think", "logprobs", "top_logprobs", "width", "height", "steps"):
        if body.get(key):
            raise unsupported(key)
    prompt = _string(body, "prompt")
    system = _string(body, "system")
    stream = flag(body.get("stream"), "stream", True)
    options, ignored = _options(body)
    if not prompt:
        return OllamaCall(model, False, stream, None, ignored)
    turns = ([("system", system)] if system else []) + [("user", prompt)]
    return OllamaCall(model, False, stream, _request(model_id, render_conversation(turns), options, stream, call), ignored)


def parse_chat(body: Any, known: Collection[str], call: CallContext) -> OllamaCall:
    """``POST /api/chat``: the conversation becomes one input (:func:`render_conversation`)."""
    body = _object(body)
    model, model_id = require_model(body, known, "model", MODEL_REQUIRED)
    if body.get("tools"):
        raise unsupported("tools", "Nexus answers with text only")
    for key in ("format", "think", "logprobs", "top_logprobs"):
        if body.get(key):
            raise unsupported(key)
    stream = flag(body.get("stream"), "stream", True)
    options, ignored = _options(body)
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise DropInError(400, "'messages' must be a list of objects", param="messages")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DropInError(400, f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise DropInError(400, f"messages[{i}].role must be system, user or assistant (tools are not supported)",
                              param="messages")
        for key in ("images", "tool_calls"):
            if message.get(key):
                raise unsupported(f"messages[{i}].{key}")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise DropInError(400, f"messages[{i}].content must be a string", param="messages")
        turns.append((role, content))
    if not turns:
        return OllamaCall(model, True, stream, None, ignored)
    return OllamaCall(model, True, stream, _request(model_id, render_conversation(turns), options, stream, call), ignored)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise DropInError(400, "request body must be a JSON object")
    return body


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DropInError(400, f"'{key}' must be a string", param=key)
    return value


def _options(body: dict[str, Any]) -> tuple[InferenceOptions, tuple[str, ...]]:
    """temperature, num_predict (-> max_tokens; <= 0 means no limit, as in Ollama) and seed.

    Other options are ignored and named in the ``X-Nexus-Ignored`` header: Nexus's
    pipeline carries only these three to the model.
    """
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise DropInError(400, "'options' must be an object", param="options")
    temperature = number(options.get("temperature"), "options.temperature", 0, math.inf)
    num_predict = integer(options.get("num_predict"), "options.num_predict", -2, 2**31 - 1)
    seed = integer(options.get("seed"), "options.seed")
    ignored = tuple(sorted(f"options.{k}" for k, v in options.items() if k not in _MAPPED_OPTIONS and v is not None))
    if body.get("keep_alive") is not None:
        ignored += ("keep_alive",)
    max_tokens = num_predict if num_predict is not None and num_predict > 0 else None
    return InferenceOptions(temperature=temperature, max_tokens=max_tokens, seed=seed), ignored


def _request(model_id: str, text: str, options: InferenceOptions, stream: bool, call: CallContext) -> InferenceRequest:
    return InferenceRequest(
        id=new_id(), model_id=model_id, input=text, context=call.context, options=options,
        stream=stream, cache=call.cache,  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- answers


def rfc3339(moment: datetime) -> str:
    """Ollama's created_at format: UTC, microseconds, trailing Z."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ollama_stats(response: InferenceResponse) -> dict[str, int]:
    """Ollama's final-chunk statistics from the response, in nanoseconds (docs/drop-in.md).

    total = end-to-end latency; load = time spent in Nexus outside the model call (Kafka,
    batching, waiting for a slot); prompt_eval = time to the first token when streamed;
    eval = the rest of the model call. A cached answer has no model call: all in load.
    """
    ms = 1_000_000
    total = response.latency_ms * ms
    backend = min(response.backend_latency_ms * ms, total)
    prompt_eval = min((response.time_to_first_token_ms or 0) * ms, backend)
    return {
        "total_duration": total,
        "load_duration": total - backend,
        "prompt_eval_count": response.prompt_tokens,
        "prompt_eval_duration": prompt_eval,
        "eval_count": response.completion_tokens,
        "eval_duration": backend - prompt_eval,
    }


def chunk_object(call: OllamaCall, text: str, now: datetime) -> dict[str, Any]:
    base: dict[str, Any] = {"model": call.model, "created_at": rfc3339(now)}
    if call.chat:
        return {**base, "message": {"role": "assistant", "content": text}, "done": False}
    return {**base, "response": text, "done": False}


def final_object(call: OllamaCall, response: InferenceResponse | None, text: str) -> dict[str, Any]:
    """The last object: ``text`` is the whole answer unstreamed, '' after a stream."""
    base: dict[str, Any] = {
        "model": call.model,
        "created_at": rfc3339(response.completed_at if response else utcnow()),
    }
    if call.chat:
        base["message"] = {"role": "assistant", "content": text}
    else:
        base["response"] = text
    if response is None:  # the "load" call
        return {**base, "done": True, "done_reason": "load"}
    return {**base, "done": True, "done_reason": response.done_reason or "stop", **ollama_stats(response)}


def tags_object(model_ids: Collection[str], since: datetime) -> dict[str, Any]:
    """``GET /api/tags`` in Ollama's shape; Nexus knows no sizes or digests of the models it routes."""
    details = {"parent_model": "", "format": "", "family": "", "families": [], "parameter_size": "",
               "quantization_level": ""}
    return {
        "models": [
            {"name": m, "model": m, "modified_at": rfc3339(since), "size": 0, "digest": "", "details": details}
            for m in model_ids
        ]
    }


# --------------------------------------------------------------------------- HTTP


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def add_ollama_routes(app: web.Application, dropin: "DropIn") -> None:
    """Register ``/api/generate``, ``/api/chat``, ``/api/tags`` and ``/api/version``."""
    known = dropin.settings.model_ids
    started = utcnow()

    async def answer(request: web.Request, chat: bool) -> web.StreamResponse:
        route = "chat" if chat else "generate"
        model_label = ""
        try:
            try:
                body = json.loads(await request.read())
            except (ValueError, UnicodeDecodeError) as exc:
                raise DropInError(400, f"invalid JSON body: {exc}") from None
            call = call_context(request.headers.items(), dropin.settings.gateway.reply_timeout_s)
            parsed = (parse_chat if chat else parse_generate)(body, known, call)
        except DropInError as exc:
            dropin.metrics.count("ollama", route, "", exc.status)
            return _error(exc.status, exc.message)
        model_id = resolve_model(parsed.model, known) or parsed.model  # parsing found it
        try:
            access_http.authorize(request, model_id)  # the load call too: it names a model
        except Forbidden:
            dropin.metrics.count("ollama", route, model_id, 403)
            raise  # the access middleware answers 403
        headers = {IGNORED_HEADER: ",".join(parsed.ignored)} if parsed.ignored else {}
        if parsed.request is None:
            dropin.metrics.count("ollama", route, "", 200)
            return web.json_response(final_object(parsed, None, ""), headers=headers)
        model_label = parsed.request.model_id
        inference = dataclasses.replace(parsed.request, key_name=AccessPolicy.owner(access_http.key_of(request)))
        parsed = dataclasses.replace(parsed, request=inference)
        headers[REQUEST_ID_HEADER] = inference.id
        response = await _exchange(request, dropin, parsed, call, headers)
        dropin.metrics.count("ollama", route, model_label, response.status)
        return response

    async def generate(request: web.Request) -> web.StreamResponse:
        return await answer(request, chat=False)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await answer(request, chat=True)

    async def tags(request: web.Request) -> web.Response:
        allowed = access_http.policy_of(request).models_for(access_http.key_of(request), known)
        return web.json_response(tags_object(allowed, started))

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": dropin.version})

    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/version", version)


async def _exchange(
    http: web.Request, dropin: "DropIn", call: OllamaCall, context: CallContext, headers: dict[str, str]
) -> web.StreamResponse:
    """Submit, wait, answer: one object, or NDJSON chunks then the final object."""
    assert call.request is not None
    exchange = dropin.exchange
    try:
        waiter = await exchange.submit(call.request)
    except (SubmitError, ReplyError) as exc:
        return _error(503, str(exc), headers)
    clock = dropin.clock
    t0 = clock()
    deadline = t0 + context.timeout_s
    try:
        if not call.stream:
            response = await exchange.response(waiter, deadline, context.timeout_s)
            dropin.metrics.answered("ollama", clock() - t0)
            if response.status != "ok":
                return _error(500, response.error or "the request failed", headers)
            return web.json_response(final_object(call, response, response.output), headers=headers)

        # The status line waits for the first chunk, so an early failure still gets its status.
        event = await exchange.next_event(waiter, deadline, context.timeout_s)
        if isinstance(event, InferenceResponse) and event.status != "ok":
            dropin.metrics.answered("ollama", clock() - t0)
            return _error(500, event.error or "the request failed", headers)
        stream = web.StreamResponse(headers={"Content-Type": NDJSON, **headers})
        await stream.prepare(http)
        try:
            try:
                while True:
                    if isinstance(event, str):
                        await stream.write(_line(chunk_object(call, event, datetime.now(timezone.utc))))
                    else:
                        dropin.metrics.answered("ollama", clock() - t0)
                        if event.status != "ok":  # mid-stream: Ollama's way is an error line
                            await stream.write(_line({"error": event.error or "the request failed"}))
                        else:
                            await stream.write(_line(final_object(call, event, "")))
                        break
                    event = await exchange.next_event(waiter, deadline, context.timeout_s)
            except ReplyError as exc:
                if isinstance(exc, ReplyTimeoutError):
                    dropin.metrics.timeouts.labels(api="ollama").inc()
                await stream.write(_line({"error": str(exc)}))
            await stream.write_eof()
        except ConnectionResetError:
            pass  # the client went away; its answer still lands in the audit log
        return stream
    except ReplyTimeoutError as exc:
        dropin.metrics.timeouts.labels(api="ollama").inc()
        return _error(504, str(exc), headers)
    except ReplyError as exc:
        return _error(503, str(exc), headers)
    finally:
        exchange.release(waiter)
