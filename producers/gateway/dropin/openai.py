"""OpenAI's HTTP API on Nexus: OpenAI clients use ``<gateway>/v1`` as their base URL.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream: true`` as server-sent
events ending with ``data: [DONE]``; ``usage`` in the answer, and in the stream with
``stream_options.include_usage``), ``GET /v1/models`` and ``GET /v1/models/{id}``. Errors
have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. The messages (text and
``data:`` URL images, tool calls and tool results), ``tools``, ``tool_choice``, ``response_format``
and the sampling fields pass through; answers carry ``tool_calls`` (``finish_reason: tool_calls``),
streamed in ``delta.tool_calls`` by index.

Like the Ollama API (:mod:`producers.gateway.dropin.ollama`), every call is an ordinary request on
``inference.requests`` answered through :mod:`producers.replies`. Body rules and answer
shapes are plain functions; :class:`OpenAIApi` hands them to the flow every drop-in call shares
(:mod:`producers.gateway.dropin.call`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from schemas import InferenceOptions, InferenceRequest, InferenceResponse, Message, ToolCall, new_id
from schemas.limits import MAX_TOKENS

from producers.gateway import access as access_http
from producers.gateway.dropin.call import DropIn, DropInApi, call_handler
from producers.gateway.dropin.conversation import (
    IGNORED_HEADER,
    REQUEST_ID_HEADER,
    CallContext,
    DropInError,
    arguments_text,
    check_images,
    data_url_image,
    flag,
    integer,
    json_object,
    last_user_text,
    number,
    require_model,
    stop_sequences,
    tools,
    unsupported,
)

SSE = "text/event-stream"
MODEL_MISSING = "you must provide a model parameter"
MODEL_NOT_FOUND = "The model `{model}` does not exist or you do not have access to it."  # OpenAI's words
# Accepted, but not carried to the model by Nexus's pipeline: named in X-Nexus-Ignored.
_IGNORED = (
    "logit_bias", "store", "metadata", "service_tier", "parallel_tool_calls", "reasoning_effort", "prediction",
    "top_logprobs",
)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_TOOL_CHOICES = ("auto", "none", "required")
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable", 504: "timeout_error"}


@dataclass(frozen=True)
class OpenAICall:
    model: str  # as the client spelled it
    chat: bool
    stream: bool
    include_usage: bool
    request: InferenceRequest
    ignored: tuple[str, ...] = ()

    @property
    def model_id(self) -> str:
        return self.request.model_id


def parse_chat_completion(body: Any, known: Collection[str], call: CallContext) -> OpenAICall:
    """``POST /v1/chat/completions``: the messages, tools, tool_choice and response_format pass
    through to the backend's chat API."""
    body = _object(body)
    model, model_id = require_model(body, known, "model", MODEL_MISSING, MODEL_NOT_FOUND)
    for key in ("functions", "function_call"):
        if body.get(key):
            raise unsupported(key, "use tools and tool_choice")
    if body.get("audio"):
        raise unsupported("audio", "Nexus answers with text")
    if body.get("logprobs"):
        raise unsupported("logprobs")
    if body.get("modalities") not in (None, ["text"]):
        raise unsupported("modalities", "Nexus answers with text")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise DropInError(400, "'messages' must be a non-empty array", param="messages")
    messages: list[Message] = []
    for i, m in enumerate(raw):
        messages.append(_message(i, m, messages))
    check_images(messages)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _call(body, model, model_id, True, last_user_text(messages), max_tokens, name, call,
                 messages=tuple(messages), tools=tools(body.get("tools")),
                 tool_choice=_tool_choice(body.get("tool_choice")),
                 format=_response_format(body.get("response_format")))


def parse_completion(body: Any, known: Collection[str], call: CallContext) -> OpenAICall:
    """``POST /v1/completions``: one prompt string (or a list holding one) is the input."""
    body = _object(body)
    model, model_id = require_model(body, known, "model", MODEL_MISSING, MODEL_NOT_FOUND)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise DropInError(400, "'prompt' must be a string (or an array of exactly one string)", param="prompt")
    if body.get("echo"):
        raise unsupported("echo")
    if body.get("suffix"):
        raise unsupported("suffix")
    if body.get("logprobs") is not None:
        raise unsupported("logprobs")
    if body.get("best_of") not in (None, 1):
        raise unsupported("best_of")
    return _call(body, model, model_id, False, prompt, body.get("max_tokens"), "max_tokens", call)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise DropInError(400, "the request body must be a JSON object")
    return body


def _message(i: int, message: Any, earlier: list[Message]) -> Message:
    """One of OpenAI's chat messages. ``developer`` is ``system``; content is a string or parts
    (text, and images as ``data:`` URLs); an assistant's ``tool_calls`` keep their ids and their
    arguments' text; a tool message answers ``tool_call_id``, whose function's name is looked up
    in the ``earlier`` turns."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise DropInError(400, f"{where} must be an object", param=where)
    role = _ROLES.get(message.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise DropInError(400, f"{where}.role must be system, developer, user, assistant or tool",
                          param=f"{where}.role")
    if message.get("function_call"):
        raise unsupported(f"{where}.function_call", "use tool_calls")
    text, images = _content(where, message.get("content"))
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise DropInError(400, f"'{where}.tool_calls' must be an array", param=f"{where}.tool_calls")
    tool_calls = tuple(_tool_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(calls))
    tool_call_id = message.get("tool_call_id")
    if role == "tool" and (not isinstance(tool_call_id, str) or not tool_call_id):
        raise DropInError(400, f"'{where}.tool_call_id' must be the id of the call it answers",
                          param=f"{where}.tool_call_id")
    tool_name = None
    if role == "tool":
        tool_name = next((c.name for m in reversed(earlier) for c in m.tool_calls if c.id == tool_call_id), None)
    return Message(role, text, images, tool_calls, tool_name, tool_call_id if role == "tool" else None)


def _content(where: str, content: Any) -> tuple[str, tuple[bytes, ...]]:
    """A string, or parts: text parts joined by line breaks, ``image_url`` parts as the images' bytes."""
    if content is None:
        return "", ()
    if isinstance(content, str):
        return content, ()
    if not isinstance(content, list):
        raise DropInError(400, f"{where}.content must be a string or an array of content parts",
                          param=f"{where}.content")
    texts: list[str] = []
    images: list[bytes] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):  # an assistant turn replayed
            texts.append(part["refusal"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            images.append(data_url_image(url, f"{at}.image_url.url"))
        else:
            raise DropInError(400, f"{at} must be a text or image_url part", param=f"{where}.content")
    return "\n".join(texts), tuple(images)


def _tool_call(where: str, value: Any) -> ToolCall:
    """``{"id", "type": "function", "function": {"name", "arguments": <JSON text>}}``."""
    function = value.get("function") if isinstance(value, dict) else None
    if (not isinstance(function, dict) or value.get("type", "function") != "function"
            or not isinstance(function.get("name"), str) or not function["name"]):
        raise DropInError(400, f"'{where}' must be a function call: {{\"id\", \"type\": \"function\", "
                          "\"function\": {\"name\", \"arguments\"}}", param=where)
    call_id = value.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise DropInError(400, f"'{where}.id' must be a string", param=f"{where}.id")
    return ToolCall(function["name"], arguments_text(function.get("arguments"), f"{where}.function.arguments"),
                    call_id or None)


def _tool_choice(value: Any) -> str | None:
    """``auto``, ``none``, ``required``, or ``{"type": "function", "function": {"name"}}`` -> the name."""
    if value is None or value in _TOOL_CHOICES:
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            return name
    raise DropInError(400, "'tool_choice' must be \"auto\", \"none\", \"required\" or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")


def _response_format(value: Any) -> str | None:
    """``{"type": "text"}``: none; ``json_object``: ``"json"``; ``json_schema``: the schema's text."""
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise DropInError(400, "'response_format.json_schema.schema' is required", param="response_format")
        return json_object(schema, "response_format.json_schema.schema")
    raise DropInError(400, "'response_format.type' must be text, json_object or json_schema", param="response_format")


def _call(
    body: dict[str, Any], model: str, model_id: str, chat: bool, text: str,
    max_tokens: Any, max_tokens_name: str, call: CallContext, **conversation: Any,
) -> OpenAICall:
    if body.get("n") not in (None, 1):
        raise unsupported("n", "one choice per request")
    stream = flag(body.get("stream"), "stream", False)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise DropInError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = flag(stream_options.get("include_usage"), "stream_options.include_usage", False)
    options = InferenceOptions(
        temperature=number(body.get("temperature"), "temperature", 0, 2),
        max_tokens=integer(max_tokens, max_tokens_name, 1, MAX_TOKENS),
        seed=integer(body.get("seed"), "seed"),
        top_p=number(body.get("top_p"), "top_p", 0, 1),
        stop=stop_sequences(body.get("stop"), "stop"),
        presence_penalty=number(body.get("presence_penalty"), "presence_penalty", -2, 2),
        frequency_penalty=number(body.get("frequency_penalty"), "frequency_penalty", -2, 2),
    )
    context = call.context
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise DropInError(400, "'user' must be a string", param="user")
        if "user" not in context.metadata:  # an X-Nexus-Meta-User header wins
            context = type(context)(context.session_id, {**context.metadata, "user": user})
    request = InferenceRequest(
        id=new_id(), model_id=model_id, input=text, context=context, options=options,
        stream=stream, cache=call.cache, priority=call.priority, tenant=call.tenant,
        **conversation,
    )
    ignored = tuple(k for k in _IGNORED if body.get(k) is not None)
    return OpenAICall(model, chat, stream, include_usage, request, ignored)


# --------------------------------------------------------------------------- answers


def error_object(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"
                                                                        if status < 500 else "server_error"),
                      "param": param, "code": code}}


def finish_reason(response: InferenceResponse) -> str:
    if response.tool_calls:
        return "tool_calls"
    return "length" if response.done_reason == "length" else "stop"


def tool_call_id(call: OpenAICall, index: int) -> str:
    """The id of an answer's tool call the backend gave none (Ollama): ``call_<hex>``, derived
    from the request's id and the call's index, so the same answer shows the same ids."""
    return "call_" + hashlib.sha256(f"{call.request.id}/{index}".encode()).hexdigest()[:24]


def tool_calls_json(call: OpenAICall, calls: tuple[ToolCall, ...], start: int = 0,
                    indexed: bool = False) -> list[dict[str, Any]]:
    """Tool calls in OpenAI's shape, arguments as JSON text; ``indexed``: with their ``index``, as
    a stream's ``delta.tool_calls`` carry them (each call whole in one delta)."""
    out = []
    for i, tool_call in enumerate(calls, start):
        entry: dict[str, Any] = {"index": i} if indexed else {}
        entry.update({"id": tool_call.id or tool_call_id(call, i), "type": "function",
                      "function": {"name": tool_call.name, "arguments": tool_call.arguments}})
        out.append(entry)
    return out


def usage(response: InferenceResponse) -> dict[str, int]:
    return {
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "total_tokens": response.prompt_tokens + response.completion_tokens,
    }


def completion_id(call: OpenAICall) -> str:
    return ("chatcmpl-" if call.chat else "cmpl-") + call.request.id


def _head(call: OpenAICall, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion" + (".chunk" if chunk else "")) if call.chat else "text_completion"
    return {
        "id": completion_id(call),
        "object": kind,
        "created": int(call.request.created_at.timestamp()),
        "model": call.model,
        "system_fingerprint": None,
    }


def completion_object(call: OpenAICall, response: InferenceResponse) -> dict[str, Any]:
    """The whole answer of a non-streamed call."""
    if call.chat:
        message: dict[str, Any] = {
            "role": "assistant",
            # OpenAI's content is null beside tool calls when the model wrote nothing
            "content": response.output if response.output or not response.tool_calls else None,
            "refusal": None,
        }
        if response.tool_calls:
            message["tool_calls"] = tool_calls_json(call, response.tool_calls)
        choice: dict[str, Any] = {
            "index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(response),
        }
    else:
        choice = {"index": 0, "text": response.output, "logprobs": None, "finish_reason": finish_reason(response)}
    return {**_head(call, False), "choices": [choice], "usage": usage(response)}


def chunk_object(call: OpenAICall, text: str | None, finish: str | None = None, first: bool = False,
                 calls: tuple[ToolCall, ...] = (), start: int = 0) -> dict[str, Any]:
    """One streamed chunk; the first chat chunk carries the role, the last the finish reason.
    Tool calls go in ``delta.tool_calls`` with their index, each whole."""
    if call.chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = tool_calls_json(call, calls, start, indexed=True)
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    out = {**_head(call, True), "choices": [choice]}
    if call.include_usage:
        out["usage"] = None
    return out


def usage_chunk(call: OpenAICall, response: InferenceResponse) -> dict[str, Any]:
    """With ``stream_options.include_usage``: the last chunk, no choices, the usage."""
    return {**_head(call, True), "choices": [], "usage": usage(response)}


def models_object(model_ids: Collection[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m, created) for m in model_ids]}


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "nexus"}


# --------------------------------------------------------------------------- HTTP


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if status == 504:
        # The request is still queued and will be answered; an automatic retry would add a
        # second one to a pipeline that is already behind.
        headers["x-should-retry"] = "false"
    return web.json_response(error_object(status, message, param, code), status=status, headers=headers)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class OpenAIApi(DropInApi[OpenAICall]):
    """OpenAI's shapes: its error object, one completion or SSE chunks ending with ``data: [DONE]``."""

    name = "openai"
    invalid_json = "the body is not valid JSON"
    stream_headers = {"Content-Type": SSE, "Cache-Control": "no-cache"}

    def error(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
              headers: dict[str, str] | None = None) -> web.Response:
        return error_response(status, message, param=param, code=code, headers=headers)

    def model_not_found(self, call: OpenAICall, message: str, headers: dict[str, str] | None = None) -> web.Response:
        """OpenAI's 404 ``model_not_found``, saying what the endpoints have instead."""
        return error_response(404, f"The model `{call.model}` does not exist: {message}", param="model",
                              code="model_not_found", headers=headers)

    def headers(self, call: OpenAICall) -> dict[str, str]:
        headers = {REQUEST_ID_HEADER: call.request.id, "x-request-id": call.request.id}
        if call.ignored:
            headers[IGNORED_HEADER] = ",".join(call.ignored)
        return headers

    def whole(self, call: OpenAICall, response: InferenceResponse | None) -> dict[str, Any]:
        assert response is not None  # every OpenAI call has a request
        return completion_object(call, response)

    def stream_start(self, call: OpenAICall) -> bytes:
        return _sse(chunk_object(call, "", first=True)) if call.chat else b""  # the chat role comes first

    def stream_chunk(self, call: OpenAICall, text: str) -> bytes:
        return _sse(chunk_object(call, text))

    def stream_tool_calls(self, call: OpenAICall, calls: tuple[ToolCall, ...], start: int) -> bytes:
        return _sse(chunk_object(call, None, calls=calls, start=start))

    def stream_end(self, call: OpenAICall, response: InferenceResponse) -> bytes:
        end = _sse(chunk_object(call, None, finish_reason(response)))
        if call.include_usage:
            end += _sse(usage_chunk(call, response))
        return end + b"data: [DONE]\n\n"

    def stream_error(self, status: int, message: str, code: str | None = None) -> bytes:
        return _sse(error_object(status, message, code=code))


def add_openai_routes(app: web.Application, dropin: DropIn) -> None:
    """Register ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/v1/models/{id}``."""
    known = dropin.settings.model_ids
    created = int(time.time())
    api = OpenAIApi()

    def allowed(request: web.Request) -> list[str]:
        return access_http.policy_of(request).models_for(access_http.key_of(request), known)

    async def models(request: web.Request) -> web.Response:
        return web.json_response(models_object(allowed(request), created))

    async def model(request: web.Request) -> web.Response:
        model_id = request.match_info["model"]
        if model_id not in allowed(request):  # OpenAI answers 404 for a model the key may not use
            return error_response(404, MODEL_NOT_FOUND.format(model=model_id), param="model", code="model_not_found")
        return web.json_response(model_object(model_id, created))

    app.router.add_post("/v1/chat/completions", call_handler(dropin, api, "chat.completions", parse_chat_completion))
    app.router.add_post("/v1/completions", call_handler(dropin, api, "completions", parse_completion))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)
