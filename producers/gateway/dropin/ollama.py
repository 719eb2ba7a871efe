"""Ollama's HTTP API on Nexus: existing Ollama clients point their host at the gateway.

``POST /api/generate`` and ``POST /api/chat`` (NDJSON streaming by default, or one object
with ``"stream": false``, ending with Ollama's statistics), ``GET /api/tags`` (the models
Nexus routes), ``GET /api/version``. Each call becomes an :class:`InferenceRequest` on
``inference.requests`` (batching, routing, caching, metrics and the audit log see it like
any other) and is answered from Kafka through :mod:`producers.replies`. A chat's conversation
passes through whole (roles, images, tool calls and results; tools, ``format``, every option,
``keep_alive``), so the backend's chat API applies the model's own template; answers carry the
assistant's tool calls, streamed as Ollama streams them.

The body rules and answer shapes are plain functions (``parse_generate``, ``parse_chat``,
``final_object``...); :class:`OllamaApi` hands them to the flow every drop-in call shares
(:mod:`producers.gateway.dropin.call`: submit, wait, 503/504, metrics).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, UTC
from typing import Any

from aiohttp import web

from schemas import InferenceOptions, InferenceRequest, InferenceResponse, Message, ToolCall, new_id, utcnow
from schemas import validation
from schemas.limits import MAX_TOKENS

from producers.gateway import access as access_http
from producers.gateway.dropin.call import DropIn, DropInApi, call_handler
from producers.gateway.dropin.conversation import (
    IGNORED_HEADER,
    REQUEST_ID_HEADER,
    CallContext,
    DropInError,
    arguments_text,
    base64_image,
    check_images,
    flag,
    integer,
    json_object,
    json_text,
    keep_alive,
    last_user_text,
    number,
    require_model,
    stop_sequences,
    tools,
    unsupported,
)

NDJSON = "application/x-ndjson"
MODEL_REQUIRED = "model is required"  # Ollama's own message
_INT32 = 2**31 - 1
# Ollama's options the request carries in their own fields (InferenceOptions); every other
# option goes, as given, into ``options.extra`` and on to the backend's ``options``.
_TYPED_OPTIONS = frozenset({"temperature", "num_predict", "seed", "top_p", "top_k", "min_p", "stop", "num_ctx",
                            "repeat_penalty", "presence_penalty", "frequency_penalty"})
_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class OllamaCall:
    """A parsed generate or chat call."""

    model: str  # as the client spelled it; Ollama echoes it back unchanged
    model_id: str  # the Nexus model it names
    chat: bool  # /api/chat: answers carry ``message``; /api/generate: ``response``
    stream: bool
    request: InferenceRequest | None  # None: Ollama's "load the model" call, answered at once
    ignored: tuple[str, ...] = ()


def parse_generate(body: Any, known: Collection[str], call: CallContext) -> OllamaCall:
    """``POST /api/generate``: ``prompt`` is a prompt request; with ``system`` or ``images`` it is a
    conversation ``[system?, user(prompt, images)]``, so the backend's chat API applies the model's
    template with that system prompt in place of the model's own, as Ollama's generate does."""
    body = _object(body)
    model, model_id = require_model(body, known, "model", MODEL_REQUIRED)
    for key in ("raw", "suffix", "template", "context"):
        if body.get(key):
            raise unsupported(key, "Nexus sends the prompt through the model's own template")
    for key in ("think", "logprobs", "top_logprobs", "width", "height", "steps"):
        if body.get(key):
            raise unsupported(key)
    prompt = _string(body, "prompt")
    system = _string(body, "system")
    images = _images(body.get("images"), "images")
    stream = flag(body.get("stream"), "stream", True)
    options = _options(body)
    if not prompt and not images:
        return OllamaCall(model, model_id, False, stream, None)
    messages: tuple[Message, ...] = ()
    if system or images:
        messages = ((Message("system", system),) if system else ()) + (Message("user", prompt, images),)
        check_images(messages)
    request = _request(model_id, prompt, options, stream, call, body, messages=messages)
    return OllamaCall(model, model_id, False, stream, request)


def parse_chat(body: Any, known: Collection[str], call: CallContext) -> OllamaCall:
    """``POST /api/chat``: the conversation, tools and format pass through to the backend's chat API."""
    body = _object(body)
    model, model_id = require_model(body, known, "model", MODEL_REQUIRED)
    for key in ("think", "logprobs", "top_logprobs"):
        if body.get(key):
            raise unsupported(key)
    stream = flag(body.get("stream"), "stream", True)
    options = _options(body)
    raw = body.get("messages") or []
    if not isinstance(raw, list):
        raise DropInError(400, "'messages' must be a list of objects", param="messages")
    messages = tuple(_message(i, m) for i, m in enumerate(raw))
    check_images(messages)
    ignored = ("messages.thinking",) if any(isinstance(m, dict) and m.get("thinking") for m in raw) else ()
    if not messages:
        return OllamaCall(model, model_id, True, stream, None, ignored)
    request = _request(model_id, last_user_text(messages), options, stream, call, body, messages=messages,
                       tools=tools(body.get("tools") or None))
    return OllamaCall(model, model_id, True, stream, request, ignored)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise DropInError(400, "request body must be a JSON object")
    return body


def _string(body: dict[str, Any], key: str) -> str:
    return validation.text(body.get(key), key)


def _images(value: Any, name: str) -> tuple[bytes, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DropInError(400, f"'{name}' must be an array of base64 strings", param=name)
    return tuple(base64_image(image, f"{name}[{i}]") for i, image in enumerate(value))


def _message(i: int, message: Any) -> Message:
    """One of Ollama's chat messages: role, content, images (base64), tool_calls (arguments as an
    object), and for a tool turn the tool's name."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise DropInError(400, f"{where} must be an object", param="messages")
    role = message.get("role")
    if role not in _ROLES:
        raise DropInError(400, f"{where}.role must be system, user, assistant or tool", param="messages")
    content = validation.text(message.get("content"), f"{where}.content")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise DropInError(400, f"'{where}.tool_calls' must be an array", param=f"{where}.tool_calls")
    tool_name = tool_call_id = None
    if role == "tool":  # the function whose result this is; older clients said "name"
        tool_name = message.get("tool_name", message.get("name"))
        tool_call_id = message.get("tool_call_id")
        for key, value in (("tool_name", tool_name), ("tool_call_id", tool_call_id)):
            if value is not None and not isinstance(value, str):
                raise DropInError(400, f"'{where}.{key}' must be a string", param=f"{where}.{key}")
    return Message(
        role, content, _images(message.get("images"), f"{where}.images"),
        tuple(_tool_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(calls)),
        tool_name or None, tool_call_id or None,
    )


def _tool_call(where: str, value: Any) -> ToolCall:
    """``{"function": {"name", "arguments": {...}}}`` (an ``id`` too if the client kept one)."""
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise DropInError(400, f"'{where}' must be {{\"function\": {{\"name\": ..., \"arguments\": {{...}}}}}}",
                          param=where)
    call_id = value.get("id")
    return ToolCall(function["name"], arguments_text(function.get("arguments"), f"{where}.function.arguments"),
                    call_id if isinstance(call_id, str) and call_id else None)


def _options(body: dict[str, Any]) -> InferenceOptions:
    """All of Ollama's ``options``: the common ones into their own fields (``num_predict`` ->
    ``max_tokens``; <= 0 means no limit, as in Ollama), every other one, as given, into ``extra``."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise DropInError(400, "'options' must be an object", param="options")
    num_predict = integer(options.get("num_predict"), "options.num_predict", -2, MAX_TOKENS)
    extra = {k: v for k, v in options.items() if k not in _TYPED_OPTIONS and v is not None}
    return InferenceOptions(
        temperature=number(options.get("temperature"), "options.temperature", 0, math.inf),
        max_tokens=num_predict if num_predict is not None and num_predict > 0 else None,
        seed=integer(options.get("seed"), "options.seed"),
        top_p=number(options.get("top_p"), "options.top_p", 0, 1),
        top_k=integer(options.get("top_k"), "options.top_k", 0, _INT32),
        min_p=number(options.get("min_p"), "options.min_p", 0, 1),
        stop=stop_sequences(options.get("stop"), "options.stop"),
        num_ctx=integer(options.get("num_ctx"), "options.num_ctx", 1, _INT32),
        repeat_penalty=number(options.get("repeat_penalty"), "options.repeat_penalty", 0, math.inf),
        presence_penalty=number(options.get("presence_penalty"), "options.presence_penalty", -math.inf, math.inf),
        frequency_penalty=number(options.get("frequency_penalty"), "options.frequency_penalty", -math.inf, math.inf),
        extra=json_text(extra, "options") if extra else None,
    )


def _format(value: Any) -> str | None:
    """Ollama's ``format``: ``"json"``, or a JSON schema object (its text); none when absent or ''."""
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    if isinstance(value, dict):
        return json_object(value, "format")
    raise DropInError(400, "'format' must be \"json\" or a JSON schema object", param="format")


def _request(
    model_id: str, text: str, options: InferenceOptions, stream: bool, call: CallContext, body: dict[str, Any],
    **conversation: Any,
) -> InferenceRequest:
    return InferenceRequest(
        id=new_id(), model_id=model_id, input=text, context=call.context, options=options,
        stream=stream, cache=call.cache, priority=call.priority, tenant=call.tenant,
        format=_format(body.get("format")), keep_alive=keep_alive(body.get("keep_alive")), **conversation,
    )


# --------------------------------------------------------------------------- answers


def rfc3339(moment: datetime) -> str:
    """Ollama's created_at format: UTC, microseconds, trailing Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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


def tool_calls_json(calls: tuple[ToolCall, ...], start: int = 0) -> list[dict[str, Any]]:
    """Tool calls in Ollama's shape: ``{"function": {"index", "name", "arguments": <object>}}``
    (and the backend's ``id`` when it gave one); ``start``: the index of the first."""
    out = []
    for i, tool_call in enumerate(calls, start):
        entry: dict[str, Any] = {}
        if tool_call.id:
            entry["id"] = tool_call.id
        entry["function"] = {"index": i, "name": tool_call.name, "arguments": tool_call.to_json()["arguments"]}
        out.append(entry)
    return out


def assistant_message(text: str, calls: tuple[ToolCall, ...] = (), start: int = 0) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = tool_calls_json(calls, start)
    return message


def chunk_object(call: OllamaCall, text: str, now: datetime, calls: tuple[ToolCall, ...] = (),
                 start: int = 0) -> dict[str, Any]:
    """One streamed chunk: text, or (chat) tool calls as Ollama streams them, each whole."""
    base: dict[str, Any] = {"model": call.model, "created_at": rfc3339(now)}
    if call.chat:
        return {**base, "message": assistant_message(text, calls, start), "done": False}
    return {**base, "response": text, "done": False}


def final_object(call: OllamaCall, response: InferenceResponse | None, text: str,
                 calls: tuple[ToolCall, ...] = ()) -> dict[str, Any]:
    """The last object: ``text`` and ``calls`` are the whole answer unstreamed, '' and none after a stream."""
    base: dict[str, Any] = {
        "model": call.model,
        "created_at": rfc3339(response.completed_at if response else utcnow()),
    }
    if call.chat:
        base["message"] = assistant_message(text, calls)
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
        if response is None:
            return final_object(call, None, "")
        return final_object(call, response, response.output, response.tool_calls)

    def stream_chunk(self, call: OllamaCall, text: str) -> bytes:
        return _line(chunk_object(call, text, datetime.now(UTC)))

    def stream_tool_calls(self, call: OllamaCall, calls: tuple[ToolCall, ...], start: int) -> bytes:
        return _line(chunk_object(call, "", datetime.now(UTC), calls, start))

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
