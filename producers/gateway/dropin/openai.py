"""OpenAI's HTTP API on Nexus: OpenAI clients use ``<gateway>/v1`` as their base URL.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream: true`` as server-sent
events ending with ``data: [DONE]``; ``usage`` in the answer, and in the stream with
``stream_options.include_usage``), ``GET /v1/models`` and ``GET /v1/models/{id}``. Errors
have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Like the Ollama API (:mod:`producers.gateway.dropin.ollama`), every call is an ordinary request on
``inference.requests`` answered through :mod:`producers.replies`. Body rules and answer
shapes are plain functions; :class:`OpenAIApi` hands them to the flow every drop-in call shares
(:mod:`producers.gateway.dropin.call`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from schemas import InferenceOptions, InferenceRequest, InferenceResponse, new_id

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

SSE = "text/event-stream"
MODEL_MISSING = "you must provide a model parameter"
MODEL_NOT_FOUND = "The model `{model}` does not exist or you do not have access to it."  # OpenAI's words
# Accepted, but not carried to the model by Nexus's pipeline: named in X-Nexus-Ignored.
_IGNORED = (
    "top_p", "frequency_penalty", "presence_penalty", "stop", "logit_bias", "store", "metadata",
    "service_tier", "parallel_tool_calls", "reasoning_effort", "prediction", "top_logprobs",
)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                500: "server_error", 503: "service_unavailable", 504: "timeout_error"}


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
    """``POST /v1/chat/completions``: messages -> one input (:func:`render_conversation`)."""
    body = _object(body)
    model, model_id = require_model(body, known, "model", MODEL_MISSING, MODEL_NOT_FOUND)
    for key in ("tools", "functions", "audio"):
        if body.get(key):
            raise unsupported(key, "Nexus answers with text only")
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise unsupported(key, "Nexus answers with text only")
    if body.get("logprobs"):
        raise unsupported("logprobs")
    if body.get("modalities") not in (None, ["text"]):
        raise unsupported("modalities", "Nexus answers with text only")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise unsupported("response_format", "only {\"type\": \"text\"}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DropInError(400, "'messages' must be a non-empty array", param="messages")
    turns = [_turn(i, m) for i, m in enumerate(messages)]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _call(body, model, model_id, True, render_conversation(turns), max_tokens, name, call)


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


def _turn(i: int, message: Any) -> tuple[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise DropInError(400, f"{where} must be an object", param=where)
    role = _ROLES.get(message.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise DropInError(
            400, f"{where}.role must be system, developer, user or assistant (tools are not supported)",
            param=f"{where}.role",
        )
    if message.get("tool_calls") or message.get("function_call"):
        raise unsupported(f"{where}.tool_calls")
    content = message.get("content")
    if content is None:
        return role, ""
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):  # content parts: text only; several are joined by line breaks
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported(f"{where}.content", "only text parts")
            texts.append(part["text"])
        return role, "\n".join(texts)
    raise DropInError(400, f"{where}.content must be a string or an array of text parts", param=f"{where}.content")


def _call(
    body: dict[str, Any], model: str, model_id: str, chat: bool, text: str,
    max_tokens: Any, max_tokens_name: str, call: CallContext,
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
        max_tokens=integer(max_tokens, max_tokens_name, 1, 2**31 - 1),
        seed=integer(body.get("seed"), "seed"),
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
        stream=stream, cache=call.cache,  # type: ignore[arg-type]
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
    return "length" if response.done_reason == "length" else "stop"


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
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": response.output, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason(response),
        }
    else:
        choice = {"index": 0, "text": response.output, "logprobs": None, "finish_reason": finish_reason(response)}
    return {**_head(call, False), "choices": [choice], "usage": usage(response)}


def chunk_object(call: OpenAICall, text: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
    """One streamed chunk; the first chat chunk carries the role, the last the finish reason."""
    if call.chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
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
