"""Ollama's HTTP API on Nexus: existing Ollama clients point their host at the gateway.

``POST /api/generate`` and ``POST /api/chat`` (NDJSON streaming by default, or one object
with ``"stream": false``, ending with Ollama's statistics), ``GET /api/tags`` (the models
Nexus routes), ``GET /api/version``. Each call becomes an :class:`InferenceRequest` on
``inference.requests`` (batching, routing, caching, metrics and the audit log see it like
any other) and is answered from Kafka through :mod:`producers.replies`.

The body rules and answer shapes are plain functions (``parse_generate``, ``parse_chat``,
``final_object``...); :class:`OllamaApi` hands them to the flow every drop-in call shares
(:mod:`producers.gateway.dropin.call`: submit, wait, 503/504, metrics).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from schemas import InferenceOptions, InferenceRequest, InferenceResponse, new_id, utcnow
from schemas import validation

from producers.gateway import access as access_http
from producers.gateway.dropin.call import DropIn, DropInApi, call_handler
from producers.gateway.dropin.conversation import (
    IGNORED_HEADER,
    REQUEST_ID_HEADER,
    CallContext,
    DropInError,
    flag,
    integer,
    number,
    render_conversation,
    require_model,
    unsupported,
)

NDJSON = "application/x-ndjson"
MODEL_REQUIRED = "model is required"  # Ollama's own message
_MAPPED_OPTIONS = {"temperature", "num_predict", "seed"}


@dataclass(frozen=True)
class OllamaCall:
    """A parsed generate or chat call."""

    model: str  # as the client spelled it; Ollama echoes it back unchanged
    model_id: str  # the Nexus model it names
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
        return OllamaCall(model, model_id, False, stream, None, ignored)
    turns = ([("system", system)] if system else []) + [("user", prompt)]
    request = _request(model_id, render_conversation(turns), options, stream, call)
    return OllamaCall(model, model_id, False, stream, request, ignored)


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
        return OllamaCall(model, model_id, True, stream, None, ignored)
    return OllamaCall(model, model_id, True, stream, _request(model_id, render_conversation(turns), options, stream, call),
                      ignored)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise DropInError(400, "request body must be a JSON object")
    return body


def _string(body: dict[str, Any], key: str) -> str:
    return validation.text(body.get(key), key)


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


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


class OllamaApi(DropInApi[OllamaCall]):
    """Ollama's shapes: ``{"error": "..."}``, one object or NDJSON lines ending with the final object."""

    name = "ollama"
    invalid_json = "invalid JSON body"
    stream_headers = {"Content-Type": NDJSON}

    def error(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
              headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"error": message}, status=status, headers=headers)

    def model_not_found(self, call: OllamaCall, message: str, headers: dict[str, str] | None = None) -> web.Response:
        """Ollama's own 404 for a model it does not have, in its words (clients match them):
        ``{"error": "model 'x' not found"}``; what the endpoints have is in the worker's
        response, in the audit log."""
        return self.error(404, f"model '{call.model}' not found", headers=headers)

    def headers(self, call: OllamaCall) -> dict[str, str]:
        headers = {IGNORED_HEADER: ",".join(call.ignored)} if call.ignored else {}
        if call.request is not None:
            headers[REQUEST_ID_HEADER] = call.request.id
        return headers

    def whole(self, call: OllamaCall, response: InferenceResponse | None) -> dict[str, Any]:
        return final_object(call, response, response.output if response else "")

    def stream_chunk(self, call: OllamaCall, text: str) -> bytes:
        return _line(chunk_object(call, text, datetime.now(timezone.utc)))

    def stream_end(self, call: OllamaCall, response: InferenceResponse) -> bytes:
        return _line(final_object(call, response, ""))

    def stream_error(self, status: int, message: str, code: str | None = None) -> bytes:
        return _line({"error": message})  # Ollama's way to fail mid-stream: an error line


def add_ollama_routes(app: web.Application, dropin: DropIn) -> None:
    """Register ``/api/generate``, ``/api/chat``, ``/api/tags`` and ``/api/version``."""
    known = dropin.settings.model_ids
    started = utcnow()
    api = OllamaApi()

    async def tags(request: web.Request) -> web.Response:
        allowed = access_http.policy_of(request).models_for(access_http.key_of(request), known)
        return web.json_response(tags_object(allowed, started))

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": dropin.version})

    app.router.add_post("/api/generate", call_handler(dropin, api, "generate", parse_generate))
    app.router.add_post("/api/chat", call_handler(dropin, api, "chat", parse_chat))
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/version", version)
